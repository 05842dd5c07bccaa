"""Which functional unit runs an op, and at what rate (questions asked of a Hardware)."""

from __future__ import annotations

from simulator.errors import Infeasible, UserError
from simulator.hardware.schema import Hardware, Unit

#: The model config's torch_dtype of each traced dtype (for errors naming that field).
TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class UnratedDtype(UserError):
    """A matmul or attention in a dtype no unit that could run it has a rate for.

    Named after `simulate op`'s --dtype; `for_model` names a model's torch_dtype instead.
    """

    def __init__(self, hw: Hardware, kind: str, dtype: str, unit: str) -> None:
        rated = ", ".join(hw.cores.units[unit].ops_per_cycle)
        self.detail = (f"{hw.source}: cores.units.{unit}.ops_per_cycle rates {rated}, not "
                       f"{dtype}, and no other unit runs {kind} in {dtype}; expected a dtype "
                       "the machine rates")
        self.dtype = dtype
        super().__init__(f"--dtype {dtype}", self.detail)

    def for_model(self, model: str) -> UserError:
        """The same error, naming the model's torch_dtype as the cause."""
        name = TORCH_DTYPES.get(self.dtype, self.dtype)
        return UserError(f"--model {model}: torch_dtype {name}", self.detail)


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
    """(rate key, ops per cycle) of `unit` for `dtype`; fp32 or the slowest rate otherwise.

    The fallback serves vector ops (element-wise work in a dtype a vector unit does not
    list runs at its fp32 rate); `unit_for` never picks a unit for a matmul or attention
    that does not rate its dtype.
    """
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
        vector = vector_unit(hw, "elementwise")
        if vector and dtype in vector[1].ops_per_cycle:
            return vector[0], vector[1], 0.5  # an FMA (2 FLOPs) is one vector element-op
        # name the matrix unit it would run on, else the vector unit it would fall back to
        named = next((name for name, unit in hw.cores.units.items() if unit.kind == "matrix"),
                     vector[0] if vector else None)
        if named is not None:
            raise UnratedDtype(hw, kind, dtype, named)
    else:
        found = vector_unit(hw, kind)
        if found:
            return found[0], found[1], 1.0
    raise UserError(f"{hw.source}: cores.units", f"no unit can execute {kind} ({dtype}) of {where}")


def vector_ns(hw: Hardware, elements: float, fn: str, kind: str, dtype: str) -> float:
    """Nanoseconds one core's vector unit for `kind` needs for `elements` of `fn`."""
    found = vector_unit(hw, kind)
    if found is None:
        raise UserError(f"{hw.source}: cores.units", f"no vector unit runs {kind}")
    _, unit = found
    _, per_cycle = rate(unit, dtype)
    return elements * unit.stages * unit.slow_ops.get(fn, 1.0) / per_cycle / hw.core_clock * 1e9


def check_mapping(hw: Hardware, mapping: str) -> None:
    """Refuse a mapping that is not one of the machine's `scheduling.mappings`."""
    if mapping not in ("tensor", "batch"):
        raise UserError("--mapping", f"expected 'tensor' or 'batch', not '{mapping}'")
    declared = hw.scheduling.mappings
    if mapping not in declared:
        raise Infeasible(f"--mapping {mapping}",
                         f"{hw.source}: scheduling.mappings is [{', '.join(declared)}]; "
                         f"expected {' or '.join(declared)}")


def peak_flops(hw: Hardware, dtype: str) -> float:
    """The machine's peak matrix FLOP/s in `dtype` (every core's matrix unit)."""
    rates = [unit.ops_per_cycle[dtype] for unit in hw.cores.units.values()
             if unit.kind == "matrix" and dtype in unit.ops_per_cycle]
    if not rates:
        raise UserError("--hw", f"{hw.name} has no matrix unit rated for {dtype} "
                        "(cores.units.*.ops_per_cycle); expected one to train on")
    return max(rates) * hw.cores.count * hw.core_clock
