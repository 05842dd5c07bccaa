"""Energy and power: Σ ops × energy/op + Σ bytes × energy/byte per level + static × time.

Energies in joules, times in seconds, power in watts (Accelergy-style: one table of
per-action energies per machine, kept in the hardware YAML).
"""

from __future__ import annotations

from dataclasses import dataclass

from simulator.engine import Timeline
from simulator.hardware.schema import Hardware
from simulator.mapping import Task


@dataclass(frozen=True)
class Energy:
    """Energy of one run split by cause, in joules."""

    static_j: float
    compute_j: float
    dram_j: float
    onchip_j: float
    host_j: float
    per_op_j: tuple[float, ...]

    @property
    def total_j(self) -> float:
        return self.static_j + self.compute_j + self.dram_j + self.onchip_j + self.host_j


def op_energy_per_op(hw: Hardware, unit_kind: str, rate_key: str) -> float:
    """Joules per rated operation of a unit kind and data type."""
    table = hw.power.op_energy.get(unit_kind, {})  # type: ignore[call-overload]
    return float(table.get(rate_key, table.get("default", 0.0)))


def energy(hw: Hardware, tasks: list[Task], timeline: Timeline) -> Energy:
    """Energy of `timeline`; static power accrues over the whole makespan."""
    seconds = timeline.makespan_ns * 1e-9
    cores_used = max((max(p.cores) + 1 for t in tasks for p in t.parts), default=1)
    logic = hw.power.logic.full * hw.power.logic.utilisation if hw.power.logic else 0.0
    static = (hw.power.idle + logic
              + hw.power.per_core * min(cores_used, hw.cores.count)) * seconds
    per_byte = hw.power.byte_energy
    dram_per_byte = per_byte.dram
    activated_ratio = (timeline.usage.dram_activated_bytes / timeline.usage.dram_bytes
                       if timeline.usage.dram_bytes else 1.0)
    per_op: list[float] = []
    compute = dram = onchip = 0.0
    known: dict[tuple, tuple[float, float, float]] = {}  # a layer's ops recur in every layer
    for task in tasks:
        key = (id(task.stages), task.energy_ops, task.unit_kind, task.rate_key)
        if (parts := known.get(key)) is None:
            parts = known[key] = (
                task.energy_ops * op_energy_per_op(hw, task.unit_kind, task.rate_key),
                sum((p.dram_load_bytes + p.dram_store_bytes) * p.size for p in task.parts),
                sum((p.l2_bytes * per_byte.l2 + p.sram_bytes * per_byte.sram) * p.size
                    for p in task.parts))
        op_compute, moved, op_onchip = parts
        op_dram = moved * activated_ratio * dram_per_byte
        compute, dram, onchip = compute + op_compute, dram + op_dram, onchip + op_onchip
        per_op.append(op_compute + op_dram + op_onchip)
    host = timeline.usage.host_bytes * per_byte.host
    return Energy(static_j=static, compute_j=compute, dram_j=dram, onchip_j=onchip, host_j=host,
                  per_op_j=tuple(per_op))
