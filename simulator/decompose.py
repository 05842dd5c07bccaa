"""The concrete work of each core: which rows, columns and K range of a matmul, which
slice of a vector op, which attention blocks, core by core in the order the engine times
them.

Expanded, lazily, from the schedule each mapped Task carries (simulator.schedule): the
GEMM plan and each core's run of tiles, each attention block's core, each core's slice
and chunk count. Nothing is planned or balanced again here, so a functional run over
these pieces computes exactly the schedule whose time is simulated. Every piece names
the timed unit (tile, block or chunk) it belongs to.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from simulator.mapping import Task
from simulator.schedule import (
    FlashSchedule,
    GemmSchedule,
    Range,
    Schedule,
    SliceSchedule,
    StreamSchedule,
    contiguous,
    spans,
)
from simulator.workload.trace import Op


@dataclass(frozen=True)
class Tile:
    """One tile (or coalesced chunk) of a matmul on one core: output rows × columns, over a
    K range; `unit` numbers the timed tile or chunk."""

    core: int
    rows: Range
    cols: Range
    depth: Range
    unit: int


@dataclass(frozen=True)
class Block:
    """Attention of query rows of one (batch, head) over a key range, in key tiles of
    `kv_tile`; `unit` numbers the timed block (or chunk) it is part of."""

    core: int
    batch: int
    head: int
    rows: Range
    keys: Range
    kv_tile: int
    unit: int


@dataclass(frozen=True)
class Chunk:
    """A consecutive range of a vector op's parallel extent on one core: a timed chunk."""

    core: int
    span: Range
    unit: int


def kernel_schedule(task: Task) -> Schedule:
    """The schedule of the kernel that computes the op (its only non-streaming stage)."""
    found = [s for s in task.schedules if not isinstance(s, StreamSchedule)]
    if len(found) != 1:
        raise ValueError(f"{task.op.name}: {len(found)} compute kernels in the mapped task")
    return found[0]


def timed_units(task: Task) -> int:
    """Tiles, blocks and chunks the engine times for the op, over all its kernels."""
    return sum(schedule.units for schedule in task.schedules)


def gemm_tile(schedule: GemmSchedule, core: int, index: int, offset: int = 0) -> Tile:
    """Tile `index` of a tiled GEMM (numbered as `GemmSchedule` says), run by `core`; its
    unit is `offset + index`."""
    s = schedule
    row_tiles, col_tiles = s.grid()
    i, rest = index % row_tiles, index // row_tiles
    j, rest = rest % col_tiles, rest // col_tiles
    entry, split = rest % s.batch, rest // s.batch
    span, base = math.ceil(s.k / s.split_k), entry * s.m
    return Tile(core, (base + i * s.tm, base + min(s.m, (i + 1) * s.tm)),
                (j * s.tn, min(s.n, (j + 1) * s.tn)),
                (split * span, min(s.k, (split + 1) * span)), offset + index)


def gemm_tiles(schedule: GemmSchedule, offset: int = 0) -> list[Tile]:
    """Every tile of a tiled GEMM, core by core, each core's run in launch order."""
    return [gemm_tile(schedule, core, index, offset) for core, (start, stop)
            in enumerate(schedule.runs) for index in range(start, stop)]


def _sliced(schedule: SliceSchedule) -> list[tuple[int, int, Range]]:
    """(core, unit, range) of every chunk of an untiled op, cutting each core's chunked
    axis (its columns where it has them, else its rows) into its chunks."""
    out, unit = [], 0
    for core, chunks in enumerate(schedule.chunks):
        axis = schedule.cols[core] if schedule.cols else schedule.rows[core]
        for offset, piece in enumerate(spans(*axis, chunks)):
            out.append((core, unit + offset, piece))
        unit += chunks
    return out


def matmul_tiles(op: Op, task: Task) -> list[Tile]:
    """Tiles of a (ternary) matmul in execution order, core by core: the tiled GEMM's
    runs, or each core's rows × columns with the columns (the weight stream) chunked."""
    schedule = kernel_schedule(task)
    if isinstance(schedule, GemmSchedule):
        return gemm_tiles(schedule)
    if not isinstance(schedule, SliceSchedule) or not schedule.cols:
        raise ValueError(f"{op.name}: not a matmul schedule: {type(schedule).__name__}")
    depth = (0, op.dims["k"])
    return [Tile(core, schedule.rows[core], cols, depth, unit)
            for core, unit, cols in _sliced(schedule)]


def slices(op: Op, task: Task) -> list[Chunk]:
    """Each core's chunks of a vector op's parallel extent (under batch mapping, of its
    sequences), in order."""
    schedule = kernel_schedule(task)
    if not isinstance(schedule, SliceSchedule) or schedule.cols:
        raise ValueError(f"{op.name}: not a sliced schedule: {type(schedule).__name__}")
    return [Chunk(core, span, unit) for core, unit, span in _sliced(schedule)]


def flash_block(schedule: FlashSchedule, core: int, index: int) -> Block:
    """Forward block `index` (numbered as `FlashSchedule` says), run by `core`."""
    s = schedule
    outer = len(s.counts)
    tile, rest = index % outer, index // outer
    split, rest = rest % s.splits, rest // s.splits
    head, batch = rest % s.heads, rest // s.heads
    per = math.ceil(s.counts[tile] / s.splits)
    first, last = split * per, min(s.counts[tile], (split + 1) * per)
    keys = (min(s.kv_len, first * s.inner_tile), min(s.kv_len, max(first, last) * s.inner_tile))
    rows = (tile * s.outer_tile, min(s.q_len, (tile + 1) * s.outer_tile))
    return Block(core, batch, head, rows, keys, s.inner_tile, index)


def attention_blocks(op: Op, task: Task) -> list[Block]:
    """Attention forward in blocks, core by core: the FlashAttention-2 blocks as balanced
    (tiled machines), or each core's (batch, head) pairs over its chunks of the keys."""
    schedule = kernel_schedule(task)
    if op.dims.get("window"):
        raise ValueError(f"{op.name}: no functional kernel for sliding-window attention")
    if isinstance(schedule, FlashSchedule):
        if schedule.backward:
            raise ValueError(f"{op.name}: no functional kernel for attention backward")
        return [flash_block(schedule, core, index)
                for core, mine in enumerate(schedule.cores) for index in mine]
    if not isinstance(schedule, SliceSchedule) or schedule.cols:
        raise ValueError(f"{op.name}: not an attention schedule: {type(schedule).__name__}")
    d = op.dims
    blocks, unit = [], 0
    for core, ((first, last), chunks) in enumerate(zip(schedule.rows, schedule.chunks,
                                                       strict=True)):
        for offset, keys in enumerate(spans(0, d["kv_len"], chunks)):
            blocks.extend(Block(core, pair // d["heads"], pair % d["heads"], (0, d["q_len"]),
                                keys, max(1, keys[1] - keys[0]), unit + offset)
                          for pair in range(first, last))
        unit += chunks
    return blocks


@dataclass(frozen=True)
class UnfusedAttention:
    """Attention as its separate timed kernels (rows are (batch·head, query) pairs): the
    tiles of S = QKᵀ, the row chunks of the causal mask and of the softmax, the tiles of
    O = PV. The layout copies before them move data only and are not run."""

    scores: list[Tile]
    mask: list[Chunk]
    softmax: list[Chunk]
    output: list[Tile]


def _row_chunks(schedule: StreamSchedule, rows: int, offset: int) -> list[Chunk]:
    """An element-wise kernel's even spread over cores, as whole score rows per core."""
    return [Chunk(core, run, offset + core)
            for core, run in enumerate(contiguous(rows, schedule.cores))]


def unfused_attention(op: Op, task: Task) -> UnfusedAttention:
    """The kernels of an unfused attention forward, from the schedules they were timed
    with: copies, S = QKᵀ, the mask where causal, the softmax, O = PV."""
    schedules = task.schedules
    kinds = [type(schedule).__name__ for schedule in schedules]
    causal = bool(op.dims.get("causal"))
    expected = ["StreamSchedule", "GemmSchedule", *["StreamSchedule"] * (1 + causal),
                "GemmSchedule"]
    scores, output = schedules[1], schedules[-1]
    if (op.dims.get("backward") or kinds != expected or not isinstance(scores, GemmSchedule)
            or not isinstance(output, GemmSchedule)):
        raise ValueError(f"{op.name}: not an unfused attention forward: {kinds}")
    offsets = list(itertools.accumulate((schedule.units for schedule in schedules), initial=0))
    rows = op.dims["batch"] * op.dims["heads"] * op.dims["q_len"]
    streams = [_row_chunks(schedule, rows, offsets[i]) for i, schedule in enumerate(schedules)
               if 1 < i < len(schedules) - 1 and isinstance(schedule, StreamSchedule)]
    return UnfusedAttention(gemm_tiles(scores, offsets[1]), streams[0] if causal else [],
                            streams[-1], gemm_tiles(output, offsets[-2]))
