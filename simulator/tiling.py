"""Thread-block tiling of matrix kernels on GPU-like machines (cores fed by a shared L2).

A GEMM becomes a grid of output tiles (tm × tn, K split `split_k` ways), launched in
waves over the cores; a fused attention (FlashAttention-2) becomes one block per
(batch, head, query tile) forward, or per key/value tile backward, each looping over the
other dimension. Blocks are list-scheduled onto cores in launch order, so the last,
partial wave and causal imbalance show up as cores with less work. What each core does
is returned as `CoreWork`, which the engine times, with the schedule it came from
(simulator.schedule), which the functional check replays.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from simulator.hardware.schema import FlashAttention, Hardware, Unit
from simulator.hardware.select import vector_ns
from simulator.schedule import FlashSchedule, GemmSchedule, contiguous

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int32": 4,
               "int4": 0.5, "int2": 0.25, "ternary": 0.25}
SPLIT_K = (1, 2, 3, 4, 6, 8, 12, 16)
#: vector element-ops per attention score besides the exp: scale, max, sum (fwd); the
#: recomputed scale and dS = P ∘ (dP − D) (bwd)
SOFTMAX_OPS = {"forward": 3, "backward": 3}


@dataclass(frozen=True)
class CoreWork:
    """What one core does in one kernel: `units` loop iterations (tiles or kv steps)."""

    units: int
    compute_ns: float
    l2_bytes: float
    dram_load_bytes: float
    dram_store_bytes: float


@dataclass(frozen=True)
class GemmPlan:
    tm: int
    tn: int
    tk: int
    split_k: int
    tiles: int
    estimate_ns: float


def _clock_ns(hw: Hardware) -> float:
    return 1e9 / hw.core_clock


def _port_bytes_per_ns(hw: Hardware) -> float:
    dram = hw.memory.dram
    return dram.access_width / 8 / dram.access_interval.ns(hw.core_clock)


def _dram_bytes_per_ns(hw: Hardware) -> float:
    dram = hw.memory.dram
    return dram.bandwidth_per_channel * dram.channels * dram.efficiency * 1e-9


def _l2_bytes_per_ns(hw: Hardware) -> float:
    return hw.memory.l2.bandwidth * 1e-9 if hw.memory.l2 else _dram_bytes_per_ns(hw)


def _balance(block_ns: list[float], cores: int) -> list[list[int]]:
    """Assign blocks (in launch order) to the core that frees up first."""
    heap = [(0.0, core) for core in range(cores)]
    assigned: list[list[int]] = [[] for _ in range(cores)]
    for index, ns in enumerate(block_ns):
        free_at, core = heapq.heappop(heap)
        assigned[core].append(index)
        heapq.heappush(heap, (free_at + ns, core))
    return assigned


def _gemm_tile(hw: Hardware, unit: Unit, rate: float, m: int, n: int, k: int,
               tile: tuple[int, int, int], split: int, elem: tuple[float, float, float]
               ) -> tuple[float, float]:
    """(compute ns, L2 bytes) of one output tile of one K slice."""
    tm, tn, _ = tile
    k_span = math.ceil(k / split)
    a_bytes, b_bytes, c_bytes = elem
    compute = 2 * tm * tn * k_span / (rate * unit.efficiency) * _clock_ns(hw)
    epilogue = tm * tn * (4 if split > 1 else c_bytes)
    return compute, (tm * a_bytes + tn * b_bytes) * k_span + epilogue


def plan_gemm(hw: Hardware, unit: Unit, rate: float, m: int, n: int, k: int, batch: int,
              elem: tuple[float, float, float]) -> GemmPlan:
    """The tile shape and split-K a library heuristic would pick: the fastest estimate."""
    cores = hw.cores.count
    unique = batch * (m * k * elem[0] + k * n * elem[1] + m * n * elem[2])
    best: GemmPlan | None = None
    for tile in unit.tiles:
        tm, tn, tk = tile
        for split in SPLIT_K:
            if split > 1 and math.ceil(k / split) < 2 * tk:
                break
            tiles = batch * math.ceil(m / tm) * math.ceil(n / tn) * split
            compute, l2_bytes = _gemm_tile(hw, unit, rate, m, n, k, tile, split, elem)
            per_tile = max(compute, l2_bytes / _port_bytes_per_ns(hw))
            reduce = (2 * split * batch * m * n * 4 / _l2_bytes_per_ns(hw)) if split > 1 else 0
            estimate = max(math.ceil(tiles / cores) * per_tile,
                           unique / _dram_bytes_per_ns(hw),
                           tiles * l2_bytes / _l2_bytes_per_ns(hw)) + reduce
            if best is None or estimate < best.estimate_ns * (1 - 1e-9):
                best = GemmPlan(tm, tn, tk, split, tiles, estimate)
    assert best is not None
    return best


def gemm_work(hw: Hardware, unit: Unit, rate: float, m: int, n: int, k: int, batch: int,
              elem: tuple[float, float, float]) -> tuple[GemmSchedule, list[CoreWork]]:
    """Per-core work of a GEMM (one kernel; split-K partials reduced in the epilogue), and
    the schedule it is timed with: each core a consecutive run of tiles."""
    plan = plan_gemm(hw, unit, rate, m, n, k, batch, elem)
    compute, l2_bytes = _gemm_tile(hw, unit, rate, m, n, k, (plan.tm, plan.tn, plan.tk),
                                   plan.split_k, elem)
    if plan.split_k > 1:  # the last slice of each tile reads the partials back and adds
        l2_bytes += plan.tm * plan.tn * 4 * (plan.split_k - 1) / plan.split_k
    loads = batch * (m * k * elem[0] + k * n * elem[1])
    stores = batch * m * n * elem[2]
    runs = contiguous(plan.tiles, hw.cores.count)
    work = []
    k_steps = math.ceil(math.ceil(k / plan.split_k) / plan.tk)  # the pipelined K loop
    for start, stop in runs:
        tiles = stop - start
        share = tiles / plan.tiles
        work.append(CoreWork(tiles * k_steps, tiles * compute, tiles * l2_bytes, loads * share,
                             stores * share))
    return GemmSchedule(m, n, k, batch, plan.tm, plan.tn, plan.split_k, runs), work


def _attention_blocks(outer: int, inner: int, causal_offset: int | None,
                      outer_tile: int, inner_tile: int, backward: bool, window: int = 0
                      ) -> list[int]:
    """Inner-loop iterations of each block of one (batch, head); a sliding window (causal,
    forward) skips the key tiles wholly before the window of the tile's first query."""
    counts = []
    for i in range(outer):
        if causal_offset is None:
            counts.append(inner)
        elif not backward:  # query tile i sees keys up to (i + 1)·Br + offset
            last = max(1, min(inner, math.ceil(((i + 1) * outer_tile + causal_offset)
                                               / inner_tile)))
            first = max(0, i * outer_tile + causal_offset - window + 1) // inner_tile if (
                window) else 0
            counts.append(max(1, last - min(first, last - 1)))
        else:  # key tile j is seen by query tiles from (j·Bc − offset) / Br on
            first = max(0, (i * outer_tile - causal_offset) // inner_tile)
            counts.append(max(1, inner - first))
    return counts


def flash_work(hw: Hardware, unit: Unit, rate: float, flash: FlashAttention,
               dims: dict[str, int], backward: bool, dtype: str
               ) -> tuple[FlashSchedule, list[CoreWork]]:
    """Per-core work of a FlashAttention-2 forward or backward kernel, and the schedule it
    is timed with: which blocks each core runs."""
    b, h, sq, sk, d = (dims["batch"], dims["heads"], dims["q_len"], dims["kv_len"],
                       dims["head_dim"])
    elem = DTYPE_BYTES.get(dtype, 2)
    if backward:
        q_tile, kv_tile = flash.backward_q_tile, flash.backward_kv_tile
        outer, inner, outer_tile, inner_tile = (math.ceil(sk / kv_tile), math.ceil(sq / q_tile),
                                                kv_tile, q_tile)
        matmuls = 5
    else:
        q_tile, kv_tile = flash.q_tile, flash.kv_tile
        outer, inner, outer_tile, inner_tile = (math.ceil(sq / q_tile), math.ceil(sk / kv_tile),
                                                q_tile, kv_tile)
        matmuls = 2
    offset = (sk - sq) if dims.get("causal") else None
    window = dims.get("window", 0)
    if window and backward:
        raise ValueError("sliding-window attention backward is not modelled")
    per_head = _attention_blocks(outer, inner, offset, outer_tile, inner_tile, backward,
                                 window)
    splits = 1
    if not backward and b * h * outer < hw.cores.count:  # split the keys (flash-decoding)
        splits = min(math.ceil(hw.cores.count / (b * h * outer)), inner)
    blocks = [math.ceil(count / splits) for count in per_head] * (b * h * splits)
    scores = q_tile * kv_tile
    phase = "backward" if backward else "forward"
    mma = 2 * matmuls * scores * d / (rate * flash.efficiency) * _clock_ns(hw)
    vec = (vector_ns(hw, scores * SOFTMAX_OPS[phase], "", "softmax", "fp32")
           + vector_ns(hw, scores, "exp", "softmax", "fp32"))
    step_ns = mma + vec * (1 - flash.softmax_overlap)
    if backward:  # Q_i, dO_i, LSE_i, D_i in; dQ_i accumulated atomically in fp32
        step_l2 = 2 * q_tile * d * elem + 2 * q_tile * 4 + 2 * q_tile * d * 4
        block_l2 = 4 * kv_tile * d * elem  # K_j, V_j in; dK_j, dV_j out
    else:
        step_l2 = 2 * kv_tile * d * elem  # K_j, V_j
        block_l2 = 2 * q_tile * d * elem + q_tile * 4  # Q_i in, O_i and LSE out
    # forward reads Q, K, V and writes O; backward reads Q, K, V, O/dO and writes dQ, dK, dV
    loads = b * h * (sq + 2 * sk) * d * elem + (b * h * 2 * sq * d * elem if backward else 0)
    stores = b * h * (sq + 2 * sk if backward else sq) * d * elem
    total_steps = sum(blocks)
    overhead = flash.block_overhead.ns(hw.core_clock)
    assigned = [mine for mine in _balance([count * step_ns + overhead for count in blocks],
                                          hw.cores.count) if mine]
    work = []
    for mine in assigned:
        steps = sum(blocks[i] for i in mine)
        share = steps / total_steps
        compute = steps * step_ns + len(mine) * overhead
        work.append(CoreWork(steps, compute, steps * step_l2 + len(mine) * block_l2,
                             loads * share, stores * share))
    schedule = FlashSchedule(backward, b, h, sq, sk, outer_tile, inner_tile, splits,
                             tuple(per_head), tuple(map(tuple, assigned)))
    return schedule, work
