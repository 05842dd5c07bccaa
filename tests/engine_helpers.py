"""Build synthetic ops and machines for engine tests."""

from __future__ import annotations

from typing import Any

from simulator.hardware.loader import validate
from simulator.hardware.schema import Hardware
from simulator.workload.trace import Op, Trace


def op(index: int, kind: str = "matmul", ops: int = 0, weight_bytes: int = 0,
       deps: tuple[int, ...] = (), parallel: int = 1, layer: str = "layers.0",
       dtype: str = "bf16", **dims: int) -> Op:
    all_dims = {"m": 1, "n": parallel, "k": 1, "batch": 1, "parallel": parallel, **dims}
    return Op(index=index, name=f"aten.{kind}", fn=kind, kind=kind, module=layer, layer=layer,
              dtype=dtype, ops=ops, weight_bytes=weight_bytes, state_read_bytes=0,
              state_write_bytes=0, input_bytes=0, output_bytes=0, dims=all_dims, deps=deps,
              shapes="")


def trace_of(*ops: Op, batch: int = 1) -> Trace:
    return Trace(model="synthetic", model_key="", phase="decode", batch=batch, context=0,
                 prompt=0, tokens=batch, weights_bytes=sum(o.weight_bytes for o in ops),
                 state_bytes=0, activation_bytes=0, ops=tuple(ops))


def machine(data: dict[str, Any]) -> Hardware:
    return validate(data, "test-machine")
