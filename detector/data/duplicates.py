"""Near-duplicate images: a perceptual hash per image and the groups they form.

The hash is imagehash's pHash (64 bits: the signs of the lowest 8x8 DCT frequencies of a
32x32 greyscale) of the model's own view of the image, the decoded centre square, so a
resized, re-encoded or re-compressed copy hashes within a few bits of its original while
different scenes differ in ~half of them (measured on the sample data: 2 vs ~30).

Grouping links images whose hashes differ in at most `distance` bits and takes the
connected components. Candidates come from multi-index hashing: the 64 bits are cut into
`distance + 1` bands, and two hashes within `distance` bits agree exactly on at least one
band (pigeonhole), so only images sharing a band value are compared. Work and memory
grow with the number of images (8 bytes each) plus the pairs sharing a band value.
"""

from __future__ import annotations

import itertools

import numpy as np

from detector.config import DEFAULT_DISTANCE


def phash(pixels: np.ndarray) -> str:
    """pHash of an HxWx3 uint8 image as 16 hex digits."""
    import imagehash
    from PIL import Image

    return str(imagehash.phash(Image.fromarray(pixels)))


def to_ints(hashes: list[str]) -> np.ndarray:
    return np.array([int(h, 16) for h in hashes], dtype=np.uint64)


def groups(hashes: np.ndarray, distance: int = DEFAULT_DISTANCE) -> np.ndarray:
    """A group label per hash: the lowest index in its group (its own for a singleton)."""
    count = len(hashes)
    parent = np.arange(count)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for left, right in candidate_pairs(hashes, distance):
        a, b = root(left), root(right)
        if a != b:
            parent[max(a, b)] = min(a, b)
    return np.array([root(i) for i in range(count)])


def candidate_pairs(hashes: np.ndarray, distance: int):
    """(i, j) with i < j whose hashes differ in at most `distance` bits (each pair once
    per band it shares; union-find does not mind)."""
    hashes = np.asarray(hashes, dtype=np.uint64)
    bands = distance + 1
    edges = np.linspace(0, 64, bands + 1).astype(int)
    for low, high in itertools.pairwise(edges.tolist()):
        mask = np.uint64((1 << (high - low)) - 1)
        keys = (hashes >> np.uint64(low)) & mask
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
        ends = np.r_[starts[1:], len(order)]
        for start, end in zip(starts, ends, strict=True):
            if end - start < 2:
                continue
            members = order[start:end]
            near = np.bitwise_count(hashes[members][:, None] ^ hashes[members][None, :]) \
                <= distance
            rows, cols = np.nonzero(np.triu(near, k=1))
            yield from zip(members[rows].tolist(), members[cols].tolist(), strict=True)


def summary(labels: np.ndarray) -> dict[str, int]:
    """How many groups of two or more there are, and how many images they hold."""
    _, sizes = np.unique(labels, return_counts=True)
    return {"groups": int((sizes > 1).sum()), "images": int(sizes[sizes > 1].sum())}
