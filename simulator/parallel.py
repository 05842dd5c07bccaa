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

import json
import math
from collections.abc import Callable
from collections.abc import Mapping as Table
from dataclasses import dataclass, replace
from functools import cache
from pathlib import Path

import simpy

from simulator.collective import run_alltoallv, run_collective
from simulator.engine.network import Network
from simulator.errors import Infeasible, UserError
from simulator.experts import (
    MODES,
    Matrix,
    Mode,
    contiguous,
    expert_bytes,
    is_expert,
    load_placement,
    split_experts,
)
from simulator.hardware.schema import Hardware
from simulator.hardware.system import System
from simulator.mapping import Mapping
from simulator.report import CollectiveShare, Result, SystemShare
from simulator.sequence import check_sequence, split_sequence
from simulator.shares import token_share
from simulator.workload.quant import in_block, linear_input
from simulator.workload.trace import Op, Trace
from workloads.pairs import attention_pairs


@dataclass(frozen=True)
class Parallelism:
    """Degrees of parallelism of one run, and for expert parallelism the placement file
    (None: contiguous) and runtime (simulator.experts)."""

    tp: int = 1
    pp: int = 1
    micro_batches: int = 1
    ep: int = 1
    placement: str | None = None
    ep_mode: Mode = "combine"
    dp: int = 1
    #: virtual stages per pipeline stage (Megatron-LM's interleaved schedule)
    interleave: int = 1
    #: sequence-parallel devices (DeepSpeed-Ulysses; simulator.sequence)
    sp: int = 1
    #: query tiles whose tensor-parallel all-reduces overlap compute (FastAttention)
    overlap: int = 1
    #: Megatron-LM's sequence parallelism in the TP group (reduce-scatter + all-gather)
    tp_sequence: bool = False

    @property
    def group(self) -> int:
        """Devices of one pipeline stage."""
        return self.tp * self.ep * self.sp

    @property
    def replica(self) -> int:
        """Devices of one data-parallel replica."""
        return self.group * self.pp

    @property
    def devices(self) -> int:
        return self.replica * self.dp


def check_degrees(par: Parallelism) -> None:
    """Refuse a degree that is not a whole number ≥ 1, naming its flag."""
    for flag, value in (("--tp", par.tp), ("--pp", par.pp),
                        ("--micro-batches", par.micro_batches), ("--ep", par.ep),
                        ("--dp", par.dp), ("--pp-interleave", par.interleave),
                        ("--sp", par.sp), ("--tp-overlap", par.overlap)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(flag, f"expected a whole number ≥ 1, not {value!r}")
    if par.ep_mode not in MODES:
        raise UserError("--ep-mode", f"expected one of {', '.join(MODES)}, not {par.ep_mode!r}")
    if par.interleave > 1 and (par.pp == 1 or par.micro_batches % par.pp):
        raise UserError("--pp-interleave", f"interleaves the stages of a pipeline whose "
                        f"micro-batches come in groups of --pp (Megatron-LM's rule); expected "
                        f"--pp > 1 and --micro-batches a multiple of it, not --pp {par.pp} "
                        f"--micro-batches {par.micro_batches}")
    if par.tp_sequence and par.tp == 1:
        raise UserError("--tp-sp", "splits the tokens between a tensor-parallel group's "
                                   "row and column splits; expected --tp > 1 with it")
    if par.ep == 1 and (par.placement is not None or par.ep_mode != "combine"):
        raise UserError("--placement" if par.placement is not None else "--ep-mode",
                        "places experts over devices; expected --ep N (N > 1) with it")


def check(par: Parallelism, system: System | None, trace: Trace) -> None:
    """Refuse degrees the system or the model (`trace`, one micro-batch's step) cannot
    take, naming the flag."""
    if par.overlap > 1:
        lengths = sorted({op.dims["q_len"] for op in trace.ops if op.kind == "attention"})
        if (par.tp == 1 or trace.phase == "decode" or not lengths
                or any(q_len % par.overlap for q_len in lengths)):
            raise UserError("--tp-overlap", f"tiles the queries of a prefill whose tensor-"
                            f"parallel all-reduces it overlaps; expected --tp > 1, --phase "
                            f"prefill and a divisor of its {lengths[-1] if lengths else 0} "
                            f"tokens, not {par.overlap}")
    if system is None:
        if par.devices > 1 or par.micro_batches > 1:
            raise UserError("--tp" if par.tp > 1 else "--pp" if par.pp > 1 else "--ep"
                            if par.ep > 1 else "--dp" if par.dp > 1 else "--sp" if par.sp > 1
                            else "--micro-batches",
                            "needs a system of several "
                            "devices as --hw (e.g. dgx_a100.yaml); this --hw is one chip")
        return
    if par.devices > system.count:
        flag = max(("--tp", par.tp), ("--ep", par.ep), ("--pp", par.pp), ("--dp", par.dp),
                   ("--sp", par.sp), key=lambda f: f[1])[0]
        raise UserError(flag, f"--dp {par.dp} × --tp {par.tp} × --sp {par.sp} × --ep {par.ep} "
                              f"× --pp {par.pp} = "
                                f"{par.devices} devices, but {system.name} has {system.count}")
    if par.sp > 1 and (par.tp > 1 or par.ep > 1):
        raise UserError("--sp", "sequence parallelism with --tp or --ep is not modelled; "
                                "expected --tp 1 --ep 1 with it")
    check_sequence(trace, par.sp)
    if par.ep > 1:
        if not trace.expert_tokens:
            raise UserError("--ep", "places an MoE model's experts; this model has none, "
                                    "expected --ep 1")
        experts = len(trace.expert_tokens[0])
        if experts % par.ep:
            raise UserError("--ep", f"expected a divisor of the model's {experts} experts per "
                                    f"block, not {par.ep}")
        if par.ep_mode == "coherent" and trace.phase != "decode":
            raise UserError("--ep-mode", "coherent (ExFlow) is modelled for decode steps (its "
                                         "prompts' context is all-gathered once, before); "
                                         "expected --phase decode or --ep-mode combine")
    for attention in (op for op in trace.ops if op.kind == "attention" and par.tp > 1):
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
    if blocks % (par.pp * par.interleave):
        raise UserError("--pp-interleave", f"--pp {par.pp} × --pp-interleave {par.interleave}"
                                           f" virtual stages do not divide the model's "
                                           f"{blocks} blocks")


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
    return op.evolve(ops=_divide(op.ops, tp), input_bytes=_divide(op.input_bytes, tp),
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


def split_tensor(trace: Trace, tp: int, sequence: bool = False) -> Trace:
    """One device's share of `trace` under tensor parallelism of degree `tp`. `sequence`:
    Megatron-LM's sequence parallelism inside the group (Korthikanti et al., arXiv
    2205.05198): each row split ends in a reduce-scatter instead of an all-reduce, the
    norms, residual adds and the embedding's output work on 1/tp of the tokens, and an
    all-gather of a norm's output precedes the column splits that read it."""
    if tp == 1:
        return trace
    ops: list[Op] = []
    moved: dict[int, int] = {}
    gathered: dict[int, int] = {}  # a token-split producer → its all-gather
    split_tokens: set[int] = set()  # ops (new indices) whose output is split by tokens
    saved = 0

    def emit(op: Op, deps: tuple[int, ...]) -> int:
        ops.append(op.evolve(index=len(ops), deps=deps))
        return len(ops) - 1

    def whole(deps: tuple[int, ...], at: Op) -> tuple[int, ...]:
        """`deps` with every token-split producer all-gathered first (once each)."""
        out = []
        for dep in deps:
            if dep in split_tokens:
                if dep not in gathered:
                    producer = ops[dep]
                    gather = replace(_collective(at, "allgather", tp),
                                     module=f"{producer.module}.allgather",
                                     input_bytes=producer.output_bytes * tp,
                                     output_bytes=producer.output_bytes * tp)
                    gathered[dep] = emit(gather, (dep,))
                dep = gathered[dep]
            out.append(dep)
        return tuple(out)

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
            part = op.evolve(ops=op.ops // tp, weight_bytes=weight,
                           dims={**d, cut: d[cut] // tp, "parallel": _divide(d["parallel"], tp)},
                           input_bytes=op.input_bytes // tp if row else op.input_bytes,
                           output_bytes=op.output_bytes if row else op.output_bytes // tp)
            index = emit(part, deps if row else whole(deps, op))
            if row and sequence:
                index = emit(_collective(op, "reducescatter", tp), (index,))
                split_tokens.add(index)
            elif row or op.layer == "lm_head":
                index = emit(_collective(op, "allreduce" if row else "allgather", tp), (index,))
            moved[op.index] = index
        elif op.kind == "attention":
            moved[op.index] = emit(_split_op(op, tp).evolve(dims={
                **d, "heads": d["heads"] // tp, "kv_heads": d["kv_heads"] // tp,
                "parallel": _divide(d["parallel"], tp)}), deps)
        elif op.module.startswith(op.layer + ".") and op.kind != "norm" and _is_block(op.layer):
            moved[op.index] = emit(_split_op(op, tp), whole(deps, op))  # between the splits
        elif sequence and (op.kind in ("norm", "embedding")
                           or (op.module == op.layer and _is_block(op.layer))):
            # the hidden stream between the blocks' splits: norms, residual adds, embedding
            moved[op.index] = emit(token_share(op, 1 / tp), deps)
            split_tokens.add(moved[op.index])
        else:
            moved[op.index] = emit(op, deps)  # norms, residual adds, embedding: whole
    return replace(trace, model=f"{trace.model} [tp {tp}]", ops=tuple(ops),
                   weights_bytes=trace.weights_bytes - saved,
                   state_bytes=_divide(trace.state_bytes, tp))


def _tile(op: Op, rows: int, keys: int) -> Op:
    """The attention `op` for `rows` of its queries (the last of which sees `keys` keys):
    their score pairs' share of its work, their queries and outputs, and the keys and
    values they read."""
    d = op.dims
    causal, window = bool(d["causal"]), d.get("window", 0)
    pairs = attention_pairs(rows, keys, causal, window)
    share = pairs / attention_pairs(d["q_len"], d["kv_len"], causal, window)
    q_bytes = min(op.output_bytes, op.input_bytes)  # the output has the queries' shape
    kv_share = keys / d["kv_len"]
    row_share = rows / d["q_len"]
    return replace(
        op, ops=math.ceil(op.ops * share),
        input_bytes=math.ceil(q_bytes * row_share + (op.input_bytes - q_bytes) * kv_share),
        output_bytes=math.ceil(op.output_bytes * row_share),
        state_read_bytes=math.ceil(op.state_read_bytes * kv_share),
        state_write_bytes=math.ceil(op.state_write_bytes * row_share),
        dims={**d, "q_len": rows, "kv_len": keys, "pairs": max(1, pairs)})


def tile_attention(trace: Trace, tiles: int) -> Trace:
    """FastAttention's tiling-AllReduce (arXiv 2410.16663) on a tensor-parallel device's
    trace: in every block the attention, the ops up to the row-split output projection and
    that projection are cut into `tiles` query tiles, and each tile's all-reduce runs on the
    links while the next tile computes (the stream waits only where the block's residual add
    needs the last). Each tile reads the projection's weights again, and the keys and values
    its queries see. Prefill and encoder passes (a tile is q_len / tiles query rows of every
    sequence)."""
    if tiles == 1:
        return trace
    ops: list[Op] = []
    moved: dict[int, int] = {}
    source = list(trace.ops)
    i = 0
    while i < len(source):
        op = source[i]
        end = next((j for j in range(i + 1, len(source)) if source[j].kind == "collective"
                    and source[j].layer == op.layer), None) if op.kind == "attention" else None
        if end is None:
            ops.append(op.evolve(index=len(ops), deps=tuple(moved[d] for d in op.deps)))
            moved[op.index] = len(ops) - 1
            i += 1
            continue
        d = op.dims
        q, ctx = d["q_len"], d["kv_len"] - d["q_len"]
        reduced: tuple[int, ...] = ()
        for t in range(tiles):
            first_row, last_row = t * q // tiles, (t + 1) * q // tiles
            keys = ctx + last_row if d["causal"] else d["kv_len"]
            local: dict[int, int] = {}
            for j in range(i, end + 1):
                part = source[j]
                deps = tuple(local[x] if x in local else moved[x] for x in part.deps)
                if j == i:
                    part = _tile(part, last_row - first_row, keys)
                elif j < end:
                    part = token_share(part, 1 / tiles)
                else:  # this tile's all-reduce, after the previous tile's on the links
                    size = math.ceil(part.input_bytes / tiles)
                    part = part.evolve(input_bytes=size, output_bytes=size,
                                   dims={**part.dims, "overlap": 1})
                    deps += reduced
                ops.append(part.evolve(index=len(ops), deps=deps))
                local[part.index] = len(ops) - 1
            reduced = (len(ops) - 1,)
        for j in range(i, end + 1):
            moved[source[j].index] = len(ops) - 1
        i = end + 1
    return replace(trace, model=f"{trace.model} [tiled {tiles}]", ops=tuple(ops))


def resident_weights(trace: Trace, experts_held: Table[str, int] | None = None
                     ) -> dict[str, int]:
    """Weight bytes a device holds per layer of `trace`: what its ops read, the experts no
    token chose (an MoE block holds `experts_held[layer]` experts, default all), and the
    rest of the model's weights (the embedding table beyond the rows read) in the first
    layer."""
    held: dict[str, int] = {}
    for op in trace.ops:
        if not is_expert(op):
            held[op.layer] = held.get(op.layer, 0) + op.weight_bytes
    sizes = expert_bytes(trace)
    experts = len(trace.expert_tokens[0]) if trace.expert_tokens else 0
    for layer, size in sizes.items():
        held[layer] += size * (experts if experts_held is None else experts_held[layer])
    first = trace.ops[0].layer if trace.ops else ""
    read = sum(op.weight_bytes for op in trace.ops if not is_expert(op))
    held[first] = held.get(first, 0) + max(
        0, trace.weights_bytes - read - sum(size * experts for size in sizes.values()))
    return held


def split_pipeline(trace: Trace, pp: int, held: Table[str, int] | None = None
                   ) -> list[Trace]:
    """The `pp` stages of `trace`: equal runs of blocks, the ops before the first block
    with the first stage and those after the last with the last. `held`: the weight bytes
    a device holds per layer (default: resident_weights of `trace`)."""
    if pp == 1:
        return [trace if held is None else replace(trace, weights_bytes=sum(held.values()))]
    held = resident_weights(trace) if held is None else held
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
        renumbered = tuple(op.evolve(index=i, deps=tuple(index[d] for d in op.deps
                                                           if d in index))
                           for i, op in enumerate(ops))
        layers = dict.fromkeys(op.layer for op in ops)
        traces.append(replace(trace, ops=renumbered,
                              weights_bytes=sum(held.get(layer, 0) for layer in layers),
                              state_bytes=math.ceil(trace.state_bytes / pp)))  # equal depth
    return traces


def links_of(system: System, matrices: Table[str, Matrix] | None = None
             ) -> Callable[[Op], float]:
    """Times a device trace's collectives (ns) on idle links, memoized: over the first
    `devices` devices of the system, an all-to-all with a byte matrix (`matrices`, by the
    op's module) by that matrix."""
    matrices = matrices or {}

    @cache
    def timed(kind: str, nbytes: int, devices: int, stride: int) -> float:
        return run_collective(system, kind, nbytes, devices, stride=stride).latency_s * 1e9

    @cache
    def uneven(matrix: Matrix) -> float:
        return run_alltoallv(system, matrix) * 1e9

    def link(op: Op) -> float:
        matrix = matrices.get(op.module)
        if matrix is not None:
            return uneven(matrix)
        return timed(op.fn, op.input_bytes, op.dims["devices"], op.dims.get("stride", 1))

    return link


@dataclass(frozen=True)
class Pipeline:
    """A step through the pipeline: its makespan, the stages' idle share, and when each
    (micro-batch, virtual stage) ran and each hand-over crossed: (micro-batch, virtual
    stage, start ns, end ns)."""

    makespan_ns: float
    bubble_fraction: float
    runs: tuple[tuple[int, int, float, float], ...] = ()
    sends: tuple[tuple[int, int, float, float], ...] = ()


def run_pipeline(system: System, par: Parallelism, stage_ns: list[float],
                 send_bytes: float) -> Pipeline:
    """Micro-batches through the virtual stages in order (`stage_ns`: one per virtual stage,
    `par.pp × par.interleave` of them, virtual stage c on stage c mod pp), each handing
    `send_bytes` of activations from every rank of a stage to the same rank of the next
    over the links. A stage serves waiting work in Megatron-LM's interleaved order: micro-
    batches in groups of pp, a group's earlier virtual stages first."""
    env = simpy.Environment()
    network = Network(env, system, system.count)
    pp, group = par.pp, par.group
    stages = [simpy.PriorityResource(env) for _ in range(pp)]
    runs: list[tuple[int, int, float, float]] = []
    sends: list[tuple[int, int, float, float]] = []

    def micro_batch(mb: int) -> simpy.events.ProcessGenerator:
        for c, busy in enumerate(stage_ns):
            s = c % pp
            with stages[s].request(priority=(mb // pp, c, mb)) as turn:
                yield turn
                started = env.now
                yield env.timeout(busy)
                runs.append((mb, c, started, env.now))
            if c + 1 < len(stage_ns):
                started, landed, to = env.now, [], (c + 1) % pp
                for rank in range(group):
                    event = env.event()
                    landed.append(event)
                    env.process(network.transfer(s * group + rank, to * group + rank,
                                                 send_bytes, event))
                yield simpy.AllOf(env, landed)
                sends.append((mb, c, started, env.now))

    for mb in range(par.micro_batches):
        env.process(micro_batch(mb))
    env.run()
    work = par.micro_batches * sum(stage_ns)
    bubble = 1 - work / (pp * env.now) if env.now else 0.0
    return Pipeline(env.now, bubble, tuple(sorted(runs)), tuple(sorted(sends)))


def stage_input_bytes(stage: Trace) -> float:
    """Bytes of activations a stage hands on: its last op's output."""
    return float(stage.ops[-1].output_bytes) if stage.ops else 0.0



def split_system(trace: Trace, par: Parallelism) -> tuple[list[Trace], dict[str, Matrix]]:
    """One device's trace per virtual pipeline stage (tensor split, then expert split, then
    cut into pp × interleave stages), and the byte matrices of the expert all-to-alls."""
    trace = split_sequence(tile_attention(split_tensor(trace, par.tp, par.tp_sequence),
                                          par.overlap), par.sp)
    virtual = par.pp * par.interleave
    if par.ep == 1:
        return split_pipeline(trace, virtual), {}
    blocks, experts = len(trace.expert_tokens), len(trace.expert_tokens[0])
    placement = (contiguous(blocks, experts, par.ep) if par.placement in (None, "contiguous")
                 else load_placement(par.placement, par.ep, blocks, experts))
    sizes = expert_bytes(trace)
    layers = list(sizes)
    # the device holding the most expert weights over all blocks (a block's experts alike)
    fullest = max(range(par.ep), key=lambda d: sum(
        sizes[layer] * len(placement.experts_on(b, d)) for b, layer in enumerate(layers)))
    held = resident_weights(trace, {layer: len(placement.experts_on(b, fullest))
                                    for b, layer in enumerate(layers)})
    top_k = sum(trace.expert_tokens[0]) // trace.tokens
    split = split_experts(trace, placement, par.ep_mode, top_k)
    return split_pipeline(split.trace, virtual, held), split.matrices


def simulate_system(system: System, chip: Hardware, trace: Trace, par: Parallelism,
                    mapping: Mapping, granularity: int, quant: str | None,
                    trace_file: str | Path | None = None) -> Result:
    """One step of `trace` (one micro-batch's) spread over `system` by `par`: each stage's
    device share simulated on the chip (with its collectives on the links), then the
    micro-batches through the pipeline. Power and energy count every device used: each
    stage's devices for each micro-batch (under expert parallelism each as busy as the
    busiest), and the chip's idle power while they wait. `trace_file` receives a Perfetto
    timeline of one replica: a process per device and one for the stage hand-overs."""
    from simulator.api import check_fits, run_trace

    if par.overlap > 1 and (chip.scheduling.overlap_ops or mapping == "batch"):
        raise UserError("--tp-overlap", f"overlaps all-reduces with a GPU's one kernel stream;"
                        f" {chip.name} runs ops concurrently (scheduling.overlap_ops) or "
                        "--mapping batch is set; expected a GPU chip and --mapping tensor")
    m, tp, group, pp = par.micro_batches, par.tp, par.group, par.pp
    chunks, matrices = split_system(trace, par)
    # what one device of each stage holds: its virtual stages' weights and states
    stages = [replace(chunks[s], weights_bytes=sum(c.weights_bytes for c in chunks[s::pp]),
                      state_bytes=sum(c.state_bytes for c in chunks[s::pp]),
                      activation_bytes=max(c.activation_bytes for c in chunks[s::pp]))
              for s in range(pp)]
    for number, stage in enumerate(stages):  # a device holds every micro-batch's KV cache
        try:
            check_fits(chip, replace(stage, state_bytes=stage.state_bytes * m))
        except Infeasible as exc:
            raise Infeasible(exc.where, f"{exc.message}, one device of stage {number} on "
                                       f"{system.name} (tp {tp}, ep {par.ep}, pp {pp}); "
                                       "expected a larger --tp, --ep or --pp") from None
    links = links_of(system, matrices)
    runs = [run_trace(chip, chunk, mapping, granularity, quant=quant, links=links)
            for chunk in chunks]
    results = [result for result, _, _ in runs]
    chunk_ns = [timeline.makespan_ns for _, _, timeline in runs]
    pipeline = run_pipeline(system, par, chunk_ns, stage_input_bytes(chunks[0]))
    latency = pipeline.makespan_ns * 1e-9
    busy_s = sum(group * m * result.latency_s for result in results)
    energy_j = (sum(group * m * result.energy_j for result in results)
                + chip.power.idle * (par.replica * latency - busy_s))
    collectives = []
    for s in range(pp):
        grouped: dict[tuple[str, int], list[float]] = {}
        for _, tasks, _ in runs[s::pp]:
            for task in tasks:
                if task.op.kind == "collective":
                    grouped.setdefault((task.op.fn, task.op.input_bytes), []).append(
                        task.link_ns)
        collectives += [CollectiveShare(s, kind, size, len(times), sum(times) * 1e-9)
                        for (kind, size), times in sorted(grouped.items())]
    handovers_s = sum(end - start for mb, _, start, end in pipeline.sends if mb == 0) * 1e-9
    path_s = sum(result.latency_s for result in results) + handovers_s
    links_s = sum(c.time_s for c in collectives) + handovers_s
    first = results[0]
    tokens = first.tokens * m
    per_device = [stage.weights_bytes + stage.state_bytes * m + stage.activation_bytes
                  for stage in stages]
    share = SystemShare(
        system=system.name, devices=par.devices, dp=par.dp, tp=tp, sp=par.sp, pp=pp,
        interleave=par.interleave, ep=par.ep,
        ep_mode=par.ep_mode if par.ep > 1 else None, micro_batches=m,
        device_memory_bytes=max(per_device),
        device_weights_bytes=max(stage.weights_bytes for stage in stages),
        device_state_bytes=max(stage.state_bytes for stage in stages) * m,
        stage_latency_s=tuple(sum(r.latency_s for r in results[s::pp]) for s in range(pp)),
        bubble_fraction=pipeline.bubble_fraction, communication_s=links_s,
        communication_share=links_s / path_s if path_s else 0.0,
        collectives=tuple(collectives))
    if trace_file is not None:
        from simulator.files import write_atomic
        from simulator.timeline import system_chrome_trace

        note = "(the busiest device's work, drawn on every rank)" if par.ep > 1 else ""
        drawn = system_chrome_trace(
            f"{trace.model} on {system.name} [{_degrees(par)}], {trace.phase}", par.replica,
            group, pp, chunks, [timeline for _, _, timeline in runs], pipeline.runs,
            pipeline.sends, note)
        write_atomic(trace_file, json.dumps(drawn, sort_keys=True, separators=(",", ":")),
                     "--trace")
    d = par.dp  # identical replicas, each on its share of the batch
    return replace(
        first, hardware=system.name, model=trace.model if par.devices == 1 else
        f"{trace.model} [{_degrees(par)}]", batch=first.batch * m * d, tokens=tokens * d,
        latency_s=latency, tokens_per_s=tokens * d / latency if latency else 0.0,
        power_w=energy_j * d / latency if latency else 0.0, energy_j=energy_j * d,
        energy_per_token_j=energy_j / tokens,
        memory_bytes=sum(size * group for size in per_device) * d,
        weights_bytes=sum(stage.weights_bytes * group for stage in stages) * d,
        state_bytes=sum(stage.state_bytes * group for stage in stages) * m * d,
        activation_bytes=max(stage.activation_bytes for stage in stages),
        dram_bytes=sum(group * m * result.dram_bytes for result in results) * d,
        launch_s=sum(result.launch_s for result in results[::pp]),
        events=sum(result.events for result in results),
        layers=tuple(layer for result in results for layer in result.layers),
        ops=tuple(op for result in results for op in result.ops), system=share)

def _degrees(par: Parallelism) -> str:
    """`tp 4, pp 2` (and `dp`, `ep` where above 1)."""
    return ", ".join(f"{name} {value}" for name, value in (
        ("dp", par.dp), ("tp", par.tp), ("sp", par.sp), ("ep", par.ep), ("pp", par.pp),
        ("interleave", par.interleave)) if value > 1 or name in ("tp", "pp"))
