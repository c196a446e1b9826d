"""How far listing may run ahead of scoring, counted in objects.

Ray Data's backpressure in 2.60 budgets object-store bytes. Listed keys are tiny, so
nothing held the listing tasks back: a 2M-object bucket was listed long before it was
scored, and the driver, which owns every queued block, grew by ~0.25 KB per queued key
(1.2 GB at 2M). The gate is a small actor the listing tasks ask before they emit a
partition's objects; the driver hands rows back as the writer reports them done. So the
objects between listing and the writer stay under a window, whatever the bucket's size.

Rows are handed back as they reach the writer, not when their partition commits: a
partition lost with a dead writer (listed again in the next pass) has reached it already,
so a loss can never hold the gate shut.

A waiting listing task may still hold rows it emitted: Ray Data gathers a task's output
into blocks of `target_max_block_size` bytes before passing any on, so the last < 1 block
it emitted cannot reach the writer while it waits. Each task says how many rows that can
be (`Admission`), and the gate counts only the others as moving: it never waits for rows
that wait for it. Should the books disagree anyway, it opens for one partition after
`patience_s` without any progress: a stalled pipeline is no worse than one without it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
import uuid

import pyarrow as pa

MIN_WINDOW_ROWS = 16_384  # keeps a large cluster busy when partitions are small
PARTITIONS_AHEAD = 2  # one being scored, the next one listed and queued
PATIENCE_S = 60.0


def window_rows(partition_size: int, asked: int | None = None, held_downstream: int = 0) -> int:
    """Objects that may be listed and not yet written: as asked, or two partitions and at
    least 16k; never less than a partition plus twice what later stages may hold back
    while they gather a block or a batch (`held_downstream`), or the gate could wait for
    rows that wait for more rows."""
    window = asked or max(PARTITIONS_AHEAD * partition_size, MIN_WINDOW_ROWS)
    return max(window, partition_size + 2 * held_downstream)


class ListingGate:
    """Ray actor (async, no CPU): admits listed partitions while the rows in flight
    fit the window. The first partition is always admitted, however large."""

    def __init__(self, window: int, patience_s: float = PATIENCE_S):
        self.window, self.patience_s = window, patience_s
        self.in_flight = 0
        self.most_in_flight = 0
        self.most_held = 0  # the most rows waiting tasks held unsent at once
        self.forced = 0  # partitions let through after `patience_s` without progress
        self.held: dict[str, int] = {}  # waiting task -> rows it may hold unsent
        self.last_move = time.monotonic()
        self.moved = asyncio.Condition()

    async def admit(self, rows: int, task: str = "", unsent: int = 0) -> None:
        """Returns once `rows` more objects may be listed. `unsent`: rows the asking
        task emitted that may not have left it yet."""
        async with self.moved:
            self.held[task] = unsent
            self.most_held = max(self.most_held, sum(self.held.values()))
            try:
                while not self._fits(rows):
                    waited = time.monotonic() - self.last_move
                    if waited >= self.patience_s:
                        self.forced += 1  # nothing moved for long: let one partition through
                        break
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.moved.wait(), self.patience_s - waited)
            finally:
                del self.held[task]
            self.in_flight += rows
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.last_move = time.monotonic()
            self.moved.notify_all()  # what others wait on may be held no longer

    def _fits(self, rows: int) -> bool:
        moving = self.in_flight - sum(self.held.values())
        return moving <= 0 or moving + rows <= self.window

    async def release(self, rows: int) -> None:
        """`rows` objects reached the writer."""
        async with self.moved:
            self.in_flight = max(self.in_flight - rows, 0)
            self.last_move = time.monotonic()
            self.moved.notify_all()

    def stats(self) -> dict:
        return {"window": self.window, "in_flight": self.in_flight,
                "most_in_flight": self.most_in_flight, "most_held": self.most_held,
                "forced": self.forced}


class Admission:
    """A listing task's side of the gate: `emitted(table)` for every table it yields,
    `admit(rows)` before it lists a partition's objects."""

    def __init__(self, gate, block_bytes: int):
        self.gate, self.block_bytes = gate, block_bytes
        self.task = uuid.uuid4().hex
        self.recent: collections.deque[tuple[int, int]] = collections.deque()  # rows, bytes

    def emitted(self, table: pa.Table) -> pa.Table:
        self.recent.append((table.num_rows, table.nbytes))
        # Keep the shortest run of recent tables that fills a block: Ray Data's buffer
        # passes a block on as soon as it holds one, so it holds less, all within the run.
        while len(self.recent) > 1 and \
                sum(b for _, b in self.recent) - self.recent[0][1] >= self.block_bytes:
            self.recent.popleft()
        return table

    def admit(self, rows: int) -> None:
        import ray

        unsent = sum(r for r, _ in self.recent)
        ray.get(self.gate.admit.remote(rows, self.task, unsent))


def start(window: int):
    """A gate for one pass of a scan (the caller kills it after the pass). It lives on
    the driver's node when it can: it holds no resources, so an autoscaler would count a
    worker node with only the gate on it as idle and remove it. Elsewhere, or if its node
    is lost anyway, it comes back with empty books, which can only admit more."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(ListingGate).options(
        scheduling_strategy=here).remote(window)
