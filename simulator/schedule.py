"""The schedule a mapped kernel is timed with, kept compactly: the plan and each core's
share, never the tiles themselves (simulator.decompose expands those when a functional
check needs them). One record per kernel (stage) of a Task, made where the kernel's
per-core work is computed, so what is checked is what is timed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Range = tuple[int, int]


def spans(start: int, stop: int, parts: int) -> tuple[Range, ...]:
    """[start, stop) cut into `parts` near-equal consecutive ranges, the longer ones first;
    fewer, one element each, where it is shorter than `parts` (one empty range if empty)."""
    used = max(1, min(parts, stop - start))
    base, extra = divmod(stop - start, used)
    out = []
    for index in range(used):
        end = start + base + (1 if index < extra else 0)
        out.append((start, end))
        start = end
    return tuple(out)


def contiguous(total: int, cores: int) -> tuple[Range, ...]:
    """`total` units in launch order cut into one consecutive run per used core (the
    first `total mod cores` runs one longer)."""
    return spans(0, total, cores) if total > 0 and cores > 0 else ()


@dataclass(frozen=True)
class GemmSchedule:
    """A tiled GEMM: tile shape, split-K, and each core's run of tile indices.

    Tiles are numbered in launch order with the row tile fastest, then the column tile,
    the batch and the K slice (CUTLASS's grid: x = M tiles, y = N tiles, z = batch and
    split-K). Core c runs tiles `runs[c]`.
    """

    m: int
    n: int
    k: int
    batch: int
    tm: int
    tn: int
    split_k: int
    runs: tuple[Range, ...]

    @property
    def tiles(self) -> int:
        return sum(stop - start for start, stop in self.runs)

    @property
    def units(self) -> int:
        return self.tiles

    def grid(self) -> tuple[int, int]:
        """(row tiles, column tiles) of one batch entry."""
        return math.ceil(self.m / self.tm), math.ceil(self.n / self.tn)


@dataclass(frozen=True)
class FlashSchedule:
    """FlashAttention-2 blocks and the core each was balanced onto.

    Blocks are numbered (batch, head, key split, outer tile) with the outer tile fastest;
    outer tiles are query tiles forward, key/value tiles backward. `counts` holds each
    outer tile's inner-loop tiles before the keys are split `splits` ways (flash-decoding:
    split s takes inner tiles [s·⌈c/splits⌉, (s+1)·⌈c/splits⌉)); `cores[c]` the blocks
    core c runs, in order.
    """

    backward: bool
    batch: int
    heads: int
    q_len: int
    kv_len: int
    outer_tile: int
    inner_tile: int
    splits: int
    counts: tuple[int, ...]
    cores: tuple[tuple[int, ...], ...]

    @property
    def units(self) -> int:
        return sum(len(mine) for mine in self.cores)


@dataclass(frozen=True)
class SliceSchedule:
    """An untiled op: each core's slice, streamed in `chunks[c]` consecutive chunks.

    `rows` are ranges of the op's parallel extent (batch mapping: the rows of the core's
    sequences), or a matmul's output rows (M·batch) with `cols` its output columns; the
    chunks cut a matmul's columns (the weight stream), attention's keys (the KV cache
    stream) and the rows of any other op.
    """

    rows: tuple[Range, ...]
    cols: tuple[Range, ...]
    chunks: tuple[int, ...]

    @property
    def units(self) -> int:
        return sum(self.chunks)


@dataclass(frozen=True)
class StreamSchedule:
    """An element-wise kernel: `elements` spread evenly over `cores`, one chunk each."""

    elements: float
    cores: int

    @property
    def units(self) -> int:
        return self.cores


Schedule = GemmSchedule | FlashSchedule | SliceSchedule | StreamSchedule
