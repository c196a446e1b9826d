"""Video frames against images: the cost of a frame sampled from a video, as a ratio to
decoding an image of the same resolution through the same path.

    .venv/bin/python bench/video.py [--width 1920] [--height 1080] [--seconds 10]
        [--frames 16] [--size 224] [--repeats 3] [--json OUT]

Encodes its own video with PyAV (H.264, 24 fps, the default GOP of 250 frames: one
keyframe in ten seconds, the worst case for seeking; and a GOP of 48, two seconds, as
streaming encoders write), from textured frames like bench/preprocess.py's. Measures:
- `detector.io.video.sample_frames` (`--frames` frames, seek + decode forward + resize):
  sampled frames per second;
- the baseline, in the same run: `detector.io.preprocess.load_image` on the same frames
  saved as JPEG q90 (one image decoded per frame);
- memory per concurrent video: in a fresh process holding the video's bytes, the peak
  resident memory that sampling adds (FFmpeg's decoder state, the full-size frame, the
  sampled frames), which is what each video a scan's decode task samples costs beyond
  its bytes;
- scans (`--scan-videos N`, 0 to skip), each in its own process on a local Ray, with the
  untrained `--model` at `--size` px: a folder of N copies of the video, and of 4N
  (scanned frames per second, and the peak memory of the whole process tree: a scan's
  memory must not grow with the number of videos), against the baseline of a folder of
  as many JPEG frames as the N videos' sampled frames (images per second).
Best of `--repeats`. Writes JSON (default bench/results/video.json).
"""

from __future__ import annotations

import argparse
import io
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from _measure import machine, print_machine, save_json  # noqa: E402


def frames(width: int, height: int, count: int) -> list[np.ndarray]:
    """Textured moving frames: a gradient field with grain, shifting a little each frame
    (so the encoder codes motion, as in real footage)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    big = np.kron(base, np.ones((8, 8, 1), np.uint8))
    out = []
    for i in range(count):
        shifted = np.roll(big, i, axis=1)[:height, :width]
        grain = rng.integers(0, 12, (height, width, 3), dtype=np.uint8)
        out.append(np.clip(shifted.astype(np.int16) + grain, 0, 255).astype(np.uint8))
    return out


def encode(pixels: list[np.ndarray], fps: int, gop: int | None) -> bytes:
    import av

    buffer = io.BytesIO()
    height, width = pixels[0].shape[:2]
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps, options={"preset": "veryfast"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        for frame in pixels:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scan-videos", type=int, default=16)
    parser.add_argument("--model", default="resnet50v2")
    parser.add_argument("--json", default=os.path.join(HERE, "results", "video.json"))
    args = parser.parse_args()

    from PIL import Image

    from detector.io import preprocess, video

    info = machine()
    print_machine(info)
    fps = 24
    pixels = frames(args.width, args.height, args.seconds * fps)
    jpegs = []
    for frame in pixels[:: max(1, len(pixels) // args.frames)][: args.frames]:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    results = {"machine": info, "width": args.width, "height": args.height,
               "seconds": args.seconds, "frames": args.frames, "size": args.size}
    best_images = min(_timed(lambda: [preprocess.load_image(b, args.size) for b in jpegs])
                      for _ in range(args.repeats))
    results["image_decodes_per_s"] = len(jpegs) / best_images
    for gop in (None, 48):
        blob = encode(pixels, fps, gop)
        name = f"gop{gop or 250}"
        sampled = video.sample_frames(blob, args.size, args.frames)
        best = min(_timed(lambda b=blob: video.sample_frames(b, args.size, args.frames))
                   for _ in range(args.repeats))
        results[name] = {"bytes": len(blob), "frames_decoded": sampled.decoded,
                         "sampled_frames_per_s": args.frames / best,
                         "vs_images": (args.frames / best) / results["image_decodes_per_s"],
                         "sampling_peak_bytes": sampling_peak(blob, args.size, args.frames)}
    if args.scan_videos:
        results["scans"] = scans(blob, jpegs, args)
    print(f"images ({args.width}x{args.height} JPEG q90 -> {args.size} px): "
          f"{results['image_decodes_per_s']:.1f} per s")
    for name in ("gop250", "gop48"):
        row = results[name]
        print(f"video {name}: {row['sampled_frames_per_s']:.1f} sampled frames per s "
              f"({row['frames_decoded']} decoded for {args.frames}), "
              f"{row['vs_images']:.2f}x the image rate; sampling adds "
              f"{row['sampling_peak_bytes'] / 2**20:.0f} MiB at its peak to the video's "
              f"{row['bytes'] / 2**20:.1f} MiB")
    for name in ("images", "videos", "videos_4x") if "scans" in results else ():
        row = results["scans"][name]
        print(f"scan {name}: {row['objects']} objects, {row['per_s']:.1f} "
              f"{'frames' if name.startswith('video') else 'images'} per s "
              f"({row.get('vs_images', 1.0):.2f}x the images), peak {row['peak_pss_mb']} MB")
    save_json(args.json, results)


def scans(blob: bytes, jpegs: list[bytes], args) -> dict:
    """End-to-end scans of videos (N and 4N copies of `blob`) and of the baseline, as many
    JPEG frames as N videos' sampled frames, each through bench/scan.py's child."""
    from _measure import run_child
    from _model import untrained_artifact

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_uri = untrained_artifact(tmp, args.model, args.size)
        folders = {"images": [(f"frame-{i}.jpg", jpegs[i % len(jpegs)])
                              for i in range(args.scan_videos * args.frames)],
                   "videos": [(f"clip-{i}.mp4", blob) for i in range(args.scan_videos)],
                   "videos_4x": [(f"clip-{i}.mp4", blob) for i in range(4 * args.scan_videos)]}
        for name, files in folders.items():
            folder = os.path.join(tmp, name)
            os.makedirs(folder)
            for file_name, data in files:
                with open(os.path.join(folder, file_name), "wb") as f:
                    f.write(data)
            result, peak = run_child(os.path.join(HERE, "scan.py"), folder, model_uri, "data",
                                     "keras", "float32")
            per_object = 1 if name == "images" else args.frames
            out[name] = {"objects": result["objects"], "peak_pss_mb": peak,
                         "per_s": result["objects"] * per_object / result["seconds"]}
    for name in ("videos", "videos_4x"):
        out[name]["vs_images"] = out[name]["per_s"] / out["images"]["per_s"]
    out["peak_growth_4x_videos"] = out["videos_4x"]["peak_pss_mb"] / out["videos"]["peak_pss_mb"]
    return out


PEAK = """
import sys
import av  # its libraries are loaded before the baseline
from detector.io import video
blob = open(sys.argv[1], "rb").read()
def status(key):
    line = next(l for l in open("/proc/self/status") if l.startswith(key + ":"))
    return int(line.split()[1]) * 1024
before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
video.sample_frames(blob, int(sys.argv[2]), int(sys.argv[3]))
print(status("VmHWM") - before)
"""


def sampling_peak(blob: bytes, size: int, count: int) -> int:
    """Peak resident bytes that sampling `blob` adds, measured in a fresh process that
    already holds the bytes (Linux's VmHWM, reset before sampling: ru_maxrss would carry
    this process's own peak over into the child)."""
    with tempfile.NamedTemporaryFile(suffix=".mp4") as file:
        file.write(blob)
        file.flush()
        out = subprocess.run([sys.executable, "-c", PEAK, file.name, str(size), str(count)],
                             check=True, capture_output=True, text=True,
                             cwd=os.path.dirname(HERE)).stdout
    return int(out.split()[-1])


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
