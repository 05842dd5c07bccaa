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
from simulator.hardware.select import rate as unit_rate
from simulator.hardware.select import vector_ns, vector_unit
from simulator.schedule import FlashSchedule, GemmSchedule, contiguous

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int32": 4,
               "int4": 0.5, "int2": 0.25, "ternary": 0.25}
SPLIT_K = (1, 2, 3, 4, 6, 8, 12, 16)
#: A thread-block tile (tm, tn, tk).
Tile = tuple[int, int, int]
#: Rows of the smallest tensor-core MMA (m16n8k16): what a decode kernel pads queries to.
MMA_ROWS = 16
#: Relative difference below which two GEMM plans' estimates count as equal (a memory-
#: bound GEMM is exactly as fast with many tiles: the least padded one is taken).
TIE = 1e-9
#: vector element-ops per attention score besides the exp: scale, max, sum (fwd); the
#: recomputed scale and dS = P ∘ (dP − D) (bwd)
SOFTMAX_OPS = {"forward": 3, "backward": 3}


@dataclass(frozen=True)
class CoreWork:
    """What one core does in one kernel: `units` loop iterations (tiles or kv steps), and
    the bytes it keeps in flight (`in_flight`; 0: no limit on its fetch rate)."""

    units: int
    compute_ns: float
    l2_bytes: float
    dram_load_bytes: float
    dram_store_bytes: float
    in_flight: float = 0.0
    active: int = 0  # cores busy in the kernel (0: all), for the loaded latency


@dataclass(frozen=True)
class GemmPlan:
    tm: int
    tn: int
    tk: int
    split_k: int
    tiles: int
    estimate_ns: float
    #: the share of the kernel's time the matrix units are busy (sets its clock)
    matrix_busy: float = 1.0


@dataclass(frozen=True)
class TileCost:
    """One output tile of one K slice at the rated clock: its cycles (K loop, overhead and
    epilogue), the cycles the matrix unit is busy, the bytes it moves through the L2 and
    the bytes its K loop keeps in flight."""

    cycles: float
    mma_cycles: float
    l2_bytes: float
    in_flight: float


def _clock_ns(hw: Hardware) -> float:
    return 1e9 / hw.core_clock


def _port_bytes_per_cycle(hw: Hardware) -> float:
    dram = hw.memory.dram
    return dram.access_width / 8 / dram.access_interval.ns(hw.core_clock) * _clock_ns(hw)


def _port_bytes_per_ns(hw: Hardware) -> float:
    return _port_bytes_per_cycle(hw) / _clock_ns(hw)


def fetch_bytes_per_ns(hw: Hardware, in_flight: float, dram_share: float = 1.0,
                       active: int | None = None) -> float:
    """One core's fetch rate: its port, or what it keeps in flight over the access latency
    (Little's law), DRAM's for the `dram_share` of its bytes and the L2's for the rest.
    DRAM's is the loaded latency: each of the `active` cores (default all) keeping as much
    in flight, the queues add all of it over `dram.queue_bandwidth`."""
    port = _port_bytes_per_ns(hw)
    if in_flight <= 0:
        return port
    dram = hw.memory.dram
    dram_ns = dram.latency.ns(hw.core_clock)
    if dram.queue_bandwidth:
        cores = hw.cores.count if active is None else min(active, hw.cores.count)
        dram_ns += cores * in_flight / dram.queue_bandwidth * 1e9
    l2_ns = hw.memory.l2.latency.ns(hw.core_clock) if hw.memory.l2 else dram_ns
    latency = dram_share * dram_ns + (1 - dram_share) * l2_ns
    return min(port, in_flight / latency) if latency > 0 else port


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


def warp_grid(tm: int, tn: int) -> tuple[int, int]:
    """Warps along (M, N) of a tile, as CUTLASS lays them out: 8 warps for tiles of
    256 × 128 or more, else 4 (fewer where a warp would get under 16 × 8), arranged to
    read the fewest shared-memory bytes per K step."""
    warps = 8 if tm * tn >= 256 * 128 else 4
    best: tuple[float, int, int] | None = None
    for along_m in (1, 2, 4, 8):
        along_n = warps // along_m
        if along_m * along_n != warps or tm < 16 * along_m or tn < 8 * along_n:
            continue
        traffic = along_n * tm + along_m * tn
        if best is None or traffic < best[0]:
            best = (traffic, along_m, along_n)
    if best is None:  # too small for 4 warps: one along M, as many along N as fit
        return 1, max(1, min(4, tn // 8))
    return best[1], best[2]


def _gemm_tile(hw: Hardware, unit: Unit, rate: float, m: int, n: int, k: int,
               tile: tuple[int, int, int], split: int, elem: tuple[float, float, float],
               decode: float = 0.0) -> TileCost:
    """The cost of one output tile of one K slice.

    Each K step of `tk` runs on three pipes at once and takes the longest: the matrix unit
    (2·tm·tn·tk at the rated FLOPs per cycle), shared memory feeding it (each warp reads
    its rows of A and columns of B: `warp_grid`, at `cores.sram_bandwidth`), and, for
    low-bit weights, the vector unit unpacking them (`decode` integer ops per weight, by
    every warp along M for the tn·tk weights it multiplies), plus the unit's
    `step_overhead` (barrier, stage wait). A tile then pays the unit's `tile_overhead` and
    writes its tm·tn outputs (fp32 partials under split-K) through the core's port.
    """
    tm, tn, tk = tile
    k_span = math.ceil(k / split)
    steps = math.ceil(k_span / tk)
    a_bytes, b_bytes, c_bytes = elem
    mma = 2 * tm * tn * tk / (rate * unit.efficiency)
    along_m, along_n = warp_grid(tm, tn)
    feed = 0.0
    if hw.cores.sram_bandwidth:
        feed = (along_n * tm * a_bytes + along_m * tn * b_bytes) * tk / hw.cores.sram_bandwidth
    # each warp along M unpacks the weight fragments it multiplies
    unpack = along_m * tn * tk * decode / _int_rate(hw) if decode else 0.0
    epilogue_bytes = min(tm, m) * min(tn, n) * (4 if split > 1 else c_bytes)
    step_cost = unit.step_overhead.cycles + unit.step_overhead.seconds * hw.core_clock
    cycles = (steps * (max(mma, feed, unpack) + step_cost) + unit.tile_overhead.cycles
              + unit.tile_overhead.seconds * hw.core_clock
              + epilogue_bytes / _port_bytes_per_cycle(hw))
    # an edge tile loads only the rows and columns that exist (its MMA is padded)
    step_bytes = (min(tm, m) * a_bytes + min(tn, n) * b_bytes) * tk
    in_flight = hw.cores.pipeline_stages * step_bytes
    return TileCost(cycles, steps * mma, step_bytes * k_span / tk + epilogue_bytes, in_flight)


def _int_rate(hw: Hardware) -> float:
    """Integer ops per cycle of a core's element-wise vector unit (its int32 rate, else its
    fp32 or slowest one; the hardware validator requires the unit where kernels unpack)."""
    found = vector_unit(hw, "elementwise")
    assert found is not None, "Hardware._unpack_has_a_vector_unit"
    return unit_rate(found[1], "int32")[1]


def _unique_bytes(hw: Hardware, m: int, n: int, k: int, batch: int,
                  elem: tuple[float, float, float]) -> tuple[float, float]:
    """(DRAM loads, DRAM stores) of a GEMM: its weights once, and its activations unless
    they fit in half the L2 (the previous kernel's output stays there)."""
    a_bytes, b_bytes, c_bytes = elem
    activations = batch * (m * k * a_bytes + m * n * c_bytes)
    resident = hw.memory.l2 is not None and activations <= hw.memory.l2.capacity / 2
    loads = batch * (k * n * b_bytes + (0 if resident else m * k * a_bytes))
    return loads, 0.0 if resident else batch * m * n * c_bytes


def plan_gemm(hw: Hardware, unit: Unit, rate: float, m: int, n: int, k: int, batch: int,
              elem: tuple[float, float, float], decode: float = 0.0,
              fixed: Tile | None = None) -> GemmPlan:
    """The tile shape and split-K a library heuristic would pick: the fastest estimate.
    `fixed`: a kernel compiled for one threadblock tile without split-K (a CUTLASS template
    instantiated once, as QuaRot's int4 GEMM), whatever the shape."""
    cores = hw.cores.count
    clock = _clock_ns(hw)
    loads, stores = _unique_bytes(hw, m, n, k, batch, elem)
    best: GemmPlan | None = None
    # a library pads a skinny operand no further than its smallest tile does
    least_m = min(t[0] for t in unit.tiles)
    fitting = [t for t in unit.tiles if t[0] <= max(least_m, m)]
    least_n = min(t[1] for t in fitting)
    fitting = [t for t in fitting if t[1] <= max(least_n, n)]
    if fixed is not None:
        fitting = [fixed]
    for tile in fitting:
        tm, tn, tk = tile
        for split in (1,) if fixed is not None else SPLIT_K:
            if split > 1 and math.ceil(k / split) < 2 * tk:
                break
            tiles = batch * math.ceil(m / tm) * math.ceil(n / tn) * split
            cost = _gemm_tile(hw, unit, rate, m, n, k, tile, split, elem, decode)
            dram_share = min(1.0, loads / max(1.0, tiles * cost.l2_bytes))
            fetch = fetch_bytes_per_ns(hw, cost.in_flight, dram_share, min(tiles, cores))
            per_tile = max(cost.cycles * clock, cost.l2_bytes / fetch)
            reduce = (2 * split * batch * m * n * 4 / _l2_bytes_per_ns(hw)) if split > 1 else 0
            # full waves share DRAM; a last, partial wave runs at its own cores' pace
            full, partial = divmod(tiles, cores)
            tile_dram = (loads + stores) / tiles / _dram_bytes_per_ns(hw)
            waves = (max(full * per_tile, full * cores * tile_dram)
                     + (max(per_tile, partial * tile_dram) if partial else 0.0))
            estimate = max(waves, (loads + stores) / _dram_bytes_per_ns(hw),
                           tiles * cost.l2_bytes / _l2_bytes_per_ns(hw)) + reduce
            busy = tiles * cost.mma_cycles * clock / (estimate * cores)
            # plans within TIE of the best are equal: the one with the least padded MMA
            # work wins (a memory-bound GEMV is as fast with any tile, not as power-hungry)
            if best is None or estimate < best.estimate_ns * (1 - TIE) or (
                    estimate <= best.estimate_ns * (1 + TIE) and busy < best.matrix_busy - 1e-9):
                best = GemmPlan(tm, tn, tk, split, tiles, estimate, busy)
    assert best is not None
    return best


def gemm_work(hw: Hardware, unit: Unit, rate: float, m: int, n: int, k: int, batch: int,
              elem: tuple[float, float, float], decode: float = 0.0,
              fixed: Tile | None = None) -> tuple[GemmSchedule, list[CoreWork]]:
    """Per-core work of a GEMM (one kernel; split-K partials reduced in the epilogue), and
    the schedule it is timed with: each core a consecutive run of tiles. Compute runs at
    the clock the kernel's matrix activity leaves under the power limit."""
    plan = plan_gemm(hw, unit, rate, m, n, k, batch, elem, decode, fixed)
    cost = _gemm_tile(hw, unit, rate, m, n, k, (plan.tm, plan.tn, plan.tk), plan.split_k, elem,
                      decode)
    compute = cost.cycles * _clock_ns(hw) * hw.clock_scale(plan.matrix_busy)
    l2_bytes = cost.l2_bytes
    if plan.split_k > 1:  # the last slice of each tile reads the partials back and adds
        l2_bytes += plan.tm * plan.tn * 4 * (plan.split_k - 1) / plan.split_k
    loads, stores = _unique_bytes(hw, m, n, k, batch, elem)
    runs = contiguous(plan.tiles, hw.cores.count)
    work = []
    k_steps = math.ceil(math.ceil(k / plan.split_k) / plan.tk)  # the pipelined K loop
    for start, stop in runs:
        tiles = stop - start
        share = tiles / plan.tiles
        work.append(CoreWork(tiles * k_steps, tiles * compute, tiles * l2_bytes, loads * share,
                             stores * share, cost.in_flight, len(runs)))
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
    kv_elem = dims["kv_bits"] / 8 if dims.get("kv_bits") else elem  # a quantized KV cache
    if backward:
        q_tile, kv_tile = flash.backward_q_tile, flash.backward_kv_tile
        outer, inner, outer_tile, inner_tile = (math.ceil(sk / kv_tile), math.ceil(sq / q_tile),
                                                kv_tile, q_tile)
        matmuls = 5
    else:
        # a decode-shaped call (fewer queries than a tile) runs a flash-decoding kernel
        # whose query tile is padded only to the MMA's 16 rows
        q_tile = min(flash.q_tile, MMA_ROWS * math.ceil(sq / MMA_ROWS))
        kv_tile = flash.kv_tile
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
        step_l2 = 2 * kv_tile * d * kv_elem  # K_j, V_j
        block_l2 = 2 * q_tile * d * elem + q_tile * 4  # Q_i in, O_i and LSE out
    # forward reads Q, K, V and writes O; backward reads Q, K, V, O/dO and writes dQ, dK, dV
    loads = (b * h * sq * d * elem + b * h * 2 * sk * d * kv_elem
             + (b * h * 2 * sq * d * elem if backward else 0))
    stores = b * h * (sq + 2 * sk if backward else sq) * d * elem
    total_steps = sum(blocks)
    overhead = flash.block_overhead.ns(hw.core_clock)
    assigned = [mine for mine in _balance([count * step_ns + overhead for count in blocks],
                                          hw.cores.count) if mine]
    busiest = max(sum(blocks[i] for i in mine) * step_ns + len(mine) * overhead
                  for mine in assigned)
    scale = hw.clock_scale(total_steps * mma / (busiest * hw.cores.count))
    in_flight = 2 * step_l2  # the next K/V (Q/dO) tile loads while this one computes
    work = []
    for mine in assigned:
        steps = sum(blocks[i] for i in mine)
        share = steps / total_steps
        compute = (steps * step_ns + len(mine) * overhead) * scale
        work.append(CoreWork(steps, compute, steps * step_l2 + len(mine) * block_l2,
                             loads * share, stores * share, in_flight, len(assigned)))
    schedule = FlashSchedule(backward, b, h, sq, sk, outer_tile, inner_tile, splits,
                             tuple(per_head), tuple(map(tuple, assigned)))
    return schedule, work
