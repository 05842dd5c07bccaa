"""Data parallelism and ZeRO: one replica's trace of a training step on a system.

Every replica runs its micro-batches of the same trace; what differs by ZeRO stage
(Rajbhandari et al., arXiv 1910.02054) is what a device holds and which collectives it
runs, as collective ops on the system's links that overlap the kernel stream:

- 0 (plain data parallelism, PyTorch DDP): gradients all-reduced in buckets of 25 MiB
  (DDP's `bucket_cap_mb` default) as the backward makes them, in the last micro-batch (the
  others accumulate locally, DDP's `no_sync`); every device updates every weight.
- 1: the optimizer's master weights and state partitioned: each device updates 1/dp of
  the parameters, then an all-gather shares the updated weights.
- 2: gradients partitioned too: a reduce-scatter per bucket (DeepSpeed's
  `reduce_bucket_size` default, 5·10⁸ elements) in every micro-batch, and a device keeps its
  1/dp of the gradients plus the buckets not yet reduced (two at most: one filling, one
  being reduced).
- 3: parameters partitioned too: each layer's weights all-gathered before its forward and
  again before its backward (prefetched one layer ahead), gradients reduce-scattered.

The optimizer waits for the last gradient collective; a post-step all-gather (1, 2) is not
overlapped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import partial

from simulator.errors import UserError
from simulator.workload.trace import Op, Trace
from simulator.workload.training import Buffer, TrainingTrace

ZERO_STAGES = (0, 1, 2, 3)
DDP_BUCKET_BYTES = 25 << 20
ZERO_BUCKET_ELEMENTS = 500_000_000


@dataclass(frozen=True)
class Replica:
    """One device's share of the step: its trace (one micro-batch with its collectives,
    then the optimizer and what follows it), `plain` (a micro-batch without gradient
    collectives, where gradient accumulation skips them; None: every micro-batch reduces),
    its buffers in the trace's op indices, and the bytes it holds for the whole step."""

    trace: Trace
    plain: Trace | None
    buffers: tuple[Buffer, ...]
    weights_bytes: int
    optimizer_bytes: int
    gradient_bytes: int
    #: ZeRO-3: the largest two layers' gathered weights (one in use, one prefetched)
    gathered_bytes: int


def is_data_parallel(op: Op) -> bool:
    """Whether `op` is one of the data-parallel group's collectives."""
    return op.kind == "collective" and bool(op.dims.get("data_parallel"))


def check_zero(zero: int, dp: int) -> None:
    if isinstance(zero, bool) or zero not in ZERO_STAGES:
        raise UserError("--zero", f"expected a ZeRO stage 0, 1, 2 or 3, not {zero!r}")
    if zero and dp < 2:
        raise UserError("--zero", f"partitions over data-parallel replicas (and Ulysses "
                        f"devices); expected --dp or --sp ≥ 2 with --zero {zero}")


def _dp_collective(kind: str, nbytes: int, dp: int, module: str, layer: str, overlap: bool,
                   stride: int = 1) -> Op:
    return Op(index=0, name=kind, fn=kind, kind="collective", module=module, layer=layer,
              dtype="bf16", ops=0, weight_bytes=0, state_read_bytes=0, state_write_bytes=0,
              input_bytes=nbytes, output_bytes=nbytes,
              dims={"devices": dp, "data_parallel": 1, **({"overlap": 1} if overlap else {}),
                    **({"stride": stride} if stride > 1 else {})}, deps=(),
              shapes=f"{nbytes} B over {dp} devices")


def _layer_weights(ops: tuple[Op, ...]) -> dict[str, int]:
    """Weight bytes per layer, from the optimizer's updates (one per parameter tensor)."""
    found: dict[str, int] = {}
    for op in ops:
        if op.stage == "optim":
            found[op.layer] = found.get(op.layer, 0) + op.dims["weight_bytes"]
    return found


def _partition(op: Op, dp: int) -> Op:
    """A device's 1/dp share of an optimizer update (ZeRO's flat partition, rounded up)."""
    numel = math.ceil(op.dims["numel"] / dp)
    share = numel / op.dims["numel"]
    return op.evolve(ops=math.ceil(op.ops * share),
                     state_read_bytes=math.ceil(op.state_read_bytes * share),
                     state_write_bytes=math.ceil(op.state_write_bytes * share),
                     dims={**op.dims, "numel": numel, "parallel": numel})


def replica(training: TrainingTrace, dp: int, zero: int, stride: int = 1) -> Replica:
    """One replica's trace and holdings under data parallelism `dp` and ZeRO stage `zero`;
    `stride`: the devices between two replicas' peers (the tensor-parallel degree)."""
    check_zero(zero, dp)
    collective = partial(_dp_collective, stride=stride)
    source = training.trace.ops
    layers = _layer_weights(source)
    grad_of = {b.alloc: b.bytes for b in training.buffers if b.category == "gradients"}
    bucket = (DDP_BUCKET_BYTES if zero < 2
              else ZERO_BUCKET_ELEMENTS * (training.grad_bytes // max(1, training.trainable)))
    reduce = "allreduce" if zero < 2 else "reducescatter"
    out: list[Op] = []
    moved: dict[int, int] = {}
    pending: list[int] = []  # gradient collectives the optimizer waits for
    issued_at: list[int] = []  # original index of the op after which each bucket is sent
    gathers: dict[int, int] = {}  # ZeRO-3: original index of a segment's first op → gather

    def emit(op: Op, deps: tuple[int, ...]) -> int:
        out.append(op.evolve(index=len(out), deps=deps))
        return len(out) - 1

    segments = [(first, layer) for first, layer in _segments(source)
                if layers.get(layer)] if zero == 3 else []
    starts = {first: layer for first, layer in segments}
    ahead = {segments[i][0]: segments[i + 1] for i in range(len(segments) - 1)}
    if segments:  # the first segment's weights are gathered before the step starts
        first, layer = segments[0]
        gathers[first] = emit(collective("allgather", layers.get(layer, 0), dp,
                                          f"{layer}.allgather", layer, False), ())
    filled = 0
    for op in source:
        if op.stage == "optim":
            break
        if op.index in ahead:  # prefetch the next segment's weights as this one starts
            nxt, layer = ahead[op.index]
            gathers[nxt] = emit(collective("allgather", layers.get(layer, 0), dp,
                                            f"{layer}.allgather", layer, True),
                                (len(out) - 1,) if out else ())
        deps = tuple(moved[d] for d in op.deps)
        if op.index in gathers and op.index in starts:
            deps = (*deps, gathers[op.index])
        moved[op.index] = emit(op, deps)
        filled += grad_of.get(op.index, 0) if dp > 1 else 0
        if filled >= bucket:
            pending.append(emit(collective(reduce, filled, dp, f"{op.layer}.{reduce}",
                                            op.layer, True), (moved[op.index],)))
            issued_at.append(op.index)
            filled = 0
    last_micro = len(out) - 1
    if filled:
        pending.append(emit(collective(reduce, filled, dp, f"{reduce}.last", "", True),
                            (last_micro,)))
        issued_at.append(last_micro)
    plain = None
    if zero < 2:
        plain_ops = [op for op in out[:last_micro + 1] if not is_data_parallel(op)]
        plain = _renumbered(training.trace, plain_ops)
    updates = [op for op in source if op.stage == "optim"]
    for number, op in enumerate(updates):
        share = _partition(op, dp) if zero else op
        moved[op.index] = emit(share, tuple(pending) if number == 0 else (len(out) - 1,))
    if zero in (1, 2):  # zero ≥ 1 needs dp ≥ 2 (check_zero)
        total = sum(layers.values())
        for start in range(0, total, DDP_BUCKET_BYTES if zero == 1 else bucket):
            size = min(total - start, DDP_BUCKET_BYTES if zero == 1 else bucket)
            emit(collective("allgather", size, dp, "params.allgather", "", False),
                 (len(out) - 1,))
    trace = replace(training.trace, model=f"{training.trace.model} [dp {dp}, zero {zero}]",
                    ops=tuple(out))
    buffers = _moved_buffers(training.buffers, moved, zero, issued_at)
    grads = training.grad_bytes
    return Replica(
        trace=trace, plain=plain, buffers=buffers,
        weights_bytes=math.ceil(training.param_bytes / dp) if zero == 3 else training.param_bytes,
        optimizer_bytes=math.ceil((training.master_bytes + training.state_bytes)
                                  / (dp if zero else 1)),
        gradient_bytes=math.ceil(grads / dp) if zero >= 2 else 0,
        gathered_bytes=sum(sorted(layers.values())[-2:]) if zero == 3 else 0)


def _segments(ops: tuple[Op, ...]) -> list[tuple[int, str]]:
    """(first op index, layer) of each run of a layer's forward or backward ops."""
    found: list[tuple[int, str]] = []
    previous: tuple[str, bool] | None = None
    for op in ops:
        if op.stage == "optim":
            break
        key = (op.layer, op.stage == "fwd")
        if key != previous:
            found.append((op.index, op.layer))
            previous = key
    return found


def _renumbered(trace: Trace, ops: list[Op]) -> Trace:
    index = {op.index: number for number, op in enumerate(ops)}
    return replace(trace, ops=tuple(op.evolve(index=index[op.index],
                                              deps=tuple(index[d] for d in op.deps
                                                         if d in index))
                                    for op in ops))


def _moved_buffers(buffers: tuple[Buffer, ...], moved: dict[int, int], zero: int,
                   issued_at: list[int]) -> tuple[Buffer, ...]:
    """The buffers in the replica trace's op indices. ZeRO 2/3: a gradient is transient,
    freed once the bucket after its own is sent (its bucket has been reduced by then)."""
    out = []
    for buffer in buffers:
        if buffer.category == "gradients" and zero >= 2:
            later = [i for i in issued_at if i >= buffer.alloc]
            free = later[1] if len(later) > 1 else (later[0] if later else buffer.alloc)
            out.append(Buffer(buffer.bytes, "gradients", moved[buffer.alloc], moved[free]))
        else:
            free = buffer.free if buffer.free < 0 else moved[buffer.free]
            out.append(replace(buffer, alloc=moved[buffer.alloc], free=free))
    return tuple(out)
