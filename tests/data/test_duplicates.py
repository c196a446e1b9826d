"""Near-duplicate grouping (detector.data.duplicates)."""

import io

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.unit


def brute_force(hashes: np.ndarray, distance: int) -> set[tuple[int, int]]:
    near = np.bitwise_count(hashes[:, None] ^ hashes[None, :]) <= distance
    return {(i, j) for i, j in zip(*np.nonzero(np.triu(near, k=1)), strict=True)}


@pytest.mark.parametrize("distance", [0, 2, 4, 6])
def test_candidate_pairs_find_every_pair_within_the_distance(distance):
    from detector.data.duplicates import candidate_pairs

    rng = np.random.default_rng(distance)
    base = rng.integers(0, 2**63, 300, dtype=np.int64).astype(np.uint64) * np.uint64(2)
    flips = [np.uint64(sum(1 << int(b) for b in rng.choice(64, k, replace=False)))
             for k in rng.integers(0, distance + 3, 300)]
    hashes = np.concatenate([base, base ^ np.array(flips, dtype=np.uint64)])
    found = set(candidate_pairs(hashes, distance))
    assert found == brute_force(hashes, distance)  # none missed, none too far


def test_groups_are_connected_components():
    from detector.data.duplicates import groups, summary

    a = 0x0123456789ABCDEF
    # b and c are 3 bits from a but 6 from each other; d is 16 bits from a.
    chain = [a, a ^ 0b111, a ^ 0b111_000_000, a ^ (0xFFFF << 40)]
    labels = groups(np.array(chain, dtype=np.uint64), distance=4)
    pairs = brute_force(np.array(chain, dtype=np.uint64), 4)
    assert pairs == {(0, 1), (0, 2)}
    assert labels.tolist() == [0, 0, 0, 3]  # c joins through a; d is far from all
    assert summary(labels) == {"groups": 1, "images": 3}


def test_resized_and_reencoded_copies_hash_close_and_other_scenes_far():
    from detector.data.duplicates import DEFAULT_DISTANCE, phash, to_ints
    from detector.data.sample import make_image
    from detector.io import preprocess

    rng = np.random.default_rng(0)
    originals = [make_image(label, rng, (160, 120)) for label in (0, 1) for _ in range(6)]
    near, far = [], []
    for index, original in enumerate(originals):
        copies = []
        for size, fmt in [((160, 120), "PNG"), ((80, 60), "JPEG"), ((120, 90), "WEBP")]:
            buffer = io.BytesIO()
            Image.fromarray(original).resize(size).save(buffer, fmt)
            copies.append(phash(preprocess.load_image(buffer.getvalue(), 48)[0]))
        ints = to_ints(copies)
        near += np.bitwise_count(ints[0] ^ ints[1:]).tolist()
        other = originals[(index + 1) % len(originals)]
        buffer = io.BytesIO()
        Image.fromarray(other).save(buffer, "PNG")
        far.append(int(np.bitwise_count(ints[0] ^ to_ints(
            [phash(preprocess.load_image(buffer.getvalue(), 48)[0])])[0])))
    assert max(near) <= DEFAULT_DISTANCE, near  # measured: 0-6
    assert min(far) > 3 * DEFAULT_DISTANCE, far  # measured: 26-34


def test_the_shards_fingerprint_changes_with_what_decides_the_splits():
    import dataclasses

    from detector.config import PrepareConfig
    from detector.data.prepare import shards_fingerprint

    config = PrepareConfig(real=("r",), fake=("f",), out="o")
    same = shards_fingerprint("abc", config)
    assert same == shards_fingerprint("abc", dataclasses.replace(config, out="elsewhere"))
    others = {shards_fingerprint("abd", config)} | {
        shards_fingerprint("abc", dataclasses.replace(config, **change))
        for change in ({"seed": 1}, {"split": (0.8, 0.1, 0.1)}, {"near_duplicates": -1})}
    assert len(others) == 4 and same not in others
