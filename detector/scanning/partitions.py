"""Report partitions: runs of consecutive objects of one listing range, each committed as
one Parquet part.

A partition is named by its range and its lower bound (the key it starts after), so the
same listing cuts into the same partitions on every run. Resumed scans keep the bounds of
the parts already committed: objects added since then join the partition whose span
holds them, and only the spans between committed parts are cut afresh. That keeps each
object's partition, and so the part its old row lives in, stable across runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from detector.io.listing import Listed


@dataclass(frozen=True)
class Span:
    """Where a committed part sits in its range: keys in (`after`, `last`]."""

    after: str | None
    last: str


@dataclass
class Partition:
    range_id: str
    after: str | None
    last: str | None = None
    objects: list[Listed] = field(default_factory=list)
    fixed: bool = False  # its span comes from a committed part: keep it whatever the count

    @property
    def id(self) -> str:
        return partition_id(self.range_id, self.after)

    @property
    def span(self) -> Span:
        return Span(self.after, self.last or "")


def partition_id(range_id: str, after: str | None) -> str:
    digest = hashlib.sha1((after or "").encode()).hexdigest()[:10]
    return f"{range_id}-{digest}"


def cut(objects: Iterable[Listed], range_id: str, size: int,
        spans: Iterable[Span] = ()) -> Iterator[Partition]:
    """Cut a range's objects (in key order) into partitions of at most `size` objects,
    except that objects inside a known `span` always form that span's partition."""
    known = sorted(spans, key=lambda s: s.last)
    i, boundary, current = 0, None, None
    gap_end: str | None = None
    for obj in objects:
        while True:
            if current is None:
                while i < len(known) and known[i].last < obj.key:
                    i += 1  # a span whose objects are all gone now
                if i < len(known) and (known[i].after is None or known[i].after < obj.key):
                    current = Partition(range_id, known[i].after, known[i].last, fixed=True)
                    i += 1
                else:  # between spans: cut by size, up to where the next span starts
                    gap_end = known[i].after if i < len(known) else None
                    current = Partition(range_id, boundary)
            if current.fixed:
                fits = obj.key <= current.last
            else:
                fits = len(current.objects) < size and (gap_end is None or obj.key <= gap_end)
            if fits:
                current.objects.append(obj)
                break
            yield _closed(current)
            boundary, current = current.last, None
    if current is not None:
        yield _closed(current)


def _closed(partition: Partition) -> Partition:
    if not partition.fixed:
        partition.last = partition.objects[-1].key
    return partition
