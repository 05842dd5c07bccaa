"""Mapping: each traced op → kernels (stages) of per-core parts of work.

Two ways to use many cores:
- `tensor`: every op is split across cores along its parallel dimension (output features
  of a matmul, heads of attention, rows of a norm, elements of an element-wise op), the
  decomposition tensor parallelism and Union-of-Experts use. Consumers wait for all parts.
- `batch`: each core runs whole ops for its own sequences (the MatMul-free FPGA paper's
  projection); every core streams the full weights, and a core waits only for itself.

On machines whose matrix unit lists thread-block `tiles` (GPUs), matmuls and attention
are tiled instead (simulator.tiling): waves of tiles, split-K, FlashAttention-2 blocks,
or unfused attention as its separate kernels.

Cores given identical work on the same DRAM channels form one group, simulated once with
its traffic multiplied by the group size (exact for identical, simultaneously started
work under fair sharing; it keeps 108-SM GPUs cheap). Work is cut into at most
`granularity` chunks per part, each a coalesced run of tiles.

Each kernel keeps the schedule it was timed with (simulator.schedule: the GEMM plan and
each core's run of tiles, each attention block's core, each core's slice and chunk
count); `simulate check` replays exactly that schedule.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from simulator.errors import UserError
from simulator.hardware.schema import Hardware, LowBitKernel, MappingMode, Unit
from simulator.hardware.select import rate, unit_for, vector_ns
from simulator.schedule import Range, Schedule, SliceSchedule, StreamSchedule, spans
from simulator.tiling import (
    DTYPE_BYTES,
    CoreWork,
    Tile,
    fetch_bytes_per_ns,
    flash_work,
    gemm_work,
)
from simulator.workload.trace import Op, Trace

Mapping = MappingMode
#: Default cap on coalesced chunks per part (see the engine's granularity knob).
DEFAULT_GRANULARITY = 64
#: Element operations per attention score on the vector unit (max, sub, sum, scale).
SOFTMAX_OPS_PER_SCORE = 4
#: Passes over the scores of an unfused softmax forward, and over P and dP backward.
SOFTMAX_READS, SOFTMAX_BACKWARD_READS = 3, 2


@dataclass(frozen=True)
class Part:
    """Identical work of every core in `cores`; byte and time fields are per core."""

    cores: tuple[int, ...]
    channel: int
    unit: str
    chunks: int
    dram_load_bytes: float
    dram_store_bytes: float
    l2_bytes: float
    sram_bytes: float
    compute_ns: float
    latency_ns: float
    #: ns the core's port is held per byte it fetches (its access rate, or what it keeps in
    #: flight over the access latency); 0: the machine's access rate
    port_ns_per_byte: float = 0.0

    @property
    def size(self) -> int:
        return len(self.cores)


Stage = tuple[Part, ...]
#: A kernel as mapped: its parts, and the schedule (which core does which tiles) timed.
Kernel = tuple[Stage, Schedule]


@dataclass(frozen=True)
class Task:
    """An op as the engine runs it: one or more kernels (stages) run one after another.

    `schedules[i]` is the schedule stage i was timed with (the functional check's input).
    """

    op: Op
    stages: tuple[Stage, ...]
    unit_kind: str
    rate_key: str
    energy_ops: float
    lane_deps: bool
    schedules: tuple[Schedule, ...] = ()
    #: a collective: ns the device's stream waits on its links (no stages on its cores)
    link_ns: float = 0.0

    @property
    def parts(self) -> tuple[Part, ...]:
        return tuple(part for stage in self.stages for part in stage)

    @property
    def overlaps(self) -> bool:
        """A collective the device's stream does not wait for (only what consumes it does):
        FastAttention's tiling-AllReduce (simulator.parallel.tile_attention)."""
        return not self.stages and bool(self.op.dims.get("overlap"))

    @property
    def cores(self) -> int:
        """Cores busy in the widest stage (0: a collective, on the links)."""
        return max((sum(part.size for part in stage) for stage in self.stages), default=0)


@dataclass(frozen=True)
class _Share:
    """One core's fractions of an op: its work, and the parts of weights and input it reads."""

    work: float
    weight: float
    input: float


def _ranges(extent: int, cores: int) -> tuple[Range, ...]:
    """`extent` cut into consecutive ranges, one per used core."""
    return spans(0, extent, cores)


def _split(extent: int, cores: int) -> list[int]:
    """The sizes of `_ranges`."""
    return [stop - start for start, stop in _ranges(extent, cores)]


def _grid(op: Op, cores: int) -> tuple[int, int]:
    """Cores along (rows M, columns N) of a matmul that move the fewest bytes per core."""
    rows, cols = op.dims["m"] * op.dims["batch"], op.dims["n"]
    best = (math.inf, 1, 1)
    for p_m in range(1, min(cores, rows) + 1):
        p_n = min(cols, cores // p_m)
        traffic = op.weight_bytes / p_n + op.input_bytes / p_m
        best = min(best, (traffic, p_m, p_n))
    return best[1], best[2]


def _shares(op: Op, hw: Hardware, mapping: Mapping, batch: int) -> list[_Share]:
    """Per-core shares, one entry per core used (cores 0, 1, …)."""
    cores = hw.cores.count
    if mapping == "batch":
        return [_Share(n / batch, 1.0, n / batch) for n in _split(batch, cores)]
    if op.kind in {"matmul", "ternary_matmul"}:
        p_m, p_n = _grid(op, cores)
        return [_Share(1 / (p_m * p_n), 1 / p_n, 1 / p_m)] * (p_m * p_n)
    extent = op.dims.get("parallel", 1)
    return [_Share(n / extent, n / extent, n / extent) for n in _split(extent, cores)]


def _core_slices(op: Op, hw: Hardware, mapping: Mapping, batch: int
                 ) -> tuple[tuple[Range, ...], tuple[Range, ...]]:
    """Each core's rows and (matmuls) columns, in the order and sizes of `_shares`: a
    matmul's output rows × columns on the `_grid`, the parallel extent otherwise; under
    batch mapping the rows of the core's sequences (and every column)."""
    cores = hw.cores.count
    matmul = op.kind in {"matmul", "ternary_matmul"}
    extent = op.dims["m"] * op.dims["batch"] if matmul else op.dims.get("parallel", 1)
    if mapping == "batch":
        rows = tuple((a * extent // batch, b * extent // batch) for a, b in _ranges(batch, cores))
        return rows, ((0, op.dims["n"]),) * len(rows) if matmul else ()
    if not matmul:
        return _ranges(extent, cores), ()
    p_m, p_n = _grid(op, cores)
    row_ranges, col_ranges = _ranges(extent, p_m), _ranges(op.dims["n"], p_n)
    return (tuple(r for r in row_ranges for _ in col_ranges),
            tuple(c for _ in row_ranges for c in col_ranges))


def _step_latency_ns(hw: Hardware, unit: Unit) -> float:
    """One dependent step of a recurrence: the unit's pipeline plus fetching its inputs."""
    fetch = hw.memory.l2.latency if hw.memory.l2 else hw.memory.dram.latency
    return unit.latency.ns(hw.core_clock) + fetch.ns(hw.core_clock)


def _chunks(nbytes: float, sram: float, granularity: int) -> int:
    if nbytes <= 0:
        return 1
    tiles = math.ceil(nbytes / max(1.0, sram / 2))  # half the SRAM: double buffering
    return max(1, min(tiles, granularity))


def _generic(op: Op, hw: Hardware, mapping: Mapping, batch: int, granularity: int,
             unit_name: str, unit: Unit, factor: float, per_cycle: float) -> Kernel:
    """Split an op across cores by shares (no tiling), placing bytes by where they fit."""
    clock = hw.core_clock
    l2 = hw.memory.l2
    score_bytes = 0.0
    if op.kind == "attention" and not hw.scheduling.fused_attention:
        d = op.dims  # scores S and probabilities P written and read back: 4 passes
        score_bytes = 4.0 * d["batch"] * d["heads"] * d["q_len"] * d["kv_len"] * 2
    shares = _shares(op, hw, mapping, batch)
    groups: dict[tuple[_Share, int], list[int]] = {}
    for core, share in enumerate(shares):
        channel = 0 if hw.memory.dram.interleave else core % hw.memory.dram.channels
        groups.setdefault((share, channel), []).append(core)
    # activation bytes that must reach DRAM at least once, spread over the cores used
    unique_in = (op.input_bytes + score_bytes / 2) / len(shares)
    unique_out = (op.output_bytes + score_bytes / 2) / len(shares)
    spills = l2 is not None and (unique_in + unique_out) * len(shares) > l2.capacity / 2
    parts = []
    for (share, channel), cores in groups.items():
        work = share.work
        act_in = op.input_bytes * share.input + score_bytes * work / 2
        act_out = op.output_bytes * work + score_bytes * work / 2
        load = op.weight_bytes * share.weight + op.state_read_bytes * work
        store = op.state_write_bytes * work
        l2_bytes = sram_bytes = 0.0
        if hw.scheduling.resident_activations and act_in + act_out <= hw.cores.sram:
            sram_bytes = act_in + act_out
        elif l2 is not None:
            # everything passes through the shared L2; DRAM sees each byte once, and
            # activations not at all while the op's working set fits half the L2
            l2_bytes = load + store + act_in + act_out
            load = op.weight_bytes / len(shares) + op.state_read_bytes * work
            if spills:
                load, store = load + unique_in, store + unique_out
        else:
            load, store = load + act_in, store + act_out
        compute = op.ops * work * factor * unit.stages * unit.slow_ops.get(op.fn, 1.0)
        compute_ns = compute / per_cycle / clock * 1e9
        if op.kind == "recurrence":  # h_t needs h_{t-1}: steps cannot overlap in time
            steps = op.dims["numel"] // max(1, op.dims["parallel"])
            compute_ns = max(compute_ns, steps * _step_latency_ns(hw, unit))
        if op.kind == "attention":
            d = op.dims
            scores = d["batch"] * d["heads"] * d["pairs"] * work
            compute_ns += vector_ns(hw, scores * SOFTMAX_OPS_PER_SCORE, "", "softmax", op.dtype)
            compute_ns += vector_ns(hw, scores, "exp", "softmax", op.dtype)
        parts.append(Part(
            cores=tuple(cores), channel=channel, unit=unit_name,
            chunks=_chunks(max(load + store, l2_bytes), hw.cores.sram, granularity),
            dram_load_bytes=load, dram_store_bytes=store, l2_bytes=l2_bytes,
            sram_bytes=sram_bytes, compute_ns=compute_ns, latency_ns=unit.latency.ns(clock),
            port_ns_per_byte=_port_ns_per_byte(hw, _stream_in_flight(hw), load, store,
                                               l2_bytes, len(shares))))
    chunks = [1] * len(shares)
    for part in parts:
        for core in part.cores:
            chunks[core] = part.chunks
    rows, cols = _core_slices(op, hw, mapping, batch)
    assert len(rows) == len(shares), (op.name, len(rows), len(shares))
    return tuple(parts), SliceSchedule(rows, cols, tuple(chunks))


def _stream_in_flight(hw: Hardware) -> float:
    return hw.cores.stream_in_flight or 0.0


def _port_ns_per_byte(hw: Hardware, in_flight: float, dram_load: float, store: float,
                      l2_bytes: float, active: int | None = None) -> float:
    """A part's port time per byte (0: the machine's access rate): its loads and stores
    move at what it keeps in flight over their latency (Little's law; DRAM's for the
    share that goes to DRAM, the L2's for the rest)."""
    moved = l2_bytes or dram_load + store
    if in_flight <= 0 or moved <= 0:
        return 0.0
    return 1.0 / fetch_bytes_per_ns(hw, in_flight, min(1.0, (dram_load + store) / moved),
                                    active)


def _from_work(work: list[CoreWork], hw: Hardware, unit_name: str, unit: Unit,
               granularity: int) -> Stage:
    """Group cores with identical work into parts."""
    groups: dict[CoreWork, list[int]] = {}
    for core, item in enumerate(work):
        groups.setdefault(item, []).append(core)
    shared_cache = hw.memory.l2 is not None
    parts = []
    for item, cores in groups.items():
        # without a shared L2 every tile's loads, re-reads included, come from DRAM
        load = item.dram_load_bytes if shared_cache else max(
            item.dram_load_bytes, item.l2_bytes - item.dram_store_bytes)
        l2_bytes = item.l2_bytes if shared_cache else 0.0
        parts.append(Part(
            cores=tuple(cores), channel=0, unit=unit_name,
            chunks=max(1, min(item.units, granularity)), dram_load_bytes=load,
            dram_store_bytes=item.dram_store_bytes, l2_bytes=l2_bytes, sram_bytes=0.0,
            compute_ns=item.compute_ns, latency_ns=unit.latency.ns(hw.core_clock),
            port_ns_per_byte=_port_ns_per_byte(hw, item.in_flight, load,
                                               item.dram_store_bytes, l2_bytes,
                                               item.active or None)))
    return tuple(parts)


def _streaming(hw: Hardware, elements: float, read: float, write: float, ops: float,
               fn: str, kind: str, granularity: int) -> Kernel:
    """An element-wise kernel over `elements`: bytes read/written and ops per element."""
    cores = hw.cores.count
    found = unit_for(hw, kind, "fp32", kind)
    per_core = elements / cores
    work = [CoreWork(1, vector_ns(hw, per_core * ops, fn, kind, "fp32"),
                     per_core * (read + write), per_core * read, per_core * write,
                     _stream_in_flight(hw))] * cores
    return (_from_work(work, hw, found[0], found[1], granularity),
            StreamSchedule(elements, cores))


def _gemm(hw: Hardware, unit_name: str, unit: Unit, per_cycle: float, granularity: int,
          m: int, n: int, k: int, batch: int, elem: tuple[float, float, float],
          decode: float = 0.0, fixed: Tile | None = None) -> Kernel:
    schedule, work = gemm_work(hw, unit, per_cycle, m, n, k, batch, elem, decode, fixed)
    return _from_work(work, hw, unit_name, unit, granularity), schedule


def weight_dtype(op: Op) -> str:
    """The dtype a matmul's weights are stored in (a ternary matmul's: ternary)."""
    if op.kind == "ternary_matmul":
        return "ternary"
    return op.weight_dtype or op.dtype


class UnsupportedPair(UserError):
    """A matmul whose activation × weight dtypes no kernel of the machine runs (named after
    `simulate op`'s --weight-dtype; a quantized model names its --quant instead)."""

    def __init__(self, hw: Hardware, unit_name: str, unit: Unit, act: str, weight: str) -> None:
        pairs = ", ".join(f"{k.act}×{k.weight}" for k in unit.kernels) or "none"
        self.detail = (f"{hw.source}: cores.units.{unit_name}.kernels has no {act} activation "
                       f"× {weight} weight GEMM (it lists {pairs}); expected a pair the machine "
                       "runs")
        super().__init__(f"--weight-dtype {weight}", self.detail)


def low_bit_kernel(hw: Hardware, unit_name: str, unit: Unit, op: Op) -> LowBitKernel | None:
    """The mixed-dtype kernel a matmul runs on a matrix unit (None: both operands in
    op.dtype); a pair the machine has no kernel for is refused."""
    act, weight = ("int8" if op.kind == "ternary_matmul" else op.dtype), weight_dtype(op)
    if weight == act:
        return None
    for kernel in unit.kernels:
        if (kernel.act, kernel.weight) == (act, weight):
            return kernel
    raise UnsupportedPair(hw, unit_name, unit, act, weight)


@dataclass(frozen=True)
class MatmulInputs:
    """What a matmul's tile plan is computed from: the MMA dtype, the rate its main loop
    sustains (FLOPs per cycle), bytes per element of A, B (as stored) and C, and the
    vector-unit ops per weight that unpack B."""

    rate_key: str
    rate: float
    elem: tuple[float, float, float]
    unpack: float


def matmul_inputs(op: Op, hw: Hardware, unit_name: str, unit: Unit) -> MatmulInputs:
    """The tile plan's inputs of a matmul on a tiled matrix unit (the same for the timing
    and for `simulate check`)."""
    kernel = low_bit_kernel(hw, unit_name, unit, op)
    rate_key, per_cycle = rate(unit, kernel.mma if kernel else (
        "ternary" if unit.kind == "ternary" else op.dtype))
    d = op.dims
    m, n, k, batch = d["m"], d["n"], d["k"], d["batch"]
    a_bytes = DTYPE_BYTES.get("int8" if op.kind == "ternary_matmul" else op.dtype, 2)
    b_bytes = op.weight_bytes / (k * n * batch) if op.weight_bytes else a_bytes
    c_bytes = op.output_bytes / (m * n * batch)
    sustained = per_cycle * unit.dtype_efficiency.get(rate_key, 1.0)  # type: ignore[call-overload]
    return MatmulInputs(rate_key, sustained, (a_bytes, b_bytes, c_bytes),
                        unit.unpack[kernel.weight] if kernel else 0.0)


def _tiled_matmul(op: Op, hw: Hardware, unit_name: str, unit: Unit, granularity: int,
                  inputs: MatmulInputs) -> tuple[Kernel, ...]:
    d = op.dims
    return (_gemm(hw, unit_name, unit, inputs.rate, granularity, d["m"], d["n"], d["k"],
                  d["batch"], inputs.elem, inputs.unpack, fixed_tile(op)),)


def fixed_tile(op: Op) -> Tile | None:
    """The one thread-block tile a matmul's kernel was compiled for (dims tile_m, tile_n,
    tile_k, set by the quantization scheme whose kernel it is); None: a library picks."""
    d = op.dims
    return (d["tile_m"], d["tile_n"], d["tile_k"]) if "tile_m" in d else None


def _tiled_attention(op: Op, hw: Hardware, unit_name: str, unit: Unit, per_cycle: float,
                     granularity: int) -> tuple[Kernel, ...]:
    d = op.dims
    backward = bool(d.get("backward"))
    elem = DTYPE_BYTES.get(op.dtype, 2)
    b, h, sq, sk, hd = d["batch"], d["heads"], d["q_len"], d["kv_len"], d["head_dim"]
    if hw.scheduling.fused_attention:
        flash = hw.scheduling.flash
        stages = []
        if backward:  # D = rowsum(dO ∘ O) first, dQ from fp32 to the input type last
            stages.append(_streaming(hw, b * h * sq * hd, 2 * elem, 4 / hd, 2, "", "reduction",
                                     granularity))
        schedule, work = flash_work(hw, unit, per_cycle, flash, d, backward, op.dtype)
        stages.append((_from_work(work, hw, unit_name, unit, granularity), schedule))
        if backward:
            stages.append(_streaming(hw, b * h * sq * hd, 4, elem, 1, "", "elementwise",
                                     granularity))
        return tuple(stages)
    # unfused (PyTorch): scores materialised in DRAM, softmax as its own kernel(s)
    gemm = lambda m, n, k: _gemm(hw, unit_name, unit, per_cycle, granularity, m, n, k,  # noqa: E731
                                 b * h, (elem, elem, elem))
    scores = b * h * sq * sk
    masked = [_streaming(hw, scores, elem, elem, 1, "", "elementwise", granularity)] if d.get(
        "causal") else []
    # a row too long for one block is read three times (max, sum of exp, output) [PyTorch
    # aten/src/ATen/native/cuda/SoftMax.cu]; its backward reads P and dP twice each
    softmax_parts, softmax_schedule = _streaming(
        hw, scores, SOFTMAX_READS * elem, elem, SOFTMAX_OPS_PER_SCORE, "", "softmax",
        granularity)
    exp_cost = vector_ns(hw, scores / hw.cores.count, "exp", "softmax", "fp32")
    softmax = (tuple(Part(**{**p.__dict__, "compute_ns": p.compute_ns + exp_cost})
                     for p in softmax_parts), softmax_schedule)
    # Q, K, V and O (grads too, backward) re-laid out between (b, t, h, d) and (b·h, t, d)
    copies = _streaming(hw, 4 * b * h * sq * hd, elem, elem, 0, "", "memory", granularity)
    if not backward:
        return (copies, gemm(sq, sk, hd), *masked, softmax, gemm(sq, hd, sk))
    softmax_backward = _streaming(hw, scores, 2 * SOFTMAX_BACKWARD_READS * elem, elem, 3, "",
                                  "softmax", granularity)
    return (copies, gemm(sq, sk, hd), gemm(sk, hd, sq), softmax_backward, *masked,
            gemm(sq, hd, sk), gemm(sk, hd, sq))


def map_op(op: Op, hw: Hardware, mapping: Mapping, batch: int, granularity: int) -> Task:
    """Turn `op` into kernels of per-core parts on `hw`."""
    unit_name, unit, factor = unit_for(hw, op.kind, op.dtype, op.module or op.name)
    rate_key, per_cycle = rate(unit, "ternary" if unit.kind == "ternary" else op.dtype)
    tiled = unit.kind == "matrix" and bool(unit.tiles) and mapping == "tensor"
    if tiled and op.kind in {"matmul", "ternary_matmul"}:
        inputs = matmul_inputs(op, hw, unit_name, unit)
        rate_key = inputs.rate_key
        kernels = _tiled_matmul(op, hw, unit_name, unit, granularity, inputs)
    elif tiled and op.kind == "attention":
        kernels = _tiled_attention(op, hw, unit_name, unit, per_cycle, granularity)
    else:
        if op.kind == "matmul" and op.weight_dtype and op.weight_dtype != op.dtype:
            low_bit_kernel(hw, unit_name, unit, op)  # untiled units list no such kernels
        kernels = (_generic(op, hw, mapping, batch, granularity, unit_name, unit, factor,
                            per_cycle),)
    return Task(op=op, stages=tuple(stage for stage, _ in kernels), unit_kind=unit.kind,
                rate_key=rate_key, energy_ops=op.ops * factor, lane_deps=mapping == "batch",
                schedules=tuple(schedule for _, schedule in kernels))


def _signature(op: Op) -> tuple:
    """What the mapping of an op depends on: everything but its name, place and producers."""
    return (op.fn, op.kind, op.dtype, op.weight_dtype, op.ops, op.weight_bytes,
            op.state_read_bytes,
            op.state_write_bytes, op.input_bytes, op.output_bytes, tuple(sorted(op.dims.items())))


#: Times a collective op on the links of the system a device trace runs in (ns).
Links = Callable[[Op], float]


def map_trace(trace: Trace, hw: Hardware, mapping: Mapping = "tensor",
              granularity: int = DEFAULT_GRANULARITY, links: Links | None = None
              ) -> list[Task]:
    """Map every op of `trace` onto `hw` (ops that recur in every layer are mapped once);
    a collective op (a device's share of a parallel model) is timed by `links`."""
    if granularity < 1:
        raise UserError("--granularity", "expected a whole number of chunks ≥ 1")
    from simulator.engine.memo import table

    kept = table(hw, "tasks")  # ops mapped in earlier calls (collectives: per call)
    mapped: dict[tuple, Task] = {}
    tasks = []
    for op in trace.ops:
        key = _signature(op)
        known = mapped.get(key)
        if known is None and op.kind == "collective":
            if links is None:
                raise ValueError(f"{op.module}: a collective needs the system's links")
            known = mapped[key] = Task(op=op, stages=(), unit_kind="link", rate_key="",
                                       energy_ops=0.0, lane_deps=False, link_ns=links(op))
            tasks.append(known)
            continue
        if known is None:
            kept_key = (mapping, trace.batch, granularity, key)
            known = kept.get(kept_key)
            if known is None:
                known = kept[kept_key] = map_op(op, hw, mapping, trace.batch, granularity)
            mapped[key] = known
        tasks.append(known if known.op is op else _with_op(known, op))
    return tasks


def _with_op(task: Task, op: Op) -> Task:
    """`task` for `op` (an op of the same signature): dataclasses.replace, but cheaper."""
    new = object.__new__(Task)
    new.__dict__.update(task.__dict__, op=op)
    return new
