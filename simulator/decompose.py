"""The concrete work of each core: which rows, columns and K range of a matmul, which
slice of a vector op, which attention blocks, in the order the engine times them.

Built from the same primitives as simulator.mapping (the core grid, the splits, the
GEMM plan, the chunk counts of the mapped task, the block schedule), so a functional run
over these decompositions computes exactly the schedule whose time is simulated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from simulator.hardware.schema import Hardware
from simulator.hardware.select import rate, unit_for
from simulator.mapping import Task, _grid, _split
from simulator.tiling import DTYPE_BYTES, _attention_blocks, _balance, plan_gemm
from simulator.workload.trace import Op

Range = tuple[int, int]


@dataclass(frozen=True)
class Tile:
    """One coalesced chunk of a matmul on one core: output rows × columns, over a K range."""

    core: int
    rows: Range
    cols: Range
    depth: Range


@dataclass(frozen=True)
class Block:
    """One attention block: query rows of one (batch, head), over a key range."""

    core: int
    batch: int
    head: int
    rows: Range
    keys: Range


def _ranges(extent: int, parts: int) -> list[Range]:
    """`extent` cut into `parts` near-equal consecutive ranges (larger ones first)."""
    sizes = _split(extent, parts) if parts <= extent else [1] * extent
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out


def _chunks_of(task: Task, core: int) -> int:
    for part in task.stages[0]:
        if core in part.cores:
            return part.chunks
    return 1


def _tiled(task: Task, hw: Hardware) -> bool:
    unit = hw.cores.units[task.parts[0].unit]
    return unit.kind == "matrix" and bool(unit.tiles) and not task.lane_deps


def matmul_tiles(op: Op, task: Task, hw: Hardware, batch: int) -> list[Tile]:
    """Tiles of a (ternary) matmul in execution order, core by core."""
    d = op.dims
    rows, cols, depth = d["m"] * d["batch"], d["n"], d["k"]
    cores = hw.cores.count
    if _tiled(task, hw):
        _, unit, _ = unit_for(hw, op.kind, op.dtype, op.module)
        per_cycle = rate(unit, op.dtype)[1]
        elem = DTYPE_BYTES.get(op.dtype, 2)
        plan = plan_gemm(hw, unit, per_cycle, d["m"], cols, depth, d["batch"], (elem,) * 3)
        span = math.ceil(depth / plan.split_k)
        grid = [(i, j, s) for i in range(math.ceil(rows / plan.tm))
                for j in range(math.ceil(cols / plan.tn)) for s in range(plan.split_k)]
        return [Tile(t % cores, (i * plan.tm, min(rows, (i + 1) * plan.tm)),
                     (j * plan.tn, min(cols, (j + 1) * plan.tn)),
                     (s * span, min(depth, (s + 1) * span)))
                for t, (i, j, s) in enumerate(grid)]
    if task.lane_deps:  # batch mapping: each core its own sequences, the whole matrix
        per_sequence = rows // batch
        lanes = _ranges(batch, cores)
        blocks = [(core, (a * per_sequence, b * per_sequence), (0, cols))
                  for core, (a, b) in enumerate(lanes)]
    else:
        p_m, p_n = _grid(op, cores)
        row_ranges, col_ranges = _ranges(rows, p_m), _ranges(cols, p_n)
        blocks = [(i * p_n + j, row_ranges[i], col_ranges[j])
                  for i in range(len(row_ranges)) for j in range(len(col_ranges))]
    tiles = []
    for core, row_range, (c0, c1) in blocks:  # chunks stream the core's weight rows
        for a, b in _ranges(c1 - c0, _chunks_of(task, core)):
            tiles.append(Tile(core, row_range, (c0 + a, c0 + b), (0, depth)))
    return tiles


def slices(op: Op, task: Task, hw: Hardware, batch: int) -> list[tuple[int, Range]]:
    """(core, range) of a vector op's parallel extent (sequences under batch mapping)."""
    if task.lane_deps:
        return list(enumerate(_ranges(batch, hw.cores.count)))
    return list(enumerate(_ranges(op.dims.get("parallel", 1), hw.cores.count)))


def attention_blocks(op: Op, task: Task, hw: Hardware) -> list[Block]:
    """FlashAttention-2 forward blocks and the core each runs on (tiled machines), or one
    block per (batch, head) slice otherwise."""
    d = op.dims
    b, h, sq, sk = d["batch"], d["heads"], d["q_len"], d["kv_len"]
    if not (_tiled(task, hw) and hw.scheduling.fused_attention):
        pairs = [(i, j) for i in range(b) for j in range(h)]
        owners = [core for core, (x, y) in enumerate(_ranges(len(pairs), hw.cores.count))
                  for _ in range(y - x)]
        return [Block(owners[n], i, j, (0, sq), (0, sk)) for n, (i, j) in enumerate(pairs)]
    flash = hw.scheduling.flash
    q_tiles, kv_tiles = math.ceil(sq / flash.q_tile), math.ceil(sk / flash.kv_tile)
    offset = (sk - sq) if d.get("causal") else None
    counts = _attention_blocks(q_tiles, kv_tiles, offset, flash.q_tile, flash.kv_tile, False)
    splits = 1
    if b * h * q_tiles < hw.cores.count:
        splits = min(math.ceil(hw.cores.count / (b * h * q_tiles)), kv_tiles)
    blocks = []
    for i in range(b):
        for j in range(h):
            for s in range(splits):
                for tile, count in enumerate(counts):
                    keys = min(sk, count * flash.kv_tile)
                    key_ranges = _ranges(keys, splits)
                    if s < len(key_ranges):
                        rows = (tile * flash.q_tile, min(sq, (tile + 1) * flash.q_tile))
                        blocks.append(Block(-1, i, j, rows, key_ranges[s]))
    order = _balance([blk.keys[1] - blk.keys[0] for blk in blocks], hw.cores.count)
    owner = {index: core for core, mine in enumerate(order) for index in mine}
    return [Block(owner[n], blk.batch, blk.head, blk.rows, blk.keys)
            for n, blk in enumerate(blocks)]
