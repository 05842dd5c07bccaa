"""Which functional unit runs an op, and at what rate (questions asked of a Hardware)."""

from __future__ import annotations

from simulator.errors import UserError
from simulator.hardware.schema import Hardware, Unit


def vector_unit(hw: Hardware, kind: str) -> tuple[str, Unit] | None:
    """The first vector unit that handles op class `kind`."""
    for name, unit in hw.cores.units.items():
        if unit.kind == "vector" and (unit.handles is None or kind in unit.handles):
            return name, unit
    return None


def unit_of_kind(hw: Hardware, kind: str, dtype: str) -> tuple[str, Unit] | None:
    """The first unit of `kind` rated for `dtype`."""
    for name, unit in hw.cores.units.items():
        if unit.kind == kind and dtype in unit.ops_per_cycle:
            return name, unit
    return None


def rate(unit: Unit, dtype: str) -> tuple[str, float]:
    """(rate key, ops per cycle) of `unit` for `dtype`; fp32 or the slowest rate otherwise."""
    if dtype in unit.ops_per_cycle:
        return dtype, unit.ops_per_cycle[dtype]
    key = "fp32" if "fp32" in unit.ops_per_cycle else min(unit.ops_per_cycle,
                                                           key=unit.ops_per_cycle.__getitem__)
    return key, unit.ops_per_cycle[key]


def unit_for(hw: Hardware, kind: str, dtype: str, where: str) -> tuple[str, Unit, float]:
    """The unit that runs an op, and the factor from the op's count to its rated ops."""
    if kind == "ternary_matmul":
        # a ternary add is one int8 multiply-accumulate (2 ops) on a matrix unit
        for unit_kind, key, factor in (("ternary", "ternary", 1.0), ("matrix", "int8", 2.0)):
            found = unit_of_kind(hw, unit_kind, key)
            if found:
                return found[0], found[1], factor
    elif kind in {"matmul", "attention"}:
        found = unit_of_kind(hw, "matrix", dtype)
        if found:
            return found[0], found[1], 1.0
        found = vector_unit(hw, "elementwise")
        if found:
            return found[0], found[1], 0.5  # an FMA (2 FLOPs) is one vector element-op
    else:
        found = vector_unit(hw, kind)
        if found:
            return found[0], found[1], 1.0
    raise UserError(f"{hw.name}: cores.units", f"no unit can execute {kind} ({dtype}) of {where}")


def vector_ns(hw: Hardware, elements: float, fn: str, kind: str, dtype: str) -> float:
    """Nanoseconds one core's vector unit for `kind` needs for `elements` of `fn`."""
    found = vector_unit(hw, kind)
    if found is None:
        raise UserError(f"{hw.name}: cores.units", f"no vector unit runs {kind}")
    _, unit = found
    _, per_cycle = rate(unit, dtype)
    return elements * unit.stages * unit.slow_ops.get(fn, 1.0) / per_cycle / hw.core_clock * 1e9
