"""An op's part on one device when its tokens are shared out (data, expert and sequence
parallelism): the work and bytes of a share of the tokens, the weights whole."""

from __future__ import annotations

import math
from dataclasses import replace

from simulator.workload.trace import Op

#: Dims that count tokens (or elements of them) and shrink with a device's share.
TOKEN_DIMS = ("numel", "parallel", "rows", "m", "pairs")


def token_share(op: Op, share: float) -> Op:
    """`op` on `share` of its tokens: its operations, activations and state traffic scaled
    (rounded up), its weights whole. Attention keeps its own dims (the caller says how
    its batch or heads are shared)."""
    def part(value: int) -> int:
        return math.ceil(value * share)

    dims = dict(op.dims)
    if op.kind != "attention":
        matmul = "n" in dims  # its `parallel` counts output features, not tokens
        for key in TOKEN_DIMS:
            if key in dims and not (matmul and key == "parallel"):
                dims[key] = max(1, part(dims[key]))
    return replace(op, ops=part(op.ops), input_bytes=part(op.input_bytes),
                   output_bytes=part(op.output_bytes), state_read_bytes=part(op.state_read_bytes),
                   state_write_bytes=part(op.state_write_bytes), dims=dims)
