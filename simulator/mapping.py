"""Mapping: each traced op → per-core parts of work, tiled by on-chip memory.

Two ways to use many cores:
- `tensor`: every op is split across cores along its parallel dimension (output features
  of a matmul, heads of attention, rows of a norm, elements of an element-wise op), the
  decomposition tensor parallelism and Union-of-Experts use. Consumers wait for all parts.
- `batch`: each core runs whole ops for its own sequences (the MatMul-free FPGA paper's
  projection); every core streams the full weights, and a core waits only for itself.

Cores given identical work on the same DRAM channels form one group, simulated once with
its traffic multiplied by the group size (exact for identical, simultaneously started
work under fair sharing; it keeps 108-SM GPUs cheap). Work is cut into at most
`granularity` chunks per part, each a coalesced run of SRAM-sized tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from simulator.errors import UserError
from simulator.hardware.schema import Hardware, Unit
from simulator.workload.trace import Op, Trace

Mapping = Literal["tensor", "batch"]
#: Default cap on coalesced chunks per part (see the engine's granularity knob).
DEFAULT_GRANULARITY = 8
#: Element operations per attention score pair on the vector unit (max, sub, sum, scale).
SOFTMAX_OPS_PER_SCORE = 4


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

    @property
    def size(self) -> int:
        return len(self.cores)


@dataclass(frozen=True)
class Task:
    """An op as the engine runs it: its parts, and which producer parts it waits for."""

    op: Op
    parts: tuple[Part, ...]
    unit_kind: str
    rate_key: str
    energy_ops: float
    lane_deps: bool


@dataclass(frozen=True)
class _Share:
    """One core's fractions of an op: its work, and the parts of weights and input it reads."""

    work: float
    weight: float
    input: float


def _split(extent: int, cores: int) -> list[int]:
    used = max(1, min(cores, extent))
    base, extra = divmod(extent, used)
    return [base + (1 if i < extra else 0) for i in range(used)]


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


def _vector_unit(hw: Hardware, kind: str) -> tuple[str, Unit] | None:
    for name, unit in hw.cores.units.items():
        if unit.kind == "vector" and (unit.handles is None or kind in unit.handles):
            return name, unit
    return None


def _of_kind(hw: Hardware, kind: str, dtype: str) -> tuple[str, Unit] | None:
    for name, unit in hw.cores.units.items():
        if unit.kind == kind and dtype in unit.ops_per_cycle:
            return name, unit
    return None


def _rate(unit: Unit, dtype: str) -> tuple[str, float]:
    if dtype in unit.ops_per_cycle:
        return dtype, unit.ops_per_cycle[dtype]
    key = "fp32" if "fp32" in unit.ops_per_cycle else min(unit.ops_per_cycle,
                                                           key=unit.ops_per_cycle.__getitem__)
    return key, unit.ops_per_cycle[key]


def _unit_for(op: Op, hw: Hardware) -> tuple[str, Unit, float]:
    """The unit that runs `op` and the factor from op counts to that unit's rated ops."""
    if op.kind == "ternary_matmul":
        # a ternary add is one int8 multiply-accumulate (2 ops) on a matrix unit
        for kind, dtype, factor in (("ternary", "ternary", 1.0), ("matrix", "int8", 2.0)):
            found = _of_kind(hw, kind, dtype)
            if found:
                return found[0], found[1], factor
    elif op.kind in {"matmul", "attention"}:
        found = _of_kind(hw, "matrix", op.dtype)
        if found:
            return found[0], found[1], 1.0
        found = _vector_unit(hw, "elementwise")
        if found:
            return found[0], found[1], 0.5  # an FMA (2 FLOPs) is one vector element-op
    else:
        found = _vector_unit(hw, op.kind)
        if found:
            return found[0], found[1], 1.0
    raise UserError(f"{hw.name}: cores.units",
                    f"no unit can execute {op.kind} ({op.dtype}) of {op.module or op.name}")


def _vector_ns(hw: Hardware, elements: float, fn: str, kind: str, dtype: str) -> float:
    found = _vector_unit(hw, kind)
    if found is None:
        raise UserError(f"{hw.name}: cores.units", f"no vector unit for the {kind} of attention")
    _, unit = found
    _, rate = _rate(unit, dtype)
    return elements * unit.stages * unit.slow_ops.get(fn, 1.0) / rate / hw.core_clock * 1e9


def _tile_chunks(nbytes: float, sram: float, granularity: int) -> int:
    if nbytes <= 0:
        return 1
    tiles = math.ceil(nbytes / max(1.0, sram / 2))  # half the SRAM: double buffering
    return max(1, min(tiles, granularity))


def map_op(op: Op, hw: Hardware, mapping: Mapping, batch: int, granularity: int) -> Task:
    """Split `op` into per-core parts on `hw`."""
    unit_name, unit, factor = _unit_for(op, hw)
    rate_key, rate = _rate(unit, "ternary" if unit.kind == "ternary" else op.dtype)
    clock = hw.core_clock
    l2 = hw.memory.l2
    unfused = op.kind == "attention" and not hw.scheduling.fused_attention
    score_bytes = 0.0
    if unfused:  # scores S and probabilities P written and read back: 4 passes
        d = op.dims
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
        compute_ns = compute / rate / clock * 1e9
        if op.kind == "attention":
            d = op.dims
            scores = d["batch"] * d["heads"] * d["pairs"] * work
            compute_ns += _vector_ns(hw, scores * SOFTMAX_OPS_PER_SCORE, "", "softmax", op.dtype)
            compute_ns += _vector_ns(hw, scores, "exp", "softmax", op.dtype)
        parts.append(Part(
            cores=tuple(cores), channel=channel, unit=unit_name,
            chunks=_tile_chunks(max(load + store, l2_bytes), hw.cores.sram, granularity),
            dram_load_bytes=load, dram_store_bytes=store, l2_bytes=l2_bytes,
            sram_bytes=sram_bytes, compute_ns=compute_ns,
            latency_ns=unit.latency.ns(clock)))
    return Task(op=op, parts=tuple(parts), unit_kind=unit.kind, rate_key=rate_key,
                energy_ops=op.ops * factor, lane_deps=mapping == "batch")


def map_trace(trace: Trace, hw: Hardware, mapping: Mapping = "tensor",
              granularity: int = DEFAULT_GRANULARITY) -> list[Task]:
    """Map every op of `trace` onto `hw`."""
    if granularity < 1:
        raise UserError("--granularity", "expected a whole number of chunks ≥ 1")
    return [map_op(op, hw, mapping, trace.batch, granularity) for op in trace.ops]
