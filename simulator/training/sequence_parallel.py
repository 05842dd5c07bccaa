"""Ulysses sequence parallelism in a training step (`--sp N`; Jacobs et al., arXiv
2309.14509): each sequence's tokens cut into N parts, one per device, every op outside
attention on its device's part, the weights whole on every device.

Around each attention an all-to-all turns the token split into a head split: forward (and
recompute) before it q, k and v, after it the output; the backward turns the output's
gradient into heads before the attention backward and the q, k and v gradients back into
tokens after it (the saved q, k, v and output stay in heads). Weight gradients sum over
the device's tokens (the weight-gradient GEMMs' token dimension, the bias and embedding
gradients' inputs, shrink; their outputs are whole) and are reduced, with the data-parallel
replicas', over all dp × sp devices: ZeRO partitions over them too, as DeepSpeed does.
"""

from __future__ import annotations

import math
from dataclasses import replace

from simulator.errors import UserError
from simulator.sequence import _alltoall
from simulator.shares import token_share
from simulator.workload.trace import Op
from simulator.workload.training import TrainingTrace


def _check(training: TrainingTrace, sp: int) -> None:
    for op in training.trace.ops:
        if op.kind != "attention":
            continue
        for key in ("heads", "kv_heads"):
            if op.dims[key] % sp:
                raise UserError("--sp", f"expected a divisor of the model's {op.dims[key]} "
                                        f"{key.replace('_', ' ')} (Ulysses splits attention "
                                        f"by heads), not {sp}")
        if op.dims["q_len"] % sp:
            raise UserError("--sp", f"expected a divisor of the {op.dims['q_len']} tokens per "
                                    f"sequence, not {sp}")


def _tokens(op: Op, sp: int) -> Op:
    """`op` on its device's 1/sp of the tokens."""
    if op.stage == "bwd_weight":  # sums over tokens into a whole parameter gradient
        if op.kind == "matmul":
            k = op.dims["k"]
            part = math.ceil(k / sp)
            return op.evolve(ops=math.ceil(op.ops / sp),
                             input_bytes=math.ceil(op.input_bytes * part / k),
                             dims={**op.dims, "k": part})
        return op.evolve(ops=math.ceil(op.ops / sp), input_bytes=math.ceil(op.input_bytes / sp))
    return token_share(op, 1 / sp)


def split_sequence_training(training: TrainingTrace, sp: int) -> TrainingTrace:
    """One device's share of `training` under Ulysses sequence parallelism of degree `sp`."""
    if sp == 1:
        return training
    _check(training, sp)
    ops: list[Op] = []
    moved: dict[int, int] = {}
    share: dict[int, float] = {}

    def emit(op: Op, deps: tuple[int, ...]) -> int:
        ops.append(op.evolve(index=len(ops), deps=deps))
        return len(ops) - 1

    for op in training.trace.ops:
        deps = tuple(moved[d] for d in op.deps)
        if op.stage == "optim":
            new = op
            moved[op.index] = emit(op, deps)
        elif op.kind != "attention":
            new = _tokens(op, sp)
            moved[op.index] = emit(new, deps)
        else:
            d = op.dims
            new = replace(token_share(op, 1 / sp), dims={
                **d, "heads": d["heads"] // sp, "kv_heads": d["kv_heads"] // sp,
                "parallel": max(1, d["parallel"] // sp)})
            qkv = op.output_bytes if op.stage == "bwd_act" else op.input_bytes
            q = math.ceil(qkv * d["heads"] / (d["heads"] + 2 * d["kv_heads"]) / sp)
            qkv = math.ceil(qkv / sp)  # one device's tokens, all heads
            first, last = (((q, "ulysses_dout"), (qkv, "ulysses_dqkv"))
                           if op.stage == "bwd_act" else ((qkv, "ulysses_qkv"),
                                                          (q, "ulysses_out")))
            before = emit(_alltoall(op, first[0], sp, first[1]).evolve(stage=op.stage), deps)
            attention = emit(new, (before,))
            moved[op.index] = emit(_alltoall(op, last[0], sp, last[1]).evolve(stage=op.stage),
                                   (attention,))
        share[op.index] = new.output_bytes / op.output_bytes if op.output_bytes else 1.0
    buffers = tuple(replace(b, bytes=b.bytes if b.category == "gradients"  # whole parameters
                            else math.ceil(b.bytes * share[b.alloc]),
                            alloc=moved[b.alloc], free=b.free if b.free < 0 else moved[b.free])
                    for b in training.buffers)
    return replace(training, trace=replace(training.trace,
                                           model=f"{training.trace.model} [sp {sp}]",
                                           ops=tuple(ops)), buffers=buffers)
