"""Videos as model input: frames sampled uniformly over the duration, each made into model
pixels by the image path's own resize (`detector.io.preprocess`).

PyAV (FFmpeg's libraries in its wheel) parses the container. Every limit is checked on
what the header claims before a frame is decoded (bytes, duration, resolution), and the
frames decoded are bounded too: a 10-hour video or a 16k x 16k frame claimed in a header
costs neither time nor memory. Frames are decoded one at a time and shrunk at once, so a
video costs one full-size frame of memory however long it is.

Sampling: K targets at the middle of K equal spans of the duration. The decoder goes on
forward from the last frame while the next target is within `VideoLimits.frames_per_seek`
frames of it, and otherwise seeks to the keyframe at or before the target; either way at
most that many frames are decoded per target (the nearest frame before the target is
taken then: where keyframes are far apart, that is enough to see the video's content).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from detector.io.preprocess import ImageError, square_pixels

DEFAULT_FRAMES = 16
# ISO-BMFF brands of still images (HEIF/AVIF, and their sequences): those are images.
IMAGE_BRANDS = {b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif",
                b"avis", b"jpeg", b"jxl "}


class VideoError(ImageError):
    """A file that cannot become sampled frames. Codes: ``empty``, ``not-a-video``,
    ``too-large``, ``truncated``, ``corrupt`` (the image codes, and the same handling)."""


@dataclass(frozen=True)
class VideoLimits:
    """What a video may claim and cost; beyond any of these it is `too-large`."""

    max_bytes: int = 250 * 1024 * 1024
    max_duration_s: float = 3 * 3600.0
    max_pixels: int = 3840 * 2160 * 2  # per frame: 4K UHD with room, far below 16k x 16k
    frames_per_seek: int = 300  # decoded forward from a keyframe towards one target


@dataclass(frozen=True)
class VideoInfo:
    """What the container says: its format, the video codec, frame size and duration."""

    container: str
    codec: str
    width: int
    height: int
    duration_s: float


@dataclass(frozen=True)
class Frames:
    """The sampled frames of one video: model pixels (K, S, S, 3) and their times (K,)."""

    pixels: np.ndarray
    times_s: np.ndarray
    info: VideoInfo
    decoded: int  # frames decoded to reach them

    def fields(self) -> dict:
        """What an answer or a report row says of the video itself: `format` (its
        codec), `width`, `height`, `duration_s`, `frames_scored`."""
        info = self.info
        return {"format": info.codec.upper(), "width": info.width, "height": info.height,
                "duration_s": info.duration_s, "frames_scored": len(self.pixels)}


def looks_like_video(head: bytes) -> bool:
    """Whether the first bytes of a file are a video container: ISO-BMFF (MP4, MOV, 3GP)
    with a brand that is not a still image's, Matroska/WebM, or AVI."""
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return head[8:12] not in IMAGE_BRANDS
    if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML: Matroska, WebM
        return True
    return head[:4] == b"RIFF" and head[8:12] == b"AVI "


def media_type(head: bytes) -> str | None:
    """The MIME type of a video container by its first bytes (QuickTime by its `qt  `
    brand, other ISO-BMFF as MP4), or None for what `looks_like_video` rejects."""
    if not looks_like_video(head):
        return None
    if head[4:8] == b"ftyp":
        return "video/quicktime" if head[8:12] == b"qt  " else "video/mp4"
    return "video/webm" if head[:4] == b"\x1a\x45\xdf\xa3" else "video/x-msvideo"


def sample_frames(data: bytes, size: int, frames: int = DEFAULT_FRAMES,
                  limits: VideoLimits = VideoLimits()) -> Frames:
    """`frames` frames of `data`, uniformly over its duration, as `size` px model pixels.
    Raises VideoError (never a bare PyAV error) for anything that is not a usable video."""
    import av

    if not data:
        raise VideoError("empty", "the file has no bytes")
    if len(data) > limits.max_bytes:
        raise VideoError("too-large", f"{len(data)} bytes exceeds the video limit of "
                         f"{limits.max_bytes}")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as exc:
        raise _open_error(data, exc) from None
    with container:
        stream = next(iter(container.streams.video), None)
        if stream is None and box_overruns(data):  # the index (moov) was never reached
            raise VideoError("truncated", "the data ends inside a box its header declares")
        if stream is None:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise VideoError("not-a-video", f"no video stream ({', '.join(kinds)})")
        info = _info(container, stream)
        _check(info, limits)
        targets = (np.arange(frames) + 0.5) * info.duration_s / frames
        rate = float(stream.average_rate or 0) or 4.0
        sampler = _Sampler(container, stream, rate, limits)
        pixels, times = [], []
        for target in targets:
            frame, ended = sampler.frame_at(float(target))
            if frame is None or (ended and (frame.time or 0.0) < target - 2 / rate):
                raise VideoError("truncated" if times or frame is not None else "corrupt",
                                 f"the frames end before {target:.2f} s of the "
                                 f"{info.duration_s:.2f} s the header claims")
            if frame.width * frame.height > limits.max_pixels:
                raise VideoError("too-large", f"a {frame.width}x{frame.height} frame exceeds "
                                 f"{limits.max_pixels} pixels")
            pixels.append(square_pixels(frame.to_image(), size))
            times.append(frame.time if frame.time is not None else float(target))
        decoded = sampler.decoded
    return Frames(np.stack(pixels), np.asarray(times, np.float64), info, decoded)


def box_overruns(data: bytes) -> bool:
    """Whether an ISO-BMFF file's top-level boxes run past its end: a file cut short (an
    MP4 written index-last loses its `moov` first)."""
    if data[4:8] != b"ftyp":
        return False
    position = 0
    while position + 8 <= len(data):
        size = int.from_bytes(data[position:position + 4], "big")
        if size == 1 and position + 16 <= len(data):
            size = int.from_bytes(data[position + 8:position + 16], "big")
        if size == 0:  # the last box, to the end of the file
            return False
        if size < 8 or position + size > len(data):
            return True
        position += size
    return position != len(data)


def _info(container, stream) -> VideoInfo:
    context = stream.codec_context
    if stream.duration is not None and stream.time_base is not None:
        duration = float(stream.duration * stream.time_base)
    elif container.duration is not None:
        duration = container.duration / 1_000_000  # AV_TIME_BASE units
    else:
        duration = 0.0
    return VideoInfo(container=container.format.name, codec=context.name or "unknown",
                     width=int(context.width or 0), height=int(context.height or 0),
                     duration_s=duration)


def _check(info: VideoInfo, limits: VideoLimits) -> None:
    """The header's claims against the limits, before anything is decoded."""
    if info.width <= 0 or info.height <= 0:
        raise VideoError("corrupt", f"invalid frame size {info.width}x{info.height}")
    if info.width * info.height > limits.max_pixels:
        raise VideoError("too-large", f"{info.width}x{info.height} frames exceed "
                         f"{limits.max_pixels} pixels")
    if info.duration_s > limits.max_duration_s:
        raise VideoError("too-large", f"{info.duration_s:.0f} s exceeds the limit of "
                         f"{limits.max_duration_s:.0f} s")
    if info.duration_s <= 0:
        raise VideoError("corrupt", "the container states no duration")


class _Sampler:
    """Frames at increasing target times, each decoded once: the decoder goes on forward
    from the last frame while the next target is within `frames_per_seek` frames of it
    (cheaper than a seek, which starts again at a keyframe), and seeks otherwise."""

    def __init__(self, container, stream, rate: float, limits: VideoLimits):
        self.container, self.stream, self.rate, self.limits = container, stream, rate, limits
        self.frames = None  # the decoder's frames since the last seek
        self.last = None  # the last frame decoded
        self.ended = False  # the stream ended after `last`
        self.decoded = 0

    def frame_at(self, target: float):
        """(the first frame at or after `target` s, or the last one before it when the
        budget runs out or the stream ends; whether the stream ended first)."""
        last_time = None if self.last is None else self.last.time
        if last_time is not None and last_time >= target:
            return self.last, self.ended  # an earlier target's frame is already past this one
        if self.ended:
            return self.last, True
        if self.frames is None or last_time is None or \
                (target - last_time) * self.rate > self.limits.frames_per_seek:
            self.container.seek(int(target / self.stream.time_base), stream=self.stream,
                                backward=True, any_frame=False)
            self.frames = self.container.decode(self.stream)
        return self._decode_to(target)

    def _decode_to(self, target: float):
        import av

        budget = self.limits.frames_per_seek
        try:
            for frame in self.frames:
                self.decoded, budget = self.decoded + 1, budget - 1
                self.last = frame
                if frame.time is None or frame.time >= target or budget <= 0:
                    return frame, False
        except av.FFmpegError as exc:
            if self.last is None or not _is_end(exc):
                raise VideoError("truncated" if _is_end(exc) else "corrupt",
                                 f"decoding failed: {exc}") from None
        self.ended = True
        return self.last, True


def _is_end(exc: Exception) -> bool:
    import av

    return isinstance(exc, av.EOFError) or "end of file" in str(exc).lower()


def _open_error(data: bytes, exc: Exception) -> VideoError:
    message = str(exc) or type(exc).__name__
    if looks_like_video(data[:16]):  # a container we know, cut short or damaged
        if box_overruns(data):
            return VideoError("truncated", f"the data ends inside a box its header declares "
                              f"(FFmpeg: {message})")
        return VideoError("corrupt", message)
    return VideoError("not-a-video", f"not a recognised video container ({message})")
