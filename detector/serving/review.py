"""The review page's data: the rows of a committed scan report worth a human's time, and
thumbnails of their images.

A row is worth reviewing when
    uncertain       its score fell in the uncertain band
    classifier-ai   the classifier alone called it AI-generated (no provenance said so)
    mixed-group     it is in a near-duplicate group whose members got different verdicts
                    (the report's `_near_duplicates.parquet`, which HTTP scans write)
Rows are listed in report order (parts by name, rows by URI), a page at a time: memory
holds one part and one page, never the whole report. Thumbnails are the square the model
scored, decoded by the one preprocessing path, for URIs under the app's scan allow-list;
a video's is its middle frame, sampled as a scan samples frames.
"""

from __future__ import annotations

import io
from typing import Any

from detector.io import preprocess, storage, video
from detector.scanning import report

REASONS = ("uncertain", "classifier-ai", "mixed-group")
COLUMNS = ["uri", "score_ai", "verdict", "decided_by", "evidence", "generator",
           "generator_scores", "media", "format", "width", "height", "worst_frame_s",
           "threshold", "model"]
THUMBNAIL_PX = 160


def mixed_groups(out: str) -> dict[str, dict[str, Any]]:
    """uri -> {group, group_size, group_verdicts} for the members of near-duplicate groups
    whose verdicts differ ({} when the scan did not group near-duplicates)."""
    import pyarrow.parquet as pq

    uri = storage.join(out, report.NEAR_DUPLICATES)
    if not storage.exists(uri):
        return {}
    fs, path = storage.resolve(uri)
    rows = pq.read_table(path, filesystem=fs).to_pylist()
    verdicts: dict[str, set[str]] = {}
    for row in rows:
        verdicts.setdefault(row["group"], set()).add(row["verdict"])
    return {row["uri"]: {"group": row["group"], "group_size": row["group_size"],
                         "group_verdicts": sorted(v for v in verdicts[row["group"]] if v)}
            for row in rows if len(verdicts[row["group"]]) > 1}


def reason(row: dict[str, Any], groups: dict[str, dict]) -> str | None:
    """Why a report row is worth a human's time, or None."""
    if row["verdict"] == "uncertain":
        return "uncertain"
    if row["verdict"] == "ai-generated" and row["decided_by"] == "classifier":
        return "classifier-ai"
    if row["uri"] in groups:
        return "mixed-group"
    return None


def review_page(out: str, offset: int = 0, limit: int = 50) -> dict[str, Any]:
    """{report, model, total, offset, rows, by_reason}: the rows worth reviewing of the
    committed report at `out`, `limit` of them from `offset`. Raises FileNotFoundError for
    a prefix that holds no committed report."""
    try:
        manifest = report.read_manifest(out)
    except (OSError, ValueError) as exc:  # no manifest, an unreadable or malformed one
        raise FileNotFoundError(f"{out}: {exc}") from None
    groups = mixed_groups(out)
    rows: list[dict[str, Any]] = []
    total, by_reason = 0, dict.fromkeys(REASONS, 0)
    for name in report.part_files(out):
        for row in report.read_part(out, name).select(COLUMNS).to_pylist():
            why = reason(row, groups)
            if why is None:
                continue
            by_reason[why] += 1
            if offset <= total < offset + limit:
                rows.append({**row, "reason": why, **groups.get(row["uri"], {})})
            total += 1
    return {"report": out, "model": manifest.get("model"), "total": total, "offset": offset,
            "rows": rows, "by_reason": by_reason}


class TooLarge(Exception):
    """An object larger than the app accepts."""


def read_image(uri: str, max_bytes: int) -> bytes:
    """An object's bytes; FileNotFoundError when there is none (or none readable: a
    malformed URI), TooLarge when it is larger than `max_bytes` (checked first)."""
    import pyarrow.fs as pafs

    try:
        fs, path = storage.resolve(uri)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(uri)
        if info.size > max_bytes:
            raise TooLarge(f"{info.size} bytes exceeds the limit of {max_bytes}")
        return storage.read_bytes(uri)
    except (OSError, ValueError) as exc:  # pyarrow's errors for a path it cannot read
        raise FileNotFoundError(f"{uri}: {exc}") from None


def thumbnail(blob: bytes, max_bytes: int, max_pixels: int,
              video_limits: video.VideoLimits | None = None) -> bytes:
    """A PNG of the square the model scores, THUMBNAIL_PX wide (a video's: its middle
    frame, within `video_limits`). Raises ImageError (VideoError is one)."""
    from PIL import Image

    if video_limits is not None and video.looks_like_video(blob[:16]):
        pixels = video.sample_frames(blob, THUMBNAIL_PX, 1, video_limits).pixels[0]
    else:
        pixels, _ = preprocess.load_image(blob, THUMBNAIL_PX, max_bytes=max_bytes,
                                          max_pixels=max_pixels)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def media_type(blob: bytes) -> str:
    """The image/* or video/* type of an original's bytes, for serving them back as they
    are."""
    from PIL import Image

    if kind := video.media_type(blob[:16]):
        return kind
    preprocess.register_formats()
    try:
        with Image.open(io.BytesIO(blob)) as img:
            kind = Image.MIME.get(img.format or "")
    except Exception:  # not decodable: served as bytes, the page shows the error
        kind = None
    return kind or "application/octet-stream"
