"""Ray Data reads of Parquet files, with a footer-reading pool sized to the files.

Ray Data 2.60 reads every file's footer on a pool of actors before it reads a row: 32 of
them by default (`RAY_DATA_PARQUET_FOOTER_NUM_ACTORS`), provisioned by each listing task
(the pool's size is read in the driver, when the dataset is made). Each actor is a new
worker process, about 1 s of CPU to start, and asks for a CPU to be scheduled. So reading
three shard files asked for 32 actors and started as many processes as there were CPUs
free to schedule them, and a listing task could wait for CPUs its own pool held.
Measured on 2 cores (`bench/parquet_reads.py`): three files read in 4.5 s and 8.9 CPU s,
0.9 s and 1.0 CPU s with a pool sized here; a frozen-base training job took 67 s and
129 CPU s, 53 s and 100 CPU s.

One actor reads footers 10 files to a call (`RAY_DATA_PARQUET_FOOTER_BATCH_SIZE`), 128 at a
time, so the pool here is one actor per 10 files, up to Ray's 32. A pool size set in the
environment wins, as it does in Ray.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from collections.abc import Iterator
from typing import Any

POOL_SETTING = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
FILES_PER_FOOTER_READER = 10  # Ray Data's footer batch
MOST_FOOTER_READERS = 32  # Ray Data's default pool

_environment = threading.Lock()  # the setting is read from os.environ: one read at a time


def footer_readers(files: int) -> int:
    """How many footer-reading actors a read of `files` Parquet files gets."""
    return max(1, min(MOST_FOOTER_READERS, math.ceil(files / FILES_PER_FOOTER_READER)))


def count_files(fs, paths: list[str]) -> int:
    """The Parquet files under `paths` (files, or directories read whole). A path named
    `*.parquet` counts as one file without a request (a split of a thousand parts on S3
    would otherwise cost a thousand HEADs before every read); any other path is looked up,
    and a directory listed."""
    import pyarrow.fs as pafs

    total = 0
    for path in paths:
        if path.endswith(".parquet"):
            total += 1
        elif fs.get_file_info(path).type == pafs.FileType.Directory:
            found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            total += sum(1 for each in found if each.type == pafs.FileType.File)
        else:
            total += 1
    return total


@contextlib.contextmanager
def _footer_pool(size: int) -> Iterator[None]:
    """Ray reads the pool size from the environment when a read is made; set it for that
    call alone, unless the user set it."""
    # Ray's module also reads the setting once, as its default, when first imported: import
    # it before setting ours, so reads made without this module keep Ray's own default.
    with contextlib.suppress(ImportError):
        import ray.data._internal.datasource_v2.formats.parquet.footer_file_indexer  # noqa: F401
    with _environment:
        if POOL_SETTING in os.environ:
            yield
            return
        os.environ[POOL_SETTING] = str(size)
        try:
            yield
        finally:
            del os.environ[POOL_SETTING]


def read_parquet(paths: list[str], filesystem, **options: Any):
    """`ray.data.read_parquet(paths, filesystem=filesystem, **options)`, its footers read
    by a pool sized to the files (the listing tasks take the size with the read)."""
    import ray

    with _footer_pool(footer_readers(count_files(filesystem, paths))):
        return ray.data.read_parquet(paths, filesystem=filesystem, **options)
