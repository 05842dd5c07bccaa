"""A pipelined training step assembled into a TrainingResult (simulator.training.pipeline
has the stages and the schedule). Times by stage are the mean over the pipeline's stages of
one device's busy time; a stage's memory peak is its one-micro-batch timeline's peak plus
the activations stashed for the further micro-batches in flight, its time the time into
that micro-batch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from simulator.hardware import Hardware
from simulator.hardware.system import System
from simulator.training.data_parallel import Replica, replica
from simulator.training.flops import FORMULA, model_flops
from simulator.training.memory import GIB, memory_timeline, saved_for_backward
from simulator.training.pipeline import (
    StageTimes,
    memoized,
    run_one_f_one_b,
    schedule,
    split_passes,
    split_stages,
    stash_peak,
    stashed_bytes,
)
from simulator.training.step import LINKS, STAGES, DeviceMemory, TrainingResult, link_kind
from simulator.workload.trace import MATRIX_KINDS, Trace
from simulator.workload.training import CATEGORIES, TrainingTrace


@dataclass(frozen=True)
class _Run:
    """A part of a stage's micro-batch on the chip: latency (ns), dynamic energy (J),
    static power (W), busy seconds per training stage, and each op's end (s)."""

    ns: float
    dynamic_j: float
    static_w: float
    busy_s: dict[str, float]
    ends_s: tuple[float, ...]


def _runner(machine: Hardware, links: Callable | None) -> Callable[[Trace], _Run]:
    from simulator.api import run_trace

    def run(trace: Trace) -> _Run:
        result, _, timeline = run_trace(machine, trace, fit=False, links=links)
        busy = dict.fromkeys((*STAGES, *LINKS), 0.0)
        for op, start, end in zip(trace.ops, timeline.op_start_ns, timeline.op_end_ns,
                                  strict=True):
            busy[link_kind(op) if op.kind == "collective" else op.stage] += (end - start) * 1e-9
        dynamic = sum(o.energy_j for o in result.ops)
        static = (result.energy_j - dynamic) / result.latency_s if result.latency_s else 0.0
        return _Run(result.latency_s * 1e9, dynamic, static, busy,
                    tuple(ns * 1e-9 for ns in timeline.op_end_ns))

    empty = _Run(0.0, 0.0, 0.0, dict.fromkeys((*STAGES, *LINKS), 0.0), ())
    timed = memoized(lambda trace: run(trace))  # type: ignore[arg-type,return-value]
    return lambda trace: timed(trace) if trace.ops else empty  # type: ignore[return-value]


def pipelined_step(system: System, machine: Hardware, training: TrainingTrace,
                   split: TrainingTrace, *, batch: int, micro: int, dp: int, tp: int, pp: int,
                   zero: int, peak: float, dtype: str, links: Callable | None,
                   chunks: int = 1) -> TrainingResult:
    """One step of `split` (one tensor-parallel device's share of `training`) through a
    pp-stage 1F1B pipeline (`chunks` model chunks per device: the interleaved schedule),
    each stage replicated `dp` times."""
    from simulator.errors import UserError

    if zero > 1:
        raise UserError("--zero", f"partitions gradients (2) or weights (3) across replicas "
                                  f"that a pipeline's stages accumulate over micro-batches; "
                                  f"expected --zero 0 or 1 with --pp {pp}, not {zero}")
    if training.trainable != training.params:
        raise UserError("--pp", "cuts trainable models; LoRA adapters on a pipelined frozen "
                                "base are not modelled, expected --pp 1 with --lora")
    micro_batches = batch // dp // micro
    if chunks > 1 and micro_batches % pp:
        raise UserError("--pp-interleave", f"runs the micro-batches in groups of --pp {pp}; "
                                           f"expected a multiple of {pp} micro-batches per "
                                           f"replica, not {micro_batches}")
    stages, handed = split_stages(split, pp * chunks,
                                  "--pp" if chunks == 1 else "--pp-interleave")
    shares: list[Replica] = [replica(stage, dp, zero, stride=tp * pp) for stage in stages]
    run = _runner(machine, links)
    times, parts = [], []
    for share in shares:
        fwd, last_bwd, opt = (run(part) for part in split_passes(share.trace))
        plain = split_passes(share.plain) if share.plain is not None else None
        bwd = run(plain[1]) if plain is not None else last_bwd
        times.append(StageTimes(fwd.ns, bwd.ns, last_bwd.ns, opt.ns))
        parts.append((fwd, bwd, last_bwd, opt))
    pipe = run_one_f_one_b(system, times, handed, micro_batches, tp, chunks)
    step_s = pipe.makespan_ns * 1e-9
    count = dp * tp * pp
    stage_s = dict.fromkeys((*STAGES, *LINKS), 0.0)
    dynamic = 0.0
    for fwd, bwd, last_bwd, opt in parts:
        for repeat, piece in ((micro_batches, fwd), (micro_batches - 1, bwd), (1, last_bwd),
                              (1, opt)):
            dynamic += repeat * piece.dynamic_j
            for name, seconds in piece.busy_s.items():
                stage_s[name] += repeat * seconds / pp
    static_w = max(piece.static_w for part in parts for piece in part)
    energy_j = dynamic * tp * dp + static_w * step_s * count
    devices: dict[int, DeviceMemory] = {}
    saved: dict[str, int] = {}
    worst, timeline = None, None
    tops, stash = [], {}
    for v, (share, (fwd, _, last_bwd, opt)) in enumerate(zip(shares, parts, strict=True)):
        ends = (*fwd.ends_s, *(fwd.ns * 1e-9 + t for t in last_bwd.ends_s),
                *((fwd.ns + last_bwd.ns) * 1e-9 + t for t in opt.ends_s))
        held = {"weights": share.weights_bytes, "optimizer": share.optimizer_bytes,
                "gradients": share.gradient_bytes}
        # two micro-batches: the second runs with the gradients the first accumulated into
        memory = memory_timeline(share.trace.ops, share.buffers, held, ends,
                                 min(micro_batches, 2), (fwd.ns + last_bwd.ns) * 1e-9)
        resident = {**held, "gradients": held["gradients"] + sum(
            b.bytes for b in share.buffers if b.free < 0 and b.category == "gradients")}
        tops.append((memory.peak(), resident))
        stash[v] = stashed_bytes(share.trace.ops, share.buffers)
        saved.update(saved_for_backward(share.trace.ops, share.buffers))
        if v == 0:
            timeline = memory
    for s in range(pp):  # a device: one chunk running, the others' weights and state held
        mine = [tops[c * pp + s] for c in range(chunks)]
        running = max(range(chunks),
                      key=lambda c: mine[c][0].total - sum(mine[c][1].values()))
        top = mine[running][0]
        at_peak = dict(zip(CATEGORIES, top.bytes, strict=True))
        for c, (_, resident) in enumerate(mine):
            for category, size in resident.items():
                at_peak[category] += size if c != running else 0
        at_peak["activations"] += stash_peak(schedule(s, pp, chunks, micro_batches), stash)
        total = sum(at_peak.values())
        for r in range(dp):
            for t in range(tp):
                device = r * pp * tp + s * tp + t
                devices[device] = DeviceMemory(
                    device=f"{machine.name}[{device}]",
                    capacity_bytes=machine.memory.dram.capacity,
                    peak_memory_bytes=total, peak_time_s=top.time_s, at_peak_bytes=at_peak)
        if worst is None or total > worst[0]:
            worst = (total, s, at_peak, top.time_s)
    assert worst is not None
    capacity = machine.memory.dram.capacity
    oom = None
    if worst[0] > capacity:
        name, size = max(worst[2].items(), key=lambda pair: pair[1])
        oom = (f"{machine.name}[{worst[1] * tp}] (pipeline stage {worst[1]}) runs out of "
               f"memory: peak {worst[0] / GIB:.2f} GiB, {worst[3]:.3f} s into a micro-batch "
               f"with the activations of those in flight, capacity "
               f"{capacity / GIB:.2f} GiB (memory.dram.capacity); {name} hold the most, "
               f"{size / GIB:.2f} GiB")
    tokens = batch * training.trace.prompt
    flops = model_flops(training.params, training.layers, training.hidden,
                        training.trace.prompt, batch, training.trainable)
    executed = sum(op.ops for share in shares for op in share.trace.ops
                   if op.stage != "optim" and op.kind in MATRIX_KINDS) * micro_batches * tp * dp
    per_device = step_s * count
    return TrainingResult(
        hardware=f"{count} × {machine.name}", model=training.trace.model, phase="train",
        batch=batch, micro_batch=micro, micro_batches=micro_batches,
        seq_len=training.trace.prompt, tokens=tokens, recompute=training.recompute,
        optimizer=training.optimizer, devices_count=count, dp=dp, tp=tp, pp=pp, sp=1, zero=zero,
        pp_interleave=chunks, fpdt_chunks=1, step_time_s=step_s,
        micro_batch_time_s=max((t.forward + t.backward) * 1e-9 for t in times),
        tokens_per_s=tokens / step_s if step_s else 0.0, model_flops=flops,
        model_tflops_per_gpu=flops / per_device * 1e-12 if step_s else 0.0,
        mfu=flops / per_device / peak if step_s else 0.0,
        hfu=executed / per_device / peak if step_s else 0.0,
        flops_formula=f"{FORMULA} ({dtype}: {peak * 1e-12:.1f} TFLOP/s)",
        stage_time_s=stage_s, bubble_fraction=pipe.bubble_fraction,
        power_w=energy_j / step_s if step_s else 0.0, energy_j=energy_j,
        energy_per_token_j=energy_j / tokens, peak_memory_bytes=worst[0],
        devices=tuple(devices[d] for d in sorted(devices)), saved_activation_bytes=saved,
        out_of_memory=oom, parameters=training.params,
        trainable_parameters=training.trainable, timeline=timeline)
