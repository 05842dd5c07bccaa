"""Sequence parallelism, DeepSpeed-Ulysses style (`--sp N`): every sequence's tokens are cut
into N equal parts, one per device, and every op outside attention works on its device's
part (weights whole on every device). Around each attention an all-to-all turns the
token split into a head split: before it, each device sends the other N − 1 devices their
heads of its tokens' new q, k and v; attention then runs on all tokens for heads/N (and
KV heads/N) on every device, the KV cache split by heads; after it, a second all-to-all
returns each device its tokens' outputs (Jacobs et al., arXiv 2309.14509, §3.1). The
messages are nccl-tests-sized: one device's whole buffer of its tokens for all heads.
Prefill and encoder passes only: a decode step's one new token per sequence has nothing to
split.
"""

from __future__ import annotations

import math
from dataclasses import replace

from simulator.errors import UserError
from simulator.shares import token_share
from simulator.workload.trace import Op, Trace


def check_sequence(trace: Trace, sp: int) -> None:
    """Refuse a degree the step cannot be split by, naming --sp."""
    if sp == 1:
        return
    if trace.phase == "decode":
        raise UserError("--sp", "splits a sequence's tokens over devices, and a decode step "
                                "has one per sequence; expected --phase prefill (or forward)")
    attentions = [op for op in trace.ops if op.kind == "attention"]
    if not attentions:
        raise UserError("--sp", "re-splits attention by heads; this model has no attention "
                                "op; expected --sp 1")
    for attention in attentions:
        for key in ("heads", "kv_heads"):
            if attention.dims[key] % sp:
                raise UserError("--sp", f"expected a divisor of the model's "
                                        f"{attention.dims[key]} {key.replace('_', ' ')} "
                                        f"(Ulysses splits attention by heads), not {sp}")
        if attention.dims["q_len"] % sp:
            raise UserError("--sp", f"expected a divisor of the {attention.dims['q_len']} "
                                    f"tokens per sequence, not {sp}")


def _alltoall(at: Op, nbytes: int, sp: int, name: str) -> Op:
    return Op(index=0, name="alltoall", fn="alltoall", kind="collective",
              module=f"{at.module}.{name}", layer=at.layer, dtype=at.dtype, ops=0,
              weight_bytes=0, state_read_bytes=0, state_write_bytes=0, input_bytes=nbytes,
              output_bytes=nbytes, dims={"devices": sp}, deps=(),
              shapes=f"{nbytes} B per device over {sp} devices")


def split_sequence(trace: Trace, sp: int) -> Trace:
    """One device's share of `trace` under Ulysses sequence parallelism of degree `sp`."""
    if sp == 1:
        return trace
    share = 1 / sp
    ops: list[Op] = []
    moved: dict[int, int] = {}

    def emit(op: Op, deps: tuple[int, ...]) -> int:
        ops.append(replace(op, index=len(ops), deps=deps))
        return len(ops) - 1

    for op in trace.ops:
        deps = tuple(moved[d] for d in op.deps)
        if op.kind != "attention":
            moved[op.index] = emit(token_share(op, share), deps)
            continue
        d = op.dims
        q = op.output_bytes  # the queries' shape; k and v are kv_heads / heads of them each
        qkv = math.ceil(q * (1 + 2 * d["kv_heads"] / d["heads"]) / sp)
        before = emit(_alltoall(op, qkv, sp, "ulysses_qkv"), deps)
        heads = replace(token_share(op, share), dims={
            **d, "heads": d["heads"] // sp, "kv_heads": d["kv_heads"] // sp,
            "parallel": max(1, d["parallel"] // sp)})
        attention = emit(heads, (before,))
        moved[op.index] = emit(_alltoall(op, math.ceil(op.output_bytes / sp), sp,
                                         "ulysses_out"), (attention,))
    return replace(trace, model=f"{trace.model} [sp {sp}]", ops=tuple(ops),
                   state_bytes=math.ceil(trace.state_bytes / sp),
                   activation_bytes=math.ceil(trace.activation_bytes / sp))
