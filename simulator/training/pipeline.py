"""Pipeline parallelism in a training step: the model cut into stages of equal depth, the
micro-batches run through them in the 1F1B order (PipeDream-Flush, Megatron-LM's
non-interleaved schedule; Narayanan et al., arXiv 2104.04473 §2.2).

Stage s holds blocks [s·L/pp, (s+1)·L/pp); the embedding goes with the first, the final
norm, LM head and loss with the last (with tied embeddings the last keeps its own copy of
the word embedding, as Megatron-LM does). Each stage's share of a micro-batch is simulated
on the chip (with its tensor-parallel collectives), its forward and its backward apart; the
pipeline is an event simulation over stages and links: stage s runs min(pp − s − 1, M)
forwards, then alternates one forward and one backward, then drains its backwards; each
forward hands its output activations to the next stage and each backward their gradient to
the previous one over the links. Data parallelism applies per stage (its replicas' peers
are pp·tp devices apart); the last micro-batch's backward carries the gradient collectives
(ZeRO 0 and 1: ZeRO 2 and 3 are not combined with pipelining, as in DeepSpeed), then each
stage runs its optimizer.

A stage's memory peak: its one-micro-batch timeline plus the activations that the forward
keeps for the backward, for each further micro-batch in flight (stage s holds up to
min(pp − s, M)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import simpy

from simulator.engine.network import Network
from simulator.errors import UserError
from simulator.hardware.system import System
from simulator.workload.trace import Op, Trace, readers_of
from simulator.workload.training import Buffer, TrainingTrace


def _is_block(layer: str) -> bool:
    return layer.rpartition(".")[2].isdigit()


def stage_of_layers(trace: Trace, pp: int, flag: str = "--pp") -> dict[str, int]:
    """Each layer's pipeline stage."""
    order = list(dict.fromkeys(op.layer for op in trace.ops if op.stage == "fwd"))
    blocks = [layer for layer in order if _is_block(layer)]
    if not blocks or len(blocks) % pp:
        raise UserError(flag, f"cuts the {len(blocks)} blocks of {trace.model} into stages "
                              f"of equal depth; expected a divisor of {len(blocks)}, not {pp}")
    depth = len(blocks) // pp
    first = order.index(blocks[0])
    stages = {layer: i // depth for i, layer in enumerate(blocks)}
    for position, layer in enumerate(order):
        if layer not in stages:
            stages[layer] = 0 if position < first else pp - 1
    for op in trace.ops:  # layers only the backward or the optimizer touches
        stages.setdefault(op.layer, pp - 1)
    return stages


def split_stages(training: TrainingTrace, pp: int, flag: str = "--pp"
                 ) -> tuple[list[TrainingTrace], list[int]]:
    """One training trace per stage (deps on other stages dropped, a tensor crossing stages
    held on both: from its producer to its last reader there, and from its first reader to
    its last on the receiving stage), and the bytes each stage hands the next."""
    ops = training.trace.ops
    stage_of = stage_of_layers(training.trace, pp, flag)
    where = [stage_of[op.layer] for op in ops]
    readers = readers_of(ops)
    handed = [0] * pp
    for op in ops:
        nxt = where[op.index] + 1
        if op.stage == "fwd" and nxt < pp and any(where[r] == nxt
                                                  for r in readers.get(op.index, ())):
            handed[nxt - 1] += op.output_bytes
    numel = sum(op.dims["numel"] for op in ops if op.stage == "optim")
    head = next((op for op in ops if op.stage == "fwd" and op.layer == "lm_head"
                 and op.kind == "matmul" and op.weight_bytes), None)
    tied = head is not None and not any(op.stage == "optim" and op.module == head.module
                                        for op in ops)
    out = []
    for stage in range(pp):
        mine = [op for op in ops if where[op.index] == stage]
        index = {op.index: n for n, op in enumerate(mine)}
        renumbered = tuple(op.evolve(index=index[op.index],
                                     deps=tuple(index[d] for d in op.deps if d in index))
                           for op in mine)
        buffers = []
        for buffer in training.buffers:
            here = [r for r in readers.get(buffer.alloc, ()) if where[r] == stage]
            if buffer.alloc in index:
                last = max((index[r] for r in here), default=index[buffer.alloc])
                free = -1 if buffer.free < 0 else index.get(buffer.free, last)
                buffers.append(replace(buffer, alloc=index[buffer.alloc], free=free))
            elif here:
                free = index[buffer.free] if buffer.free in index else max(index[r]
                                                                          for r in here)
                buffers.append(replace(buffer, alloc=min(index[r] for r in here), free=free))
        updates = [op for op in mine if op.stage == "optim"]
        share = sum(op.dims["numel"] for op in updates) / numel if numel else 0.0
        param_bytes = sum(op.dims["weight_bytes"] for op in updates)
        if tied and stage == pp - 1 and pp > 1:
            param_bytes += head.weight_bytes
        out.append(replace(
            training, trace=replace(training.trace, model=f"{training.trace.model} "
                                    f"[stage {stage}/{pp}]", ops=renumbered),
            buffers=tuple(b for b in buffers if b.free < 0 or b.free >= b.alloc),
            param_bytes=param_bytes, grad_bytes=math.ceil(training.grad_bytes * share),
            master_bytes=math.ceil(training.master_bytes * share),
            state_bytes=math.ceil(training.state_bytes * share),
            trainable=sum(op.dims["numel"] for op in updates)))
    return out, handed


def one_f_one_b(stage: int, pp: int, micro_batches: int) -> list[tuple[str, int]]:
    """Stage `stage`'s tasks in the 1F1B order: ("F" or "B", micro-batch)."""
    warm = min(pp - stage - 1, micro_batches)
    order = [("F", m) for m in range(warm)]
    for m in range(micro_batches - warm):
        order += [("F", warm + m), ("B", m)]
    order += [("B", m) for m in range(micro_batches - warm, micro_batches)]
    return order


def interleaved(device: int, pp: int, chunks: int, micro_batches: int
                ) -> list[tuple[str, int, int]]:
    """Device `device`'s tasks in Megatron-LM's interleaved 1F1B order (arXiv 2104.04473
    §2.2.2; `forward_backward_pipelining_with_interleaving`): ("F" or "B", virtual stage,
    micro-batch), its `chunks` model chunks being virtual stages c·pp + device. The
    micro-batches go through in groups of pp, one chunk after another; the warm-up runs
    (pp − device − 1)·2 + (chunks − 1)·pp forwards (all of them when micro-batches = pp)."""
    total = micro_batches * chunks
    warm = total if micro_batches == pp else min((pp - device - 1) * 2 + (chunks - 1) * pp,
                                                  total)

    def task(kind: str, k: int) -> tuple[str, int, int]:
        chunk = (k % (pp * chunks)) // pp
        if kind == "B":
            chunk = chunks - 1 - chunk
        return kind, chunk * pp + device, (k // (pp * chunks)) * pp + k % pp

    order = [task("F", k) for k in range(warm)]
    for k in range(total - warm):
        order += [task("F", warm + k), task("B", k)]
    order += [task("B", k) for k in range(total - warm, total)]
    return order


def stash_peak(order: list[tuple[str, int, int]], stash: dict[int, int]) -> int:
    """The most activation bytes `order` keeps for backwards still to come, besides the
    micro-batch running (its own stash is in its timeline)."""
    held = top = 0
    for kind, stage, _ in order:
        if kind == "F":
            held += stash[stage]
            top = max(top, held - stash[stage])
        else:
            held -= stash[stage]
    return top


@dataclass(frozen=True)
class StageTimes:
    """One stage's times (ns): a micro-batch's forward, its backward, the last micro-
    batch's backward (with the gradient collectives), then the optimizer step."""

    forward: float
    backward: float
    last_backward: float
    optimizer: float


@dataclass(frozen=True)
class PipelineRun:
    """When each stage finished its step, and its busy time (ns)."""

    finish_ns: tuple[float, ...]
    busy_ns: tuple[float, ...]

    @property
    def makespan_ns(self) -> float:
        return max(self.finish_ns)

    @property
    def bubble_fraction(self) -> float:
        """The stages' idle share of the step."""
        span = self.makespan_ns
        return 1 - sum(self.busy_ns) / (len(self.busy_ns) * span) if span else 0.0


def schedule(device: int, pp: int, chunks: int, micro_batches: int
             ) -> list[tuple[str, int, int]]:
    """Device `device`'s tasks ("F" or "B", virtual stage, micro-batch): 1F1B, or its
    interleaved form with `chunks` > 1 model chunks per device."""
    if chunks == 1:
        return [(kind, device, m) for kind, m in one_f_one_b(device, pp, micro_batches)]
    return interleaved(device, pp, chunks, micro_batches)


def run_one_f_one_b(system: System | None, times: list[StageTimes], handed: list[int],
                    micro_batches: int, tp: int, chunks: int = 1) -> PipelineRun:
    """Event simulation of the 1F1B schedule over len(times) virtual stages, `chunks` per
    device (virtual stage v on device v mod pp, its ranks v mod pp·tp … + tp − 1), each rank
    handing its activations (forward) or their gradients (backward) to the same rank of the
    neighbouring virtual stage's device over the links (`system` None: hand-overs take no
    time). Finish and busy times are per device."""
    stages = len(times)
    pp = stages // chunks
    env = simpy.Environment()
    network = None if system is None else Network(env, system, system.count)
    arrived = {(kind, s, m): env.event() for kind in "FB" for s in range(stages)
               for m in range(micro_batches)}
    finish = [0.0] * pp
    busy = [0.0] * pp

    def send(kind: str, s: int, m: int) -> simpy.events.ProcessGenerator:
        to = s + 1 if kind == "F" else s - 1
        landed = []
        for rank in range(tp if network is not None else 0):
            event = env.event()
            landed.append(event)
            env.process(network.transfer(s % pp * tp + rank, to % pp * tp + rank,
                                         handed[min(s, to)], event))
        yield simpy.AllOf(env, landed)
        arrived[(kind, to, m)].succeed()

    def device(d: int) -> simpy.events.ProcessGenerator:
        for kind, s, m in schedule(d, pp, chunks, micro_batches):
            if kind == "F" and s > 0:
                yield arrived[("F", s, m)]
            if kind == "B" and s < stages - 1:
                yield arrived[("B", s, m)]
            t = times[s]
            ns = t.forward if kind == "F" else (t.last_backward if m == micro_batches - 1
                                                else t.backward)
            yield env.timeout(ns)
            busy[d] += ns
            if (kind == "F" and s < stages - 1) or (kind == "B" and s > 0):
                env.process(send(kind, s, m))
        optimizer = sum(times[c * pp + d].optimizer for c in range(chunks))
        yield env.timeout(optimizer)
        busy[d] += optimizer
        finish[d] = env.now

    for d in range(pp):
        env.process(device(d))
    env.run()
    return PipelineRun(tuple(finish), tuple(busy))


def split_passes(trace: Trace) -> tuple[Trace, Trace, Trace]:
    """A replica trace's forward, backward (with the collectives issued during it) and
    optimizer parts (with what follows it), each renumbered on its own."""
    first_bwd = next((i for i, op in enumerate(trace.ops)
                      if op.stage not in ("fwd", "")), len(trace.ops))
    first_opt = next((i for i, op in enumerate(trace.ops) if op.stage == "optim"),
                     len(trace.ops))
    parts = (trace.ops[:first_bwd], trace.ops[first_bwd:first_opt], trace.ops[first_opt:])
    return tuple(_renumber(trace, list(part)) for part in parts)  # type: ignore[return-value]


def _renumber(trace: Trace, ops: list[Op]) -> Trace:
    index = {op.index: number for number, op in enumerate(ops)}
    return replace(trace, ops=tuple(op.evolve(index=index[op.index],
                                              deps=tuple(index[d] for d in op.deps
                                                         if d in index))
                                    for op in ops))


def signature(trace: Trace) -> tuple:
    """What a trace's simulation depends on (its ops without their names): equal
    signatures time equally, as the middle stages of a model of identical blocks do."""
    return tuple((op.kind, op.fn, op.dtype, op.ops, op.weight_bytes, op.input_bytes,
                  op.output_bytes, op.state_read_bytes, op.state_write_bytes,
                  tuple(sorted(op.dims.items())), op.deps, op.stage) for op in trace.ops)


def memoized(run: Callable[[Trace], tuple[float, float, float]]
             ) -> Callable[[Trace], tuple[float, float, float]]:
    """`run` (a trace → (latency ns, dynamic J, static W)) once per signature."""
    seen: dict[tuple, tuple[float, float, float]] = {}

    def timed(trace: Trace) -> tuple[float, float, float]:
        if not trace.ops:
            return 0.0, 0.0, 0.0
        key = signature(trace)
        if key not in seen:
            seen[key] = run(trace)
        return seen[key]

    return timed


def stashed_bytes(ops: tuple[Op, ...], buffers: tuple[Buffer, ...]) -> int:
    """Activation bytes one micro-batch's forward leaves for its backward."""
    return sum(b.bytes for b in buffers
               if b.category == "activations" and b.free >= 0 and ops[b.alloc].stage == "fwd"
               and ops[b.free].stage != "fwd")
