"""Which listed objects a scan or prepare reads: by content, unless the name rules it out.

Upload buckets name objects by UUID or content hash, with no extension or the wrong one,
so a name cannot say what is an image. Every listed object is read and identified by its
bytes (decoding says `not-an-image` for what is not one), except:

    excluded-by-rule    an extension that names a known non-image type (json, txt, ...)
    video               a video extension (mp4, mov, ...) where videos are not read
                        (`Selection.videos` off: training data, `detector scan --video skip`)
    excluded-by-glob    a name matching an `--exclude` glob
    not-included        with `--include` globs given, a name matching none of them

Every object not read is counted by reason and extension, with the first few as
examples, in a bounded `NotSelected`: the accounting never grows with the bucket.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections import Counter
from dataclasses import dataclass

# Extensions of files that sit beside images in buckets and are never images.
NON_IMAGE_EXTENSIONS = frozenset({
    "json", "jsonl", "txt", "md", "csv", "tsv", "parquet", "xml", "yaml", "yml", "html",
    "htm", "log", "pdf", "zip", "gz", "tgz", "tar", "7z", "bz2", "xz", "zst", "doc", "docx",
    "xls", "xlsx", "ppt", "pptx", "js", "css", "py", "sh", "mp3", "wav", "flac", "ogg",
    "m4a", "aac", "pt", "pth", "ckpt", "safetensors", "onnx", "bin", "db", "sqlite",
})
VIDEO_EXTENSIONS = frozenset({"mp4", "m4v", "mov", "webm", "mkv", "avi", "wmv", "mpg",
                              "mpeg", "3gp", "flv", "ts", "mts"})
NO_EXTENSION = "(none)"
MAX_EXTENSIONS = 64  # keys per reason at most; extensions past them count as "(other)"
OTHER = "(other)"
EXAMPLES = 5  # object URIs kept per reason, for `--explain-selection`


def extension(name: str) -> str:
    """The lower-case extension of a key's last part, or "(none)"."""
    ext = posixpath.splitext(posixpath.basename(name))[1].lstrip(".").lower()
    return ext or NO_EXTENSION


@dataclass(frozen=True)
class Selection:
    """The rules: `include` globs select by name instead of by content; `exclude` globs
    drop names. Both are matched case-insensitively against the key's last part.
    `videos`: objects named as videos are read too (a scan scores them)."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    videos: bool = False

    def __post_init__(self) -> None:
        # Lower-cased once here, not for every listed key.
        object.__setattr__(self, "include", tuple(p.lower() for p in self.include))
        object.__setattr__(self, "exclude", tuple(p.lower() for p in self.exclude))

    def reason(self, uri: str) -> str | None:
        """None when the object at `uri` is read; otherwise why it is not."""
        name = posixpath.basename(uri).lower()
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return "excluded-by-glob"
        if self.include:
            matched = any(fnmatch.fnmatchcase(name, p) for p in self.include)
            return None if matched else "not-included"
        ext = extension(name)
        if ext in VIDEO_EXTENSIONS:
            return None if self.videos else "video"
        if ext in NON_IMAGE_EXTENSIONS:
            return "excluded-by-rule"
        return None


class NotSelected:
    """Objects not read, by reason and extension, with a few examples: bounded."""

    def __init__(self, data: dict | None = None):
        self.counts: dict[str, Counter] = {}
        self.examples: dict[str, list[str]] = {}
        if data:
            self.merge(data)

    def add(self, reason: str, uri: str) -> None:
        self._count(reason, extension(uri), 1)
        examples = self.examples.setdefault(reason, [])
        if len(examples) < EXAMPLES:
            examples.append(uri)

    def merge(self, data: dict) -> None:
        """Add the counts of another `to_dict()` (one listing range's, say)."""
        for reason, entry in data.get("by_reason", {}).items():
            for ext, count in entry["by_extension"].items():
                self._count(reason, ext, count)
            examples = self.examples.setdefault(reason, [])
            examples.extend(entry["examples"][: EXAMPLES - len(examples)])

    def _count(self, reason: str, ext: str, count: int) -> None:
        counts = self.counts.setdefault(reason, Counter())
        if ext not in counts and len(counts) >= MAX_EXTENSIONS - 1:
            ext = OTHER  # the last of MAX_EXTENSIONS keys
        counts[ext] += count

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def to_dict(self) -> dict:
        return {"total": self.total, "by_reason": {
            reason: {"count": sum(counts.values()),
                     "by_extension": dict(counts.most_common()),
                     "examples": self.examples.get(reason, [])}
            for reason, counts in sorted(self.counts.items())}}

    def summary(self) -> str:
        """One line, e.g. "12 objects: excluded-by-rule 10 (json 10); video 2 (mp4 2)"."""
        if not self.total:
            return "none (every listed object was read)"
        parts = [f"{reason} {sum(counts.values())} (" + ", ".join(
            f"{ext} {n}" for ext, n in counts.most_common(4)) +
            (", ..." if len(counts) > 4 else "") + ")"
            for reason, counts in sorted(self.counts.items())]
        return f"{self.total} objects: " + "; ".join(parts)
