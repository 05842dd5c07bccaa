"""One training step on one device: the captured trace of a micro-batch (forward, backward)
and the optimizer simulated by the same engine as inference, repeated for gradient
accumulation, with the memory it holds over the step.

On one stream the micro-batches run back to back: the step takes micro-batches × the
micro-batch's time plus the optimizer's. Gradient accumulation adds into the gradients in
the weight-gradient GEMMs' epilogue (β = 1): no kernels of its own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from simulator.errors import UserError
from simulator.hardware import Hardware
from simulator.training.data_parallel import Replica, is_data_parallel
from simulator.training.flops import ENCODER_FORMULA, FORMULA, model_flops, peak_flops, traced_flops
from simulator.training.memory import (
    GIB,
    MemoryTimeline,
    dominant,
    memory_timeline,
    saved_for_backward,
    unfused_scores,
)
from simulator.workload.trace import MATRIX_KINDS, Op
from simulator.workload.training import (
    CATEGORIES,
    Optimizer,
    Recompute,
    TrainingTrace,
)
from workloads.hf_config import HFConfig
from workloads.models import AnyModel

STAGES = ("fwd", "bwd_act", "bwd_weight", "recompute", "optim")
#: link time besides the stages: collectives, and copies to and from host memory
LINKS = ("communication", "offload")
_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class DeviceMemory:
    """One device's memory over the step: its peak, when, and what it held then."""

    device: str
    capacity_bytes: int
    peak_memory_bytes: int
    peak_time_s: float
    #: bytes per category at the peak (weights, optimizer, gradients, activations, workspace)
    at_peak_bytes: dict[str, int]


@dataclass(frozen=True)
class TrainingResult:
    """Projected performance of one training step (one optimizer update)."""

    hardware: str
    model: str
    phase: str
    batch: int
    micro_batch: int
    micro_batches: int
    seq_len: int
    tokens: int
    recompute: str
    optimizer: str
    devices_count: int
    #: data-parallel replicas and the ZeRO stage (simulator.training.data_parallel), and
    #: each replica's tensor-parallel devices (simulator.training.tensor_parallel)
    dp: int
    tp: int
    #: pipeline stages (simulator.training.pipeline; 1: none), Ulysses sequence-parallel
    #: devices per replica (simulator.training.sequence_parallel)
    pp: int
    sp: int
    zero: int
    #: model chunks per pipeline stage (the interleaved 1F1B schedule; 1: plain 1F1B)
    pp_interleave: int
    #: FPDT's chunks per sequence (simulator.training.chunked; 1: none)
    fpdt_chunks: int
    step_time_s: float
    #: one micro-batch's forward and backward (the step: micro_batches × this + optimizer)
    micro_batch_time_s: float
    tokens_per_s: float
    model_flops: float
    model_tflops_per_gpu: float
    mfu: float
    hfu: float
    flops_formula: str
    #: busy time per stage over the step (fwd, bwd_act, bwd_weight, recompute, optim) and
    #: on the links (communication: collectives; offload: host copies; overlapped with the
    #: stages where the runtime does)
    stage_time_s: dict[str, float]
    #: the pipeline stages' idle share of the step (0 without pipelining)
    bubble_fraction: float
    power_w: float
    energy_j: float
    energy_per_token_j: float
    peak_memory_bytes: int
    devices: tuple[DeviceMemory, ...]
    #: per layer (model order): activation bytes its forward keeps for the backward
    saved_activation_bytes: dict[str, int]
    #: None where the step fits; else which device runs out, by how much, and why
    out_of_memory: str | None
    parameters: int
    trainable_parameters: int
    notes: tuple[str, ...] = ()
    timeline: MemoryTimeline | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("timeline")
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)


def link_kind(op: Op) -> str:
    """Which link time a collective-kind op counts as."""
    return "offload" if op.fn in ("d2h", "h2d") else "communication"


def compute_dtype(cfg: AnyModel) -> str:
    return _DTYPE_NAMES.get(getattr(cfg, "torch_dtype", "bfloat16"), "bf16")


def encoder_step(cfg: HFConfig, seq_len: int | None, classes: int | None, *, tp: int,
                 pp: int, sp: int, chunk: int | str | None, offload: str | None) -> int:
    """An encoder's tokens per image (its image size fixes them), after refusing, in one
    line, what its step does not model (model parallelism, FPDT chunks, offload) and a
    `classes` that is not a count."""
    from simulator.workload.training import image_tokens

    for flag, value in (("--tp", tp), ("--pp", pp), ("--sp", sp)):
        if value > 1:
            raise UserError(flag, f"{cfg.name}: an encoder's step is modelled on one device or "
                                  f"data-parallel replicas (--dp, --zero); expected {flag} 1")
    for flag, given in (("--chunk", chunk), ("--offload", offload)):
        if given is not None:
            raise UserError(flag, f"{cfg.name}: is modelled for language models; expected it "
                                  "left out for an encoder")
    tokens = image_tokens(cfg)
    if seq_len is not None and seq_len != tokens:
        raise UserError("--prompt", f"{cfg.name}'s image size fixes its {tokens} tokens an "
                                    f"image (patches and the class token); expected it left "
                                    f"out, not {seq_len}")
    if classes is not None and (isinstance(classes, bool) or not isinstance(classes, int)
                                or classes < 1):
        raise UserError("--classes", f"expected a whole number ≥ 1, not {classes!r}")
    return tokens


def check_step(batch: int, micro_batch: int | None, seq_len: int) -> int:
    """The micro-batch a step of `batch` sequences runs in (default: the whole batch)."""
    for flag, value in (("--batch", batch), ("--prompt", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(flag, f"expected a whole number ≥ 1, not {value!r}")
    micro = batch if micro_batch is None else micro_batch
    if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1 or batch % micro:
        raise UserError("--micro-batch", f"expected a divisor of --batch {batch} (gradient "
                        f"accumulation runs the rest), not {micro!r}")
    return micro


def simulate_training(hw: Hardware | str | Path, model: AnyModel | str, *, batch: int = 1,
                      seq_len: int | None = None, micro_batch: int | None = None,
                      recompute: Recompute = "none", optimizer: Optimizer = "adamw",
                      dp: int = 1, tp: int = 1, pp: int = 1, sp: int = 1, zero: int = 0,
                      lora: str | None = None, offload: str | None = None,
                      chunk: int | str | None = None, pp_interleave: int = 1,
                      classes: int | None = None, hw_set: dict[str, Any] | None = None,
                      model_set: dict[str, str] | None = None,
                      trace_file: str | Path | None = None,
                      plot_dir: str | Path | None = None,
                      use_cache: bool = True) -> TrainingResult:
    """Simulate one training step of `model` on `hw`: `batch` sequences (the global batch:
    `dp` data-parallel replicas take an equal share each) of `seq_len` tokens (default 2048,
    or the model's positions if fewer) in micro-batches of `micro_batch`, `recompute` (none,
    selective: attention, full: every block), `optimizer` (adamw, sgd with momentum) over
    fp32 master weights, `tp`-way tensor parallelism in each replica
    (simulator.training.tensor_parallel), `pp` pipeline stages (simulator.training.pipeline;
    `pp_interleave` model chunks per stage: the interleaved schedule),
    `sp`-way Ulysses sequence parallelism (simulator.training.sequence_parallel),
    ZeRO stage `zero` (simulator.training.data_parallel), `lora` adapters on a frozen base
    (simulator.workload.lora), `offload` "activations" (simulator.training.offload), FPDT's
    chunks of `chunk` tokens (simulator.training.chunked). An encoder (ViT, CLIP) trains
    on `batch` images, each of the vision tower's tokens (`seq_len`); CLIP on `classes`
    class prompts a step (few-shot classification) or, without, one caption an image
    (contrastive). A step that does not fit is still timed; `out_of_memory` says where and
    why."""
    from simulator.api import run_trace
    from simulator.hardware.system import load_machine
    from simulator.parallel import links_of
    from simulator.training.chunked import chunks_of, fpdt_chunks
    from simulator.training.data_parallel import check_zero, replica
    from simulator.training.offload import host_links, offload_checkpoints, parse_offload
    from simulator.training.sequence_parallel import split_sequence_training
    from simulator.training.tensor_parallel import split_training
    from simulator.workload.training import check_options, get_training_trace, is_encoder
    from workloads.config import resolve_model

    check_options(recompute, optimizer)
    offloaded = parse_offload(offload, recompute)
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1 or batch % dp:
        raise UserError("--dp", f"expected a divisor of --batch {batch} (each replica takes "
                        f"an equal share of the sequences), not {dp!r}")
    for flag, value in (("--tp", tp), ("--pp", pp), ("--sp", sp),
                        ("--pp-interleave", pp_interleave)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(flag, f"expected a whole number ≥ 1, not {value!r}")
    check_zero(zero, dp * sp)
    if pp_interleave > 1 and pp == 1:
        raise UserError("--pp-interleave", f"interleaves the stages of a pipeline; expected "
                                           f"--pp > 1 with --pp-interleave {pp_interleave}")
    if sp > 1 and tp * pp > 1:
        raise UserError("--sp", f"Ulysses with tensor or pipeline parallelism is not modelled; "
                                f"expected --sp 1 with --tp {tp} --pp {pp}")
    system, machine = (None, hw) if isinstance(hw, Hardware) else load_machine(hw, hw_set)
    devices = dp * tp * pp * sp
    if devices > 1 and (system is None or system.count < devices):
        have = "one chip" if system is None else f"{system.count} devices"
        raise UserError("--dp" if tp == pp == 1 else ("--tp" if pp == 1 else "--pp"),
                        f"--dp {dp} × --tp {tp} × --pp {pp} × --sp {sp} needs a system of ≥ "
                        f"{devices} "
                        f"devices; --hw has {have}")
    cfg = resolve_model(model, model_set) if isinstance(model, str) else model
    limit = cfg.position_limit
    if classes is not None and getattr(cfg, "task", "") != "clip":
        raise UserError("--classes", f"sets CLIP's class prompts; {cfg.name} has no text "
                                     "tower, expected it left out")
    if is_encoder(cfg):
        seq_len = encoder_step(cfg, seq_len, classes, tp=tp, pp=pp, sp=sp, chunk=chunk,
                               offload=offload)
        limit = None
    if seq_len is None:
        seq_len = 2048 if limit is None else min(2048, limit)
    micro = check_step(batch // dp, micro_batch, seq_len)
    if limit is not None and seq_len > limit:
        raise UserError("--prompt", f"{cfg.name} has {limit} positions; expected a sequence "
                        f"length ≤ {limit}, not {seq_len}")
    chunks = chunks_of(chunk, seq_len, recompute, tp, pp)
    dtype = compute_dtype(cfg)
    peak = peak_flops(machine, dtype)
    adapters = None
    if lora is not None:
        from simulator.workload.lora import parse_lora

        adapters = parse_lora(lora)
    training = get_training_trace(cfg, micro, seq_len, recompute, optimizer, use_cache,
                                  adapters, classes)
    if not machine.scheduling.fused_attention:
        training = unfused_scores(training)
    links = links_of(system) if system is not None and devices > 1 else None
    split = split_sequence_training(split_training(training, tp), sp)
    if offloaded:
        split, links = offload_checkpoints(split), host_links(links, machine)
    if chunks > 1:
        split = fpdt_chunks(split, chunks)
        if not offloaded:
            links = host_links(links, machine, "--chunk")
    if pp > 1:
        from simulator.training.pipelined import pipelined_step

        if trace_file is not None:
            raise UserError("--trace", "a pipelined training step has no Perfetto trace yet; "
                                       "expected --pp 1 with --trace")
        assert system is not None
        out = pipelined_step(system, machine, training, split,
                             batch=batch, micro=micro, dp=dp, tp=tp, pp=pp, zero=zero,
                             peak=peak, dtype=dtype, links=links, chunks=pp_interleave)
        if plot_dir is not None:
            from simulator.training.plots import save_memory_plot

            save_memory_plot(out, plot_dir)
        return out
    share = replica(split, dp * sp, zero, stride=tp)
    result, _, timeline = run_trace(machine, share.trace, fit=False,
                                    record=trace_file is not None, links=links)
    plain_s = None
    if share.plain is not None and batch // dp // micro > 1:
        plain_s = run_trace(machine, share.plain, fit=False, links=links)[0].latency_s
    step = _Step(machine, training, share, result, timeline, batch, micro, dp, tp, sp, zero,
                 chunks, peak, dtype, plain_s)
    out = step.result()
    if trace_file is not None:
        from simulator.files import write_atomic
        from simulator.timeline import to_json

        write_atomic(trace_file, to_json(machine, share.trace, timeline), "--trace")
    if plot_dir is not None:
        from simulator.training.plots import save_memory_plot

        save_memory_plot(out, plot_dir)
    return out


@dataclass
class _Step:
    """The pieces of one simulated step, assembled into a TrainingResult."""

    hw: Hardware
    training: TrainingTrace
    share: Replica
    run: Any
    timeline: Any
    batch: int
    micro: int
    dp: int
    tp: int
    sp: int
    zero: int
    chunks: int
    peak: float
    dtype: str
    #: a micro-batch without gradient collectives (gradient accumulation), where it differs
    plain_s: float | None

    def result(self) -> TrainingResult:
        ops, result, training = self.share.trace.ops, self.run, self.training
        micro_batches = self.batch // self.dp // self.micro
        ends = [ns * 1e-9 for ns in self.timeline.op_end_ns]
        starts = [ns * 1e-9 for ns in self.timeline.op_start_ns]
        first = next((i for i, op in enumerate(ops) if op.stage == "optim"), len(ops))
        last_s = max(ends[:first], default=0.0)  # the last micro-batch, collectives included
        accumulate_s = last_s if self.plain_s is None else self.plain_s
        step_s = (micro_batches - 1) * accumulate_s + result.latency_s
        stage_s = dict.fromkeys((*STAGES, *LINKS), 0.0)
        for index, (op, start, end) in enumerate(zip(ops, starts, ends, strict=True)):
            repeat = 1 if index >= first else micro_batches
            if op.kind == "collective":
                if is_data_parallel(op) and self.plain_s is not None:
                    repeat = 1
                stage_s[link_kind(op)] += (end - start) * repeat
            else:
                stage_s[op.stage] += (end - start) * repeat
        per_op = [o.energy_j for o in result.ops]
        dynamic = sum(j * (1 if i >= first else micro_batches) for i, j in enumerate(per_op))
        static_w = (result.energy_j - sum(per_op)) / result.latency_s if result.latency_s else 0.0
        count = self.dp * self.tp * self.sp
        energy_j = (dynamic + static_w * step_s) * count
        tokens = self.batch * training.trace.prompt
        if training.encoder:
            flops = traced_flops(training.trace.ops, self.batch // self.micro)
        else:
            flops = model_flops(training.params, training.layers, training.hidden,
                                training.trace.prompt, self.batch, training.trainable)
        executed = self.batch // self.micro * self.tp * self.sp * sum(
            op.ops for op in ops[:first] if op.kind in MATRIX_KINDS)
        share = self.share
        held = {"weights": share.weights_bytes, "optimizer": share.optimizer_bytes,
                "gradients": share.gradient_bytes}
        memory = memory_timeline(ops, share.buffers, held, ends, micro_batches, accumulate_s,
                                 {"workspace": share.gathered_bytes})
        top = memory.peak()
        capacity = self.hw.memory.dram.capacity
        at_peak = dict(zip(CATEGORIES, top.bytes, strict=True))
        names = [self.hw.name] if count == 1 else [f"{self.hw.name}[{i}]"
                                                   for i in range(count)]
        devices = tuple(DeviceMemory(device=name, capacity_bytes=capacity,
                                     peak_memory_bytes=top.total, peak_time_s=top.time_s,
                                     at_peak_bytes=at_peak) for name in names)
        oom = None
        if top.total > capacity:
            name, size = dominant(top)
            oom = (f"{names[0]} runs out of memory: peak {top.total / GIB:.2f} GiB at "
                   f"{top.time_s:.3f} s into the step, capacity {capacity / GIB:.2f} GiB "
                   f"(memory.dram.capacity); {name} hold the most, {size / GIB:.2f} GiB")
        per_device = step_s * count
        return TrainingResult(
            hardware=self.hw.name if count == 1 else f"{count} × {self.hw.name}",
            model=training.trace.model, phase="train", batch=self.batch,
            micro_batch=self.micro, micro_batches=micro_batches, seq_len=training.trace.prompt,
            tokens=tokens, recompute=training.recompute, optimizer=training.optimizer,
            devices_count=count, dp=self.dp, tp=self.tp, pp=1, sp=self.sp, zero=self.zero,
            pp_interleave=1, fpdt_chunks=self.chunks, step_time_s=step_s,
            micro_batch_time_s=accumulate_s, tokens_per_s=tokens / step_s if step_s else 0.0,
            model_flops=flops,
            model_tflops_per_gpu=flops / per_device * 1e-12 if step_s else 0.0,
            mfu=flops / per_device / self.peak if step_s else 0.0,
            hfu=executed / per_device / self.peak if step_s else 0.0,
            flops_formula=f"{ENCODER_FORMULA if training.encoder else FORMULA} "
                          f"({self.dtype}: {self.peak * 1e-12:.1f} TFLOP/s)",
            stage_time_s=stage_s, bubble_fraction=0.0, power_w=energy_j / step_s if step_s else 0.0,
            energy_j=energy_j, energy_per_token_j=energy_j / tokens,
            peak_memory_bytes=top.total, devices=devices,
            saved_activation_bytes=saved_for_backward(ops, share.buffers), out_of_memory=oom,
            parameters=training.params, trainable_parameters=training.trainable,
            timeline=memory)
