"""Device memory over a training step, by category, from the tensors the trace allocates.

Held the whole step: the weights (model dtype) and the optimizer's fp32 master copy and
state (each device's share under ZeRO). Gradients (model dtype) are allocated by the op
that makes them in the first micro-batch and kept until the optimizer has run (later
micro-batches accumulate into them); under ZeRO 2/3 a device keeps its partition and a
bucket's gradients only until the bucket is reduced. Activations (the forward's and
recompute's tensors) and workspace (the backward's other tensors, ZeRO-3's gathered
weights) live from the op that makes them to their last reader: an op's inputs and outputs
are live while it runs, and whatever autograd keeps for the backward is read there last.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from simulator.tiling import DTYPE_BYTES
from simulator.workload.trace import Op
from simulator.workload.training import CATEGORIES, Buffer, TrainingTrace

GIB = 1 << 30


@dataclass(frozen=True)
class MemorySample:
    """Bytes held per category (CATEGORIES order) at the end of an op at `time_s`."""

    time_s: float
    bytes: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.bytes)


@dataclass(frozen=True)
class MemoryTimeline:
    """Samples over the step (every op of every micro-batch, then the optimizer)."""

    samples: tuple[MemorySample, ...]

    def peak(self) -> MemorySample:
        """The first sample with the most bytes held."""
        return max(self.samples, key=lambda s: s.total)


def memory_timeline(ops: Sequence[Op], buffers: Sequence[Buffer], held: Mapping[str, int],
                    op_end_s: Sequence[float], micro_batches: int, micro_batch_s: float,
                    during_micro: Mapping[str, int] | None = None) -> MemoryTimeline:
    """Memory after each op of `ops` (one micro-batch, then the optimizer and what follows
    it, ending at `op_end_s`), the micro-batch repeated `micro_batch_s` apart. `held`: bytes
    per category for the whole step; `during_micro`: only while micro-batches run."""
    count = len(ops)
    deltas = [dict.fromkeys(CATEGORIES, 0) for _ in range(count + 1)]
    kept = [0] * count  # gradients held to the end, by the op that makes them
    for buffer in buffers:
        if buffer.free < 0:
            kept[buffer.alloc] += buffer.bytes
        else:
            deltas[buffer.alloc][buffer.category] += buffer.bytes
            deltas[buffer.free + 1][buffer.category] -= buffer.bytes
    first = next((i for i, op in enumerate(ops) if op.stage == "optim"), count)
    extra = during_micro or {}
    samples = []
    for number in range(micro_batches):
        live = dict.fromkeys(CATEGORIES, 0)
        grads = 0 if number == 0 else sum(kept)
        for index in range(first):
            for category, delta in deltas[index].items():
                live[category] += delta
            if number == 0:
                grads += kept[index]
            samples.append(MemorySample(number * micro_batch_s + op_end_s[index],
                                        _row(held, extra, live, grads)))
    offset = (micro_batches - 1) * micro_batch_s
    idle = dict.fromkeys(CATEGORIES, 0)
    samples.extend(MemorySample(offset + op_end_s[index], _row(held, {}, idle, sum(kept)))
                   for index in range(first, count))
    return MemoryTimeline(tuple(samples))


def _row(held: Mapping[str, int], extra: Mapping[str, int], live: Mapping[str, int],
         grads: int) -> tuple[int, ...]:
    return tuple(held.get(name, 0) + extra.get(name, 0) + live[name]
                 + (grads if name == "gradients" else 0) for name in CATEGORIES)


def saved_for_backward(ops: Sequence[Op], buffers: Sequence[Buffer]) -> dict[str, int]:
    """Per layer, in model order: the activation bytes its forward leaves for the backward
    (made by a forward op, last read by a backward or recompute op)."""
    saved: dict[str, int] = {}
    for op in ops:
        if op.stage == "fwd":
            saved.setdefault(op.layer, 0)
    for buffer in buffers:
        if (buffer.category == "activations" and buffer.free >= 0
                and ops[buffer.alloc].stage == "fwd" and ops[buffer.free].stage != "fwd"):
            saved[ops[buffer.alloc].layer] += buffer.bytes
    return saved


def unfused_scores(training: TrainingTrace) -> TrainingTrace:
    """`training` with the score matrices of unfused attention (PyTorch's kernels, not one
    fused kernel) in its memory: each attention forward (or recompute) writes its scores S
    (workspace) and keeps the softmax P for its backward (activations), whose dP and dS
    are workspace again; each B·heads·q_len·kv_len elements of the model dtype, the causal
    mask applied to a whole matrix."""
    added: list[Buffer] = []
    kept: dict[str, int] = {}  # a module → its last forward attention
    for op in training.trace.ops:
        if op.kind != "attention":
            continue
        d = op.dims
        size = d["batch"] * d["heads"] * d["q_len"] * d["kv_len"] * DTYPE_BYTES.get(op.dtype, 2)
        if op.stage in ("fwd", "recompute"):
            added.append(Buffer(size, "workspace", op.index, op.index))
            kept[op.module] = op.index
        elif op.module in kept:
            added.append(Buffer(size, "activations", kept.pop(op.module), op.index))
            added.append(Buffer(size, "workspace", op.index, op.index))
    return replace(training, buffers=(*training.buffers, *added))


def dominant(sample: MemorySample) -> tuple[str, int]:
    """The category holding the most bytes in `sample`."""
    name, size = max(zip(CATEGORIES, sample.bytes, strict=True), key=lambda pair: pair[1])
    return name, size
