"""Object reads every job uses: retried, many in flight, and sniffed when a name does not
say what the object is."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable
from typing import NamedTuple, TypeVar

from detector.io import preprocess, storage, video

READ_ATTEMPTS = 3
SNIFF_BYTES = 64 * 1024  # what is read of an object not named as an image to identify it
T = TypeVar("T")
_READ_THREADS = 8  # object-store reads are latency-bound; overlap them within a task


class Fetched(NamedTuple):
    """An object's bytes, or why there are none; `bytes_read` counts what was downloaded."""

    data: bytes | None
    error: str | None = None
    detail: str | None = None
    bytes_read: int = 0


def _with_retries(read: Callable[[], T]) -> T:
    for attempt in range(READ_ATTEMPTS):
        try:
            return read()
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == READ_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def fetch(uri: str, size: int | None = None, videos: bool = False) -> Fetched:
    """Read an object, retrying transient failures. One whose name does not say it is an
    image (no extension, or one Pillow does not know) and that is larger than
    `SNIFF_BYTES` is sniffed: its first `SNIFF_BYTES` are read, and the rest only when
    they can start an image (or, with `videos`, a video container), so a large log or
    archive under a bare key costs 64 KiB."""
    wanted = _image_or_video if videos else preprocess.could_be_image
    try:
        if preprocess.named_as_image(uri) or (size is not None and size <= SNIFF_BYTES):
            blob = _with_retries(lambda: storage.read_bytes(uri))
            return Fetched(blob, bytes_read=len(blob))
        blob, whole = _with_retries(lambda: storage.read_prefix(uri, SNIFF_BYTES, wanted))
    except FileNotFoundError as exc:
        return Fetched(None, "vanished", str(exc))
    except OSError as exc:
        return Fetched(None, "read-failed", str(exc))
    if not whole:
        what = "image or video" if videos else "image"
        return Fetched(None, "not-an-image", f"not a recognised {what} format (its first "
                       f"{len(blob)} bytes match no {what} signature; the rest was not "
                       "read)", len(blob))
    return Fetched(blob, bytes_read=len(blob))


def _image_or_video(head: bytes) -> bool:
    return preprocess.could_be_image(head) or video.looks_like_video(head)


def fetch_many(uris: list[str], sizes: list[int | None] | None = None,
               videos: bool = False) -> list[Fetched]:
    """`fetch` for each URI (with its listed size, when known), `_READ_THREADS` reads in
    flight (they wait on storage)."""
    with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
        return list(pool.map(lambda uri, size: fetch(uri, size, videos), uris,
                             sizes or [None] * len(uris)))
