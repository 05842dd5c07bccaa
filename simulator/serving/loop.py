"""The serving loop: requests arrive, the scheduler picks each step, the engine times it.

Time advances from step to step (a step's latency from simulator.serving.steps) or, when
nothing can run, to the next arrival. The KV cache gets the blocks the machine's memory
leaves after the weights and a full prefill's activations (vLLM's profile run), at
`memory_fraction` of the memory (vLLM's gpu_memory_utilization), unless pinned.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from simulator.errors import UserError
from simulator.serving.kvcache import BlockManager
from simulator.serving.metrics import per_request, spread
from simulator.serving.requests import Request
from simulator.serving.schedulers import SCHEDULERS, Running, Step
from simulator.serving.steps import StepCost, StepTimer


@dataclass(frozen=True)
class Options:
    """How the server runs (see `simulate serve --help`)."""

    scheduler: str = "vllm"
    max_sequences: int = 256
    max_tokens: int = 8192
    block_size: int = 16
    kv_blocks: int | None = None
    memory_fraction: float = 0.9
    bucket: int = 16
    reject: bool = False
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    #: instances: a round of k costs (1 + this × (k − 1)) × its steps (an assumption)
    instance_overhead: float = 0.0


@dataclass
class ServeResult:
    """A finished run's requests, summary and timeline."""

    summary: dict[str, Any]
    requests: list[dict[str, float | int]]
    #: (time s, requests in the server, KV blocks used) as a step or idle gap begins where
    #: the number of requests changed (the count is constant in between: areas are exact)
    timeline: list[tuple[float, int, int]] = field(default_factory=list)


def kv_capacity(timer: StepTimer, options: Options, capacity_bytes: float,
                max_positions: int | None) -> tuple[int, float]:
    """(blocks, KV bytes per token on one device) the memory left over holds: after the
    weights and the activations of the largest prefill a step may run."""
    probe = min(1024, max_positions or 1024)
    decode = timer.result("decode", 1, probe)
    per_device = decode.system.device_state_bytes if decode.system else decode.state_bytes
    per_token = per_device / probe
    if options.kv_blocks is not None:
        return options.kv_blocks, per_token
    prefill = timer.result("prefill", 1, min(options.max_tokens, max_positions or math.inf))
    weights = (prefill.system.device_weights_bytes if prefill.system
               else prefill.weights_bytes)
    left = capacity_bytes * options.memory_fraction - weights - prefill.activation_bytes
    blocks = math.floor(left / (per_token * options.block_size)) if per_token else 0
    if blocks < 1:
        raise UserError("--model", f"leaves no memory for a KV cache on one device "
                                   f"({left / 2**30:.2f} GiB after weights and activations); "
                                   "expected a smaller model, more devices, or --kv-blocks")
    return blocks, per_token


def _cost(timer: StepTimer, step: Step, overhead: float) -> StepCost:
    """What `step` takes: one batch step, or a round of batch-one instance steps."""
    if step.kind == "prefill":
        return timer.prefill([s.request.prompt + s.generated for s in step.sequences])
    if step.kind == "decode":
        return timer.decode([s.cached for s in step.sequences])
    costs = [timer.prefill([s.request.prompt]) if s.generated == 0 else timer.decode([s.cached])
             for s in step.sequences]
    stretch = 1.0 + overhead * (len(costs) - 1)
    return StepCost(stretch * sum(c.latency_s for c in costs),
                    sum(c.energy_j for c in costs))


def serve(timer: StepTimer, requests: list[Request], options: Options,
          capacity_bytes: float, max_positions: int | None, idle_w: float) -> ServeResult:
    """Run `requests` through the server (see the module notes)."""
    if options.scheduler not in SCHEDULERS:
        raise UserError("--scheduler", f"expected one of {', '.join(SCHEDULERS)}, not "
                                       f"{options.scheduler!r}")
    blocks, per_token = kv_capacity(timer, options, capacity_bytes, max_positions)
    kv = BlockManager(blocks, options.block_size)
    scheduler = SCHEDULERS[options.scheduler](kv, options.max_sequences, options.max_tokens)
    limit = min(blocks * options.block_size, max_positions or math.inf)
    accepted, rejected = [], []
    for request in requests:
        whole = request.prompt + request.output
        if whole <= limit and request.prompt <= options.max_tokens:
            accepted.append(request)
        elif options.reject:
            rejected.append(request)
        else:
            raise UserError("--requests", f"request {request.id} needs {whole} tokens "
                            f"(prompt {request.prompt}); the KV cache holds {limit} for one "
                            f"sequence and a step prefills at most {options.max_tokens}; "
                            "expected shorter requests, more memory, or --reject")
    pending = deque(Running(r) for r in accepted)
    now, energy, busy = 0.0, 0.0, 0.0
    done: list[Running] = []
    timeline: list[tuple[float, int, int]] = []
    steps = {"prefill": 0, "decode": 0, "instances": 0}
    tokens_in_batches = 0
    kv_time = 0.0  # ∫ used blocks dt
    kv_peak = 0

    while pending or scheduler.waiting or scheduler.running:
        while pending and pending[0].request.arrival_s <= now:
            scheduler.waiting.append(pending.popleft())
        step = scheduler.next_step(now)
        inside = len(scheduler.waiting) + len(scheduler.running)
        if not timeline or timeline[-1][1] != inside:
            timeline.append((now, inside, kv.used))
        kv_peak = max(kv_peak, kv.used)
        if step is None:
            if not pending:
                raise RuntimeError("the scheduler stalled with requests waiting")
            now = pending[0].request.arrival_s
            continue
        cost = _cost(timer, step, options.instance_overhead)
        used = kv.used
        now += cost.latency_s
        energy += cost.energy_j
        busy += cost.latency_s
        kv_time += used * cost.latency_s
        steps[step.kind] += 1
        tokens_in_batches += len(step.sequences)
        for seq in step.sequences:
            if not seq.done:
                seq.generated += 1
                if seq.first_token_s is None:
                    seq.first_token_s = now
        done += scheduler.finished(step, now)
    timeline.append((now, 0, kv.used))  # the last completion: the server empty
    rows = [per_request(seq) for seq in sorted(done, key=lambda s: s.request.id)]
    first = min((r.arrival_s for r in accepted), default=0.0)
    makespan = now - first
    devices = timer.devices
    energy += idle_w * devices * max(0.0, makespan - busy)
    outputs = sum(r.output for r in accepted)
    good = [r for r in rows if (options.slo_ttft_s is None or r["ttft_s"] <= options.slo_ttft_s)
            and (options.slo_tpot_s is None or r["tpot_s"] <= options.slo_tpot_s)]
    summary = {
        "scheduler": options.scheduler, "requests": len(rows), "rejected": len(rejected),
        "makespan_s": makespan,
        "requests_per_s": len(rows) / makespan if makespan else 0.0,
        "output_tokens_per_s": outputs / makespan if makespan else 0.0,
        "goodput_requests_per_s": len(good) / makespan if makespan else 0.0,
        **{name: spread([float(r[name]) for r in rows])
           for name in ("ttft_s", "tpot_s", "e2e_s", "queue_s")},
        "preemptions": scheduler.preemptions,
        "energy_j": energy,
        "energy_per_output_token_j": energy / outputs if outputs else 0.0,
        "power_w": energy / makespan if makespan else 0.0,
        "kv_blocks": blocks, "kv_block_size": options.block_size,
        "kv_bytes_per_token": per_token,
        "kv_utilisation": {"mean": kv_time / busy / blocks if busy else 0.0,
                           "max": kv_peak / blocks},
        "steps": steps, "mean_batch": tokens_in_batches / max(1, sum(steps.values())),
        "bucket_tokens": options.bucket, "engine_runs": len(timer.memo),
    }
    return ServeResult(summary, rows, timeline)
