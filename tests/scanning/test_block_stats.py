"""The scan driver's memory stays flat: Ray Data's per-block stats records, which it keeps
in the driver for the whole run, are forgotten as a pipeline goes (see scan.py)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.ray

BLOCKS = 120


def most_records(forget: bool) -> list[int | None]:
    """Runs a BLOCKS-block two-operator pipeline, with the scan's callback or without, and
    returns the most stats records any operator held at each step of the execution loop
    (None where no operator has the field)."""
    import ray
    from ray.data._internal.execution.execution_callback import ExecutionCallback

    from detector.scanning.scan import _block_stats_forgetter

    seen: list[int | None] = []
    base = _block_stats_forgetter() if forget else ExecutionCallback

    class Observe(base):
        def on_execution_step(self, executor) -> None:
            super().on_execution_step(executor)
            held = [len(op._output_blocks_stats) for op in executor._topology
                    if hasattr(op, "_output_blocks_stats")]
            seen.append(max(held) if held else None)

    context = ray.data.DataContext.get_current()
    saved = context.custom_execution_callback_classes
    context.custom_execution_callback_classes = [Observe]
    try:
        dataset = ray.data.range(BLOCKS * 4, override_num_blocks=BLOCKS).map_batches(
            lambda batch: batch, batch_size=None)
        assert sum(len(b["id"]) for b in dataset.iter_batches(batch_size=None)) == BLOCKS * 4
    finally:
        context.custom_execution_callback_classes = saved
    return seen


def test_per_block_stats_are_forgotten_as_the_pipeline_goes(local_ray, monkeypatch):
    from detector.scanning import scan

    monkeypatch.setattr(scan, "BLOCK_STATS_KEPT", 10)
    # Without the callback the records pile up, one per block: what made the driver grow.
    kept = [n for n in most_records(forget=False) if n is not None]
    assert kept and max(kept) >= BLOCKS * 0.9, kept[-5:]
    # With it, no operator holds many more than BLOCK_STATS_KEPT at any step (a step can
    # hand on a few blocks at once); a Ray release without the field fails here.
    forgotten = most_records(forget=True)
    assert forgotten and None not in forgotten
    assert max(forgotten) <= 10 + 8, forgotten
