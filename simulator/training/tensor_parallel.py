"""Tensor parallelism in a training step: one device's share of the forward, backward and
optimizer under Megatron-LM's splits (Shoeybi et al., arXiv 1909.08053), with the
collectives they need.

In every block the linears that take the block's input (q/k/v, gate/up; GPT-2's c_attn,
c_fc) are split by output columns and those that take the attention output or the MLP's
hidden activations (o/down, c_proj) by input rows; attention splits its heads, and the ops
between the two splits (RoPE, activations, their backward) work on 1/tp of the elements.
The word embedding and the LM head are split by vocabulary, with the loss computed on each
device's vocabulary share (Megatron's vocab-parallel cross-entropy; its two all-reduces of
one value per token are not modelled). Norms, residual adds and position embeddings run
whole on every device.

A row split's forward output, a column split's activation gradient (its input's gradient,
the sum over the group of each device's partial product; Megatron's `f` operator) and the
split embedding's output are partial sums: an all-reduce over the group precedes their
first reader that is not itself accumulating partial sums (a column linear's gradient adds,
as for q, k and v). Recompute re-runs the forward's all-reduces. Each tensor of the step
shrinks with the op that makes it; a split module's parameters (a row split's bias is
whole), gradients and optimizer state are 1/tp per device.
"""

from __future__ import annotations

import math
from dataclasses import replace

from simulator.errors import UserError
from simulator.workload.quant import in_block, linear_input
from simulator.workload.trace import Op
from simulator.workload.training import TrainingTrace

_FORWARD = ("fwd", "recompute")


def _is_block(layer: str) -> bool:
    return layer.rpartition(".")[2].isdigit()


def _ceil(value: int, tp: int) -> int:
    return math.ceil(value / tp)


def _elementwise(op: Op, tp: int) -> Op:
    """1/tp of an op's elements (an op between the splits, the vocabulary's share)."""
    dims = {key: (_ceil(value, tp) if key in ("numel", "parallel", "weight_bytes") else value)
            for key, value in op.dims.items()}
    return op.evolve(ops=_ceil(op.ops, tp), weight_bytes=_ceil(op.weight_bytes, tp),
                     input_bytes=_ceil(op.input_bytes, tp),
                     output_bytes=_ceil(op.output_bytes, tp),
                     state_read_bytes=_ceil(op.state_read_bytes, tp),
                     state_write_bytes=_ceil(op.state_write_bytes, tp), dims=dims)


def _cut(op: Op, dim: str, tp: int, pad: bool = False) -> Op:
    """A GEMM with dimension `dim` (m, n or k) cut tp ways: its work, weights and the
    operand bytes that dimension spans. `pad`: the vocabulary, padded to a multiple of tp
    (Megatron's `make_vocab_size_divisible_by`)."""
    d = op.dims
    if d[dim] % tp and not pad:
        raise UserError("--tp", f"expected a divisor of {op.module}'s {d[dim]} features, "
                                f"not {tp}")
    m, n, k = d["m"], d["n"], d["k"]
    new = {**d, dim: _ceil(d[dim], tp)}
    mm, nn, kk = new["m"], new["n"], new["k"]
    if op.stage == "bwd_weight":  # dW[m×n] from two operands spanning k: (m + n)·k read
        inputs = math.ceil(op.input_bytes * (mm + nn) / (m + n))
    else:  # activations [m×k] in (the weights count apart)
        inputs = math.ceil(op.input_bytes * kk / k)
    parallel = new["n"] if "parallel" in d and d["parallel"] == n else d.get("parallel", nn)
    return op.evolve(ops=_ceil(op.ops, tp), weight_bytes=_ceil(op.weight_bytes, tp),
                     input_bytes=inputs, output_bytes=math.ceil(op.output_bytes * mm * nn
                                                                / (m * n)),
                     dims={**new, "parallel": parallel})


def _allreduce(producer: Op, tp: int) -> Op:
    nbytes = producer.output_bytes
    return Op(index=0, name="allreduce", fn="allreduce", kind="collective",
              module=f"{producer.module}.allreduce", layer=producer.layer,
              dtype=producer.dtype, ops=0, weight_bytes=0, state_read_bytes=0,
              state_write_bytes=0, input_bytes=nbytes, output_bytes=nbytes,
              dims={"devices": tp}, deps=(), stage=producer.stage,
              shapes=f"{nbytes} B over {tp} devices")


class _Splits:
    """Which modules a training trace splits, and how: found from its forward."""

    def __init__(self, training: TrainingTrace) -> None:
        ops = training.trace.ops
        self.columns: dict[str, int] = {}  # module → its output features
        self.rows: dict[str, int] = {}  # module → its input features (and outputs, by bias)
        self.row_outputs: dict[str, int] = {}
        self.norms = {op.module for op in ops if op.kind == "norm"}
        head = next((op for op in ops if op.stage == "fwd" and op.kind == "matmul"
                     and op.layer == "lm_head" and op.weight_bytes), None)
        for op in ops:
            if op.stage != "fwd" or not in_block(op):
                continue
            if linear_input(op) == "input":
                self.columns[op.module] = op.dims["n"]
            else:
                self.rows[op.module] = op.dims["k"]
                self.row_outputs[op.module] = op.dims["n"]
        self.vocab = 0
        self.embedding = ""
        self.head = "" if head is None else head.module
        if head is not None:
            self.columns[head.module] = self.vocab = head.dims["n"]
            width = head.dims["k"]
            self.embedding = next(
                (op.module for op in ops if op.stage == "optim"
                 and op.dims["numel"] == self.vocab * width and op.module != head.module
                 and any(f.module == op.module and f.kind == "embedding" for f in ops)), "")

    def param_split(self, op: Op) -> bool:
        """Whether an optimizer update (one parameter tensor) is split."""
        if op.module in self.rows:
            return op.dims["numel"] != self.row_outputs[op.module]  # the bias is whole
        return op.module in self.columns or op.module == self.embedding


def split_training(training: TrainingTrace, tp: int) -> TrainingTrace:
    """One device's share of `training` under tensor parallelism of degree `tp`."""
    if tp == 1:
        return training
    if training.trainable != training.params:
        raise UserError("--tp", "splits trainable weights; LoRA adapters on a tensor-parallel "
                                "frozen base are not modelled, expected --tp 1 with --lora")
    splits = _Splits(training)
    if not splits.rows:
        raise UserError("--tp", f"{training.trace.model} has no row-split linears in its "
                                "blocks; expected --tp 1")
    ops: list[Op] = []
    moved: dict[int, int] = {}
    share: dict[int, float] = {}  # original op → its output's share on a device
    partial: set[int] = set()  # new indices whose output is a partial sum
    reduced: dict[int, int] = {}  # a partial producer → its all-reduce

    def emit(op: Op, deps: tuple[int, ...]) -> int:
        ops.append(op.evolve(index=len(ops), deps=deps))
        return len(ops) - 1

    def summed(deps: tuple[int, ...]) -> tuple[int, ...]:
        out = []
        for dep in deps:
            if dep in partial:
                if dep not in reduced:
                    reduced[dep] = emit(_allreduce(ops[dep], tp), (dep,))
                dep = reduced[dep]
            out.append(dep)
        return tuple(out)

    for op in training.trace.ops:
        deps = tuple(moved[d] for d in op.deps)
        new, makes_partial, accumulates = _share(op, splits, tp)
        index = emit(new, deps if accumulates else summed(deps))
        if makes_partial:
            partial.add(index)
        moved[op.index] = index
        share[op.index] = new.output_bytes / op.output_bytes if op.output_bytes else 1.0
    buffers = tuple(replace(b, bytes=math.ceil(b.bytes * share[b.alloc]),
                            alloc=moved[b.alloc], free=b.free if b.free < 0 else moved[b.free])
                    for b in training.buffers)
    updates = [(op, ops[moved[op.index]]) for op in training.trace.ops if op.stage == "optim"]
    numel = sum(new.dims["numel"] for _, new in updates)
    whole = sum(op.dims["numel"] for op, _ in updates)
    kept = numel / whole if whole else 1.0
    param_bytes = training.param_bytes - sum(op.dims["weight_bytes"] - new.dims["weight_bytes"]
                                             for op, new in updates)
    return replace(training, trace=replace(training.trace,
                                           model=f"{training.trace.model} [tp {tp}]",
                                           ops=tuple(ops)),
                   buffers=buffers, param_bytes=param_bytes,
                   grad_bytes=math.ceil(training.grad_bytes * kept),
                   master_bytes=math.ceil(training.master_bytes * kept),
                   state_bytes=math.ceil(training.state_bytes * kept), trainable=numel)


def _share(op: Op, splits: _Splits, tp: int) -> tuple[Op, bool, bool]:
    """A device's share of `op`, whether its output is a partial sum, and whether it may
    read partial sums (accumulating them) rather than their all-reduce."""
    module, stage = op.module, op.stage
    column, row = module in splits.columns, module in splits.rows
    if stage == "optim":
        if splits.param_split(op):
            return _elementwise(op, tp), False, False
        return op, False, False
    if op.kind == "attention":
        d = op.dims
        if d["heads"] % tp or d["kv_heads"] % tp:
            raise UserError("--tp", f"expected a divisor of {module}'s {d['heads']} heads and "
                                    f"{d['kv_heads']} KV heads, not {tp}")
        return _elementwise(op, tp).evolve(dims={
            **d, "heads": d["heads"] // tp, "kv_heads": d["kv_heads"] // tp,
            "parallel": _ceil(d["parallel"], tp)}), False, False
    if op.kind == "matmul" and (column or row):
        pad = module == splits.head
        if stage in _FORWARD:
            return ((_cut(op, "n", tp, pad), False, False) if column
                    else (_cut(op, "k", tp), True, False))
        if stage == "bwd_act":
            return ((_cut(op, "k", tp, pad), True, False) if column
                    else (_cut(op, "n", tp), False, False))
        feature = splits.columns[module] if column else splits.rows[module]
        return _cut(op, "m" if op.dims["m"] == feature else "n", tp, pad), False, False
    if module == splits.embedding and splits.embedding:
        if stage in _FORWARD:  # each device looks up its vocabulary rows: a partial sum
            return op, True, False
        return _elementwise(op, tp), False, False
    if module == "" and splits.vocab:  # the loss over each device's vocabulary share
        return _elementwise(op, tp), False, False
    if stage == "bwd_act" and column:  # sums of partial activation gradients
        return op, True, True
    if stage == "bwd_weight" and column:  # a column split's bias gradient
        return _elementwise(op, tp), False, False
    if (_is_block(op.layer) and module.startswith(op.layer + ".") and op.kind != "norm"
            and module not in splits.norms and not row):
        return _elementwise(op, tp), False, False
    return op, False, False  # norms, residual adds, position embeddings, row biases: whole
