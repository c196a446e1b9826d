"""Near-duplicate grouping (`detector.data.duplicates.groups`) against an all-pairs baseline.

    .venv/bin/python bench/duplicates.py [--n 20000] [--copies 0.1] [--json OUT]

Hashes are made here, seeded: `n` random 64-bit pHashes, and for a `--copies` share of
them a copy 1-6 bits away (what resized and re-encoded copies measured on the sample
data). The baseline is what one would write first: compare every pair (popcount of the
XOR, vectorised by rows of 2,048) and take connected components of the pairs within 6
bits. Both must find the same groups; the bench prints seconds and the ratio, and how the
multi-index time grows from n/4 to n.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from _measure import save_json

from detector.data import duplicates


def make_hashes(n: int, copies: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) \
        + rng.integers(0, 2, n).astype(np.uint64)
    count = int(n * copies)
    flips = [sum(1 << int(b) for b in rng.choice(64, int(k), replace=False))
             for k in rng.integers(1, 7, count)]
    return np.concatenate([base, base[:count] ^ np.array(flips, dtype=np.uint64)])


def all_pairs_groups(hashes: np.ndarray, distance: int) -> np.ndarray:
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    rows, cols = [], []
    for start in range(0, len(hashes), 2048):
        block = np.bitwise_count(hashes[start:start + 2048, None] ^ hashes[None, :])
        r, c = np.nonzero(block <= distance)
        rows.append(r + start)
        cols.append(c)
    rows, cols = np.concatenate(rows), np.concatenate(cols)
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(hashes),) * 2)
    return connected_components(graph, directed=False)[1]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--copies", type=float, default=0.1)
    parser.add_argument("--json", default="bench/results/duplicates.json")
    args = parser.parse_args()
    distance = duplicates.DEFAULT_DISTANCE
    hashes = make_hashes(args.n, args.copies)

    started = time.perf_counter()
    fast = duplicates.groups(hashes, distance)
    fast_s = time.perf_counter() - started
    started = time.perf_counter()
    slow = all_pairs_groups(hashes, distance)
    slow_s = time.perf_counter() - started
    assert same_partition(fast, slow), "multi-index and all-pairs grouping disagree"
    quarter = make_hashes(args.n // 4, args.copies, seed=1)
    started = time.perf_counter()
    duplicates.groups(quarter, distance)
    quarter_s = time.perf_counter() - started

    result = {"hashes": len(hashes), "distance": distance, **duplicates.summary(fast),
              "multi_index_s": round(fast_s, 3), "all_pairs_s": round(slow_s, 3),
              "speedup": round(slow_s / fast_s, 1), "quarter_hashes": len(quarter),
              "quarter_s": round(quarter_s, 3), "growth_4x_n": round(fast_s / quarter_s, 2)}
    print(f"{len(hashes):,} hashes, {result['groups']:,} groups within {distance} bits")
    print(f"  all pairs:   {slow_s:8.3f} s")
    print(f"  multi-index: {fast_s:8.3f} s   ({result['speedup']}x faster, same groups)")
    print(f"  4x the hashes cost {result['growth_4x_n']}x the time")
    save_json(args.json, result)


if __name__ == "__main__":
    main()
