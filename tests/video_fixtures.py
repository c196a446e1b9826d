"""Videos made by the tests with PyAV the way encoders write them: MP4 and MOV with
H.264, WebM with VP9, of `detector sample` frames; an audio-only MP4; an MP4 whose headers
claim hours."""

from __future__ import annotations

import io
import json

import numpy as np

FORMATS = {"mp4": ("mp4", "libx264"), "mov": ("mov", "libx264"), "webm": ("webm", "libvpx-vp9")}


def sample_frame(label: int, index: int, size=(64, 48)) -> np.ndarray:
    from detector.data.sample import make_image

    return make_image(label, np.random.default_rng([7, label, index]), (size[1], size[0]))


def make_video(kind: str = "mp4", labels=(0,) * 24, fps: int = 8, size=(64, 48),
               lossless: bool = False, tags: dict[str, str] | None = None,
               container_options: dict[str, str] | None = None) -> bytes:
    """A video of `detector sample` frames (one per entry of `labels`: 0 real, 1 AI),
    encoded as `kind` by FFmpeg's own encoders through PyAV, with container metadata
    `tags` set before any stream, as PyAV writers do."""
    import av

    fmt, codec = FORMATS[kind]
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=fmt, options=container_options or {}) as out:
        for key, value in (tags or {}).items():
            out.metadata[key] = value
        options = {"qp": "0"} if lossless and codec == "libx264" else \
            {"lossless": "1"} if lossless else {}
        stream = out.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv444p" if lossless else "yuv420p"
        for i, label in enumerate(labels):
            frame = av.VideoFrame.from_ndarray(sample_frame(label, i, size), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def audio_only() -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as out:
        stream = out.add_stream("aac", rate=8000)
        for i in range(8):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = 8000, i * 1024
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buffer.getvalue()


def claiming_hours(blob: bytes, hours: float) -> bytes:
    """An MP4 of 24 frames whose headers claim `hours`: every duration field (mvhd, tkhd,
    mdhd, the edit list) and the sample table's frame delta, as a crafted file would set
    them. The bytes stay a few KB."""
    data = bytearray(blob)

    def field(box: bytes, offset: int) -> tuple[int, int]:
        at = data.index(box)
        assert data[at + 4] == 0  # version 0: 32-bit fields
        return at + offset, int.from_bytes(data[at + offset:at + offset + 4], "big")

    movie_scale = field(b"mvhd", 16)[1]
    media_scale = field(b"mdhd", 16)[1]
    for box, offset, scale in ((b"mvhd", 20, movie_scale), (b"tkhd", 24, movie_scale),
                               (b"mdhd", 20, media_scale), (b"elst", 12, movie_scale)):
        at, _ = field(box, offset)
        data[at:at + 4] = int(hours * 3600 * scale).to_bytes(4, "big")
    at, entries = field(b"stts", 8)
    assert entries == 1  # one run of equal deltas: sample count, then the delta
    data[at + 8:at + 12] = int(hours * 3600 * media_scale / 24).to_bytes(4, "big")
    return bytes(data)


# A ComfyUI graph as its front-end sends it (API format) and the editor's workflow.
COMFY_PROMPT = {
    "3": {"class_type": "KSampler", "inputs": {"seed": 42, "steps": 20, "cfg": 6.0,
                                                "sampler_name": "euler", "model": ["4", 0]}},
    "4": {"class_type": "CheckpointLoaderSimple",
          "inputs": {"ckpt_name": "wan2.1_t2v_1.3B_fp16.safetensors"}},
    "9": {"class_type": "SaveVideo", "inputs": {"filename_prefix": "video/ComfyUI",
                                                 "format": "auto", "codec": "auto"}},
}
COMFY_WORKFLOW = {"last_node_id": 9, "last_link_id": 9, "version": 0.4,
                  "nodes": [{"id": 3, "type": "KSampler"}, {"id": 9, "type": "SaveVideo"}]}


def comfyui_save_video() -> bytes:
    """An MP4 as ComfyUI's own SaveVideo node writes it (comfy_api's VideoFromComponents
    .save_to): opened with movflags=use_metadata_tags, each of `prompt` and `workflow`
    a tag of its own holding json.dumps of the graph."""
    return make_video("mp4", (1,) * 16, container_options={"movflags": "use_metadata_tags"},
                      tags={"prompt": json.dumps(COMFY_PROMPT),
                            "workflow": json.dumps(COMFY_WORKFLOW)})


def vhs_video_combine(kind: str = "mp4") -> bytes:
    """A video as ComfyUI-VideoHelperSuite's Video Combine writes it with save_metadata
    on: FFmpeg given `comment=` + json.dumps({"prompt": json.dumps(prompt), "workflow":
    workflow}) (an ffmetadata file) and creation_time=now. In MP4 that is the ©cmt atom,
    in WebM a Matroska COMMENT tag."""
    metadata = {"prompt": json.dumps(COMFY_PROMPT), "workflow": COMFY_WORKFLOW}
    return make_video(kind, (1,) * 16, tags={"comment": json.dumps(metadata),
                                             "creation_time": "2026-12-01T10:00:00.000000Z"})
