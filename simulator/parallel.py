"""A traced model split over the devices of a system: tensor and pipeline parallelism.

Tensor parallel (`--tp N`, Megatron-LM's splits): in every block the linears that take
the block's input (q/k/v, gate/up) are split by columns and those that take the attention
output or the MLP's hidden activations (o/down) by rows, each device holding 1/N of the
weights; attention splits its heads (KV heads too), and the element-wise ops between the
two splits (RoPE, SiLU, the KV-cache writes) work on 1/N of the elements. Each row split
ends in an all-reduce of its output across the N devices. Norms and residual adds run whole
on every device. The LM head is split by vocabulary columns and its logits all-gathered;
the embedding is replicated. Activation peaks are counted whole (an upper bound).

Pipeline parallel (`--pp P`, `--micro-batches M`): the blocks are cut into P stages of
equal depth (the embedding with the first, the final norm and LM head with the last);
the batch is cut into M micro-batches that flow through the stages in order (GPipe's
forward; a decode or prefill step has no backward pass), each stage handing its output
activations to the next over the links. A stage's time per micro-batch is the chip
simulation of its share of the trace; the pipeline is an event simulation of stages and
links, so its bubbles (P − 1)/(M + P − 1) for uniform stages come out of it.

Device d of stage s and tensor rank r is d = s·N + r. Collectives are timed by the
network simulation (simulator.engine.network) of the TP group on idle links.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cache

import simpy

from simulator.collective import run_collective
from simulator.engine.network import Network
from simulator.errors import Infeasible, UserError
from simulator.hardware.schema import Hardware
from simulator.hardware.system import System
from simulator.mapping import Mapping
from simulator.report import CollectiveShare, Result, SystemShare
from simulator.workload.quant import in_block, linear_input
from simulator.workload.trace import Op, Trace


@dataclass(frozen=True)
class Parallelism:
    """Degrees of parallelism of one run."""

    tp: int = 1
    pp: int = 1
    micro_batches: int = 1

    @property
    def devices(self) -> int:
        return self.tp * self.pp


def check_degrees(par: Parallelism) -> None:
    """Refuse a degree that is not a whole number ≥ 1, naming its flag."""
    for flag, value in (("--tp", par.tp), ("--pp", par.pp),
                        ("--micro-batches", par.micro_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(flag, f"expected a whole number ≥ 1, not {value!r}")


def check(par: Parallelism, system: System | None, trace: Trace) -> None:
    """Refuse degrees the system or the model (`trace`, one micro-batch's step) cannot
    take, naming the flag."""
    if system is None:
        if par.devices > 1 or par.micro_batches > 1:
            raise UserError("--tp" if par.tp > 1 else "--pp" if par.pp > 1 else
                            "--micro-batches", "needs a system of several devices as --hw "
                            "(e.g. dgx_a100.yaml); this --hw is one chip")
        return
    if par.devices > system.count:
        raise UserError("--tp", f"--tp {par.tp} × --pp {par.pp} = {par.devices} devices, but "
                                f"{system.name} has {system.count}")
    attention = next((op for op in trace.ops if op.kind == "attention"), None)
    if attention is not None and par.tp > 1:
        for key in ("heads", "kv_heads"):
            if attention.dims[key] % par.tp:
                raise UserError("--tp", f"expected a divisor of the model's {attention.dims[key]}"
                                        f" {key.replace('_', ' ')}, not {par.tp}")
    if par.tp > 1 and trace.expert_tokens:
        raise UserError("--tp", "tensor parallelism of an MoE model's experts is not "
                                "modelled yet; expected --tp 1")
    blocks = len(_blocks(trace))
    if blocks % par.pp:
        raise UserError("--pp", f"expected a divisor of the model's {blocks} blocks, not "
                                f"{par.pp}")


def _blocks(trace: Trace) -> list[str]:
    """The model's repeated blocks, in order (layers named `….N`)."""
    return list(dict.fromkeys(op.layer for op in trace.ops if _is_block(op.layer)))


def _is_block(layer: str) -> bool:
    """Whether `layer` names one of the model's repeated blocks (`layers.N`, `h.N`, …)."""
    return layer.rpartition(".")[2].isdigit()


def _divide(value: int, tp: int) -> int:
    return math.ceil(value / tp)


def _split_op(op: Op, tp: int) -> Op:
    """A device's 1/tp share of an op between a column and a row split."""
    dims = {key: (_divide(value, tp) if key in ("numel", "parallel") else value)
            for key, value in op.dims.items()}
    return replace(op, ops=_divide(op.ops, tp), input_bytes=_divide(op.input_bytes, tp),
                   output_bytes=_divide(op.output_bytes, tp),
                   state_read_bytes=_divide(op.state_read_bytes, tp),
                   state_write_bytes=_divide(op.state_write_bytes, tp), dims=dims)


def _collective(after: Op, kind: str, tp: int) -> Op:
    """The collective that follows `after` across the tensor-parallel group: its message
    is `after`'s whole output (nccl-tests' size)."""
    return Op(index=0, name=kind, fn=kind, kind="collective", module=f"{after.module}.{kind}",
              layer=after.layer, dtype=after.dtype, ops=0, weight_bytes=0, state_read_bytes=0,
              state_write_bytes=0, input_bytes=after.output_bytes, output_bytes=after.output_bytes,
              dims={"devices": tp}, deps=(), shapes=f"{after.output_bytes} B over {tp} devices")


def split_tensor(trace: Trace, tp: int) -> Trace:
    """One device's share of `trace` under tensor parallelism of degree `tp`."""
    if tp == 1:
        return trace
    ops: list[Op] = []
    moved: dict[int, int] = {}
    saved = 0

    def emit(op: Op, deps: tuple[int, ...]) -> int:
        ops.append(replace(op, index=len(ops), deps=deps))
        return len(ops) - 1

    for op in trace.ops:
        deps = tuple(moved[d] for d in op.deps)
        d = op.dims
        if in_block(op) or (op.kind == "matmul" and op.weight_bytes and op.layer == "lm_head"):
            row = in_block(op) and linear_input(op) != "input"
            cut = "k" if row else "n"
            if d[cut] % tp:
                raise UserError("--tp", f"expected a divisor of {op.module}'s {d[cut]} "
                                        f"{'input' if row else 'output'} features, not {tp}")
            weight = op.weight_bytes // tp
            saved += op.weight_bytes - weight
            part = replace(op, ops=op.ops // tp, weight_bytes=weight,
                           dims={**d, cut: d[cut] // tp, "parallel": _divide(d["parallel"], tp)},
                           input_bytes=op.input_bytes // tp if row else op.input_bytes,
                           output_bytes=op.output_bytes if row else op.output_bytes // tp)
            index = emit(part, deps)
            if row or op.layer == "lm_head":
                index = emit(_collective(op, "allreduce" if row else "allgather", tp), (index,))
            moved[op.index] = index
        elif op.kind == "attention":
            moved[op.index] = emit(replace(_split_op(op, tp), dims={
                **d, "heads": d["heads"] // tp, "kv_heads": d["kv_heads"] // tp,
                "parallel": _divide(d["parallel"], tp)}), deps)
        elif op.module.startswith(op.layer + ".") and op.kind != "norm" and _is_block(op.layer):
            moved[op.index] = emit(_split_op(op, tp), deps)  # between the two splits
        else:
            moved[op.index] = emit(op, deps)  # norms, residual adds, embedding: whole
    return replace(trace, model=f"{trace.model} [tp {tp}]", ops=tuple(ops),
                   weights_bytes=trace.weights_bytes - saved,
                   state_bytes=_divide(trace.state_bytes, tp))


def split_pipeline(trace: Trace, pp: int) -> list[Trace]:
    """The `pp` stages of `trace`: equal runs of blocks, the ops before the first block
    with the first stage and those after the last with the last."""
    if pp == 1:
        return [trace]
    blocks = _blocks(trace)
    depth = len(blocks) // pp
    stage_of = {name: i // depth for i, name in enumerate(blocks)}
    first_block = next(i for i, op in enumerate(trace.ops) if op.layer in stage_of)
    stages: list[list[Op]] = [[] for _ in range(pp)]
    for position, op in enumerate(trace.ops):
        stage = stage_of.get(op.layer, 0 if position < first_block else pp - 1)
        stages[stage].append(op)
    traces = []
    for ops in stages:
        index = {op.index: i for i, op in enumerate(ops)}
        renumbered = tuple(replace(op, index=i, deps=tuple(index[d] for d in op.deps
                                                           if d in index))
                           for i, op in enumerate(ops))
        traces.append(replace(trace, ops=renumbered,
                              weights_bytes=sum(op.weight_bytes for op in ops),
                              state_bytes=math.ceil(trace.state_bytes / pp)))  # equal depth
    return traces


def links_of(system: System, tp: int) -> Callable[[Op], float]:
    """Times a device trace's collectives (ns) on the TP group's idle links, memoized."""

    @cache
    def timed(kind: str, nbytes: int) -> float:
        return run_collective(system, kind, nbytes, tp).latency_s * 1e9

    return lambda op: timed(op.fn, op.input_bytes)


@dataclass(frozen=True)
class Pipeline:
    """A step through the pipeline: its makespan, the stages' idle share, and the time
    one stage boundary's activations take to cross."""

    makespan_ns: float
    bubble_fraction: float
    send_ns: float


def run_pipeline(system: System, par: Parallelism, stage_ns: list[float],
                 send_bytes: float) -> Pipeline:
    """Micro-batches through the stages in order, each handing `send_bytes` of activations
    from every tensor rank of a stage to the same rank of the next, over the links."""
    env = simpy.Environment()
    network = Network(env, system, system.count)
    stages = [simpy.Resource(env) for _ in stage_ns]
    sends: list[float] = []

    def micro_batch() -> simpy.events.ProcessGenerator:
        for s, busy in enumerate(stage_ns):
            with stages[s].request() as turn:
                yield turn
                yield env.timeout(busy)
            if s + 1 < len(stage_ns):
                started, landed = env.now, []
                for rank in range(par.tp):
                    event = env.event()
                    landed.append(event)
                    env.process(network.transfer(s * par.tp + rank, (s + 1) * par.tp + rank,
                                                 send_bytes, event))
                yield simpy.AllOf(env, landed)
                sends.append(env.now - started)

    for _ in range(par.micro_batches):
        env.process(micro_batch())
    env.run()
    work = par.micro_batches * sum(stage_ns)
    bubble = 1 - work / (len(stage_ns) * env.now) if env.now else 0.0
    return Pipeline(env.now, bubble, min(sends, default=0.0))


def stage_input_bytes(stage: Trace) -> float:
    """Bytes of activations a stage hands on: its last op's output."""
    return float(stage.ops[-1].output_bytes) if stage.ops else 0.0



def simulate_system(system: System, chip: Hardware, trace: Trace, par: Parallelism,
                    mapping: Mapping, granularity: int, quant: str | None) -> Result:
    """One step of `trace` (one micro-batch's) spread over `system` by `par`: each stage's
    device share simulated on the chip (with its collectives on the links), then the
    micro-batches through the pipeline. Power and energy count every device used: each
    stage's `tp` devices for each micro-batch, and the chip's idle power while they wait."""
    from simulator.api import check_fits, run_trace

    m, tp = par.micro_batches, par.tp
    stages = split_pipeline(split_tensor(trace, tp), par.pp)
    for number, stage in enumerate(stages):  # a device holds every micro-batch's KV cache
        try:
            check_fits(chip, replace(stage, state_bytes=stage.state_bytes * m))
        except Infeasible as exc:
            raise Infeasible(exc.where, f"{exc.message}, one device of stage {number} on "
                                       f"{system.name} (tp {tp}, pp {par.pp}); expected a "
                                       "larger --tp or --pp") from None
    links = links_of(system, par.tp)
    runs = [run_trace(chip, stage, mapping, granularity, quant=quant, links=links)
            for stage in stages]
    results = [result for result, _, _ in runs]
    stage_ns = [timeline.makespan_ns for _, _, timeline in runs]
    pipeline = run_pipeline(system, par, stage_ns, stage_input_bytes(stages[0]))
    latency = pipeline.makespan_ns * 1e-9
    busy_s = sum(tp * m * result.latency_s for result in results)
    energy_j = (sum(tp * m * result.energy_j for result in results)
                + chip.power.idle * (par.devices * latency - busy_s))
    collectives = []
    for s, (_, tasks, _) in enumerate(runs):
        grouped: dict[tuple[str, int], list[float]] = {}
        for task in tasks:
            if task.op.kind == "collective":
                grouped.setdefault((task.op.fn, task.op.input_bytes), []).append(task.link_ns)
        collectives += [CollectiveShare(s, kind, size, len(times), sum(times) * 1e-9)
                        for (kind, size), times in sorted(grouped.items())]
    path_s = sum(result.latency_s for result in results) + (par.pp - 1) * pipeline.send_ns * 1e-9
    links_s = (sum(c.time_s for c in collectives) + (par.pp - 1) * pipeline.send_ns * 1e-9)
    first = results[0]
    tokens = first.tokens * m
    per_device = [stage.weights_bytes + stage.state_bytes * m + stage.activation_bytes
                  for stage in stages]
    share = SystemShare(
        system=system.name, devices=par.devices, tp=tp, pp=par.pp, micro_batches=m,
        device_memory_bytes=max(per_device),
        device_weights_bytes=max(stage.weights_bytes for stage in stages),
        device_state_bytes=max(stage.state_bytes for stage in stages) * m,
        stage_latency_s=tuple(result.latency_s for result in results),
        bubble_fraction=pipeline.bubble_fraction, communication_s=links_s,
        communication_share=links_s / path_s if path_s else 0.0,
        collectives=tuple(collectives))
    return replace(
        first, hardware=system.name, model=trace.model if par.devices == 1 else
        f"{trace.model} [tp {tp}, pp {par.pp}]", batch=first.batch * m, tokens=tokens,
        latency_s=latency, tokens_per_s=tokens / latency if latency else 0.0,
        power_w=energy_j / latency if latency else 0.0, energy_j=energy_j,
        energy_per_token_j=energy_j / tokens,
        memory_bytes=sum(size * tp for size in per_device),
        weights_bytes=sum(stage.weights_bytes * tp for stage in stages),
        state_bytes=sum(stage.state_bytes * tp for stage in stages) * m,
        activation_bytes=max(stage.activation_bytes for stage in stages),
        dram_bytes=sum(tp * m * result.dram_bytes for result in results),
        events=sum(result.events for result in results),
        layers=tuple(layer for result in results for layer in result.layers),
        ops=tuple(op for result in results for op in result.ops), system=share)
