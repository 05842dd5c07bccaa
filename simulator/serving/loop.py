"""The serving loop: requests arrive, a router hands each to a replica, each replica's
scheduler picks its steps, the engine times them.

Events are taken in time order: an arrival (routed at once: round robin, or to the replica
with the fewest requests in it, the lowest-numbered on a tie) or the end of a replica's
step (its tokens made, its finished requests out, its next step chosen). A replica with
nothing to run waits for the next request routed to it. Each replica's KV cache gets the
blocks its devices' memory leaves after the weights and a full prefill's activations
(vLLM's profile run), at `memory_fraction` of the memory, unless pinned. Ctrl-C ends the
run early: the summary then covers the requests finished so far (`interrupted`).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from simulator.errors import UserError
from simulator.hardware.schema import ConcurrentInstances
from simulator.serving.kvcache import BlockManager
from simulator.serving.metrics import per_request, spread
from simulator.serving.requests import Request
from simulator.serving.schedulers import SCHEDULERS, Running, Scheduler, Step
from simulator.serving.steps import StepCost, StepTimer

ROUTERS = ("round_robin", "least_outstanding")
STEP_KINDS = ("prefill", "decode", "mixed", "instances")


@dataclass(frozen=True)
class Options:
    """How the server runs (see `simulate serve --help`)."""

    scheduler: str = "vllm"
    max_sequences: int = 256
    max_tokens: int = 8192
    #: sarathi: the tokens a step feeds, decodes and prompt chunks (Sarathi-Serve's budget)
    token_budget: int = 512
    block_size: int = 16
    kv_blocks: int | None = None
    memory_fraction: float = 0.9
    bucket: int = 16
    reject: bool = False
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    replicas: int = 1
    router: str = "round_robin"
    #: keep every step (replica, start, end, kind, sequences) for plots and traces
    record_steps: bool = False


@dataclass(frozen=True)
class StepRecord:
    """One step a replica ran."""

    replica: int
    start_s: float
    end_s: float
    kind: str
    sequences: int
    kv_blocks_used: int


@dataclass
class ServeResult:
    """A finished (or interrupted) run's requests, summary and timeline."""

    summary: dict[str, Any]
    requests: list[dict[str, float | int]]
    #: (time s, requests in the server, KV blocks used on all replicas) where the number
    #: of requests changed (the count is constant in between: areas are exact)
    timeline: list[tuple[float, int, int]] = field(default_factory=list)
    #: every step, when `Options.record_steps`
    steps: list[StepRecord] = field(default_factory=list)


@dataclass
class Replica:
    """One copy of the model on its own devices, with its scheduler and KV cache."""

    index: int
    scheduler: Scheduler
    free_s: float = 0.0  # when its step in flight ends (or it last went idle)
    step: Step | None = None
    wake: bool = False  # a request came while it was idle: choose a step at free_s
    busy_s: float = 0.0
    energy_j: float = 0.0
    kv_time: float = 0.0  # ∫ used blocks dt
    kv_peak: int = 0
    steps: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(STEP_KINDS, 0))
    sequences_in_steps: int = 0
    served: int = 0

    @property
    def inside(self) -> int:
        return len(self.scheduler.waiting) + len(self.scheduler.running)

    @property
    def active(self) -> bool:
        return self.step is not None or self.wake


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


def _cost(timer: StepTimer, step: Step, sharing: ConcurrentInstances) -> StepCost:
    """What `step` takes: one batch step, or a round of batch-one instance steps overlapping
    as `sharing` says (the longest whole; each other its launches and a share of its
    kernels, grown by contention)."""
    if step.kind == "prefill":
        return timer.prefill([s.request.prompt + s.generated for s in step.sequences])
    if step.kind == "decode":
        return timer.decode([s.cached for s in step.sequences])
    if step.kind == "mixed":
        chunks = [(fed, s.request.prompt + s.generated - s.pending)
                  for s, fed in zip(step.sequences, step.tokens, strict=True) if s.pending]
        return timer.mixed(chunks, [s.cached for s in step.sequences if not s.pending])
    costs = sorted((timer.prefill([s.request.prompt]) if s.generated == 0
                    else timer.decode([s.cached]) for s in step.sequences),
                   key=lambda c: c.latency_s, reverse=True)
    others = len(costs) - 1
    added = sum(c.launch_s + sharing.device_share * (c.latency_s - c.launch_s)
                for c in costs[1:])
    return StepCost(costs[0].latency_s + added * (1.0 + sharing.contention * others ** 2),
                    sum(c.energy_j for c in costs))


def _admit(requests: list[Request], options: Options, limit: float
           ) -> tuple[list[Request], list[Request]]:
    """(accepted, rejected): a request that can never fit is an error unless `reject`."""
    accepted, rejected = [], []
    for request in requests:
        whole = request.prompt + request.output
        if whole <= limit and (request.prompt <= options.max_tokens
                               or SCHEDULERS[options.scheduler].chunked):
            accepted.append(request)
        elif options.reject:
            rejected.append(request)
        else:
            raise UserError("--requests", f"request {request.id} needs {whole} tokens "
                            f"(prompt {request.prompt}); the KV cache holds {int(limit)} for "
                            f"one sequence and a step prefills at most {options.max_tokens}; "
                            "expected shorter requests, more memory, or --reject")
    return accepted, rejected


def serve(timer: StepTimer, requests: list[Request], options: Options,
          capacity_bytes: float, max_positions: int | None, idle_w: float,
          sharing: ConcurrentInstances | None = None) -> ServeResult:
    """Run `requests` through the server (see the module notes); `sharing`: how the
    `instances` scheduler's instances overlap on a device (default: strict turns)."""
    sharing = sharing or ConcurrentInstances()
    if options.scheduler not in SCHEDULERS:
        raise UserError("--scheduler", f"expected one of {', '.join(SCHEDULERS)}, not "
                                       f"{options.scheduler!r}")
    if options.router not in ROUTERS:
        raise UserError("--router", f"expected one of {', '.join(ROUTERS)}, not "
                                    f"{options.router!r}")
    if options.replicas < 1:
        raise UserError("--replicas", f"expected a whole number ≥ 1, not {options.replicas}")
    blocks, per_token = kv_capacity(timer, options, capacity_bytes, max_positions)
    kind = SCHEDULERS[options.scheduler]
    replicas = [Replica(i, kind(BlockManager(blocks, options.block_size), options.max_sequences,
                                options.token_budget if kind.chunked else options.max_tokens))
                for i in range(options.replicas)]
    accepted, rejected = _admit(requests, options,
                                min(blocks * options.block_size, max_positions or math.inf))
    pending = deque(Running(r) for r in accepted)
    now = 0.0
    done: list[Running] = []
    timeline: list[tuple[float, int, int]] = []
    records: list[StepRecord] = []
    inside, used, turn = 0, 0, 0  # requests in the server and KV blocks used, all replicas

    def mark() -> None:
        if timeline and timeline[-1][0] == now:  # several events at one instant: the last
            timeline.pop()
        if not timeline or timeline[-1][1] != inside:
            timeline.append((now, inside, used))

    def route() -> Replica:
        nonlocal turn
        if options.router == "round_robin":
            turn += 1
            return replicas[(turn - 1) % len(replicas)]
        return min(replicas, key=lambda r: (r.inside, r.index))

    def start(replica: Replica) -> None:
        """Choose and begin the replica's next step at its free time (or let it idle)."""
        nonlocal used
        replica.wake = False
        kv = replica.scheduler.kv
        before = kv.used
        step = replica.scheduler.next_step(replica.free_s)
        used += kv.used - before
        replica.kv_peak = max(replica.kv_peak, kv.used)
        if step is None:
            if replica.inside and not pending:
                raise RuntimeError("the scheduler stalled with requests waiting")
            return
        cost = _cost(timer, step, sharing)
        if options.record_steps:
            records.append(StepRecord(replica.index, replica.free_s,
                                      replica.free_s + cost.latency_s, step.kind,
                                      len(step.sequences), kv.used))
        replica.step = step
        replica.free_s += cost.latency_s
        replica.energy_j += cost.energy_j
        replica.busy_s += cost.latency_s
        replica.kv_time += kv.used * cost.latency_s
        replica.steps[step.kind] += 1
        replica.sequences_in_steps += len(step.sequences)

    def finish(replica: Replica) -> None:
        """End the replica's step in flight at its free time."""
        nonlocal used, inside
        step, replica.step = replica.step, None
        assert step is not None
        for seq, fed in itertools.zip_longest(step.sequences, step.tokens, fillvalue=1):
            if seq.pending:  # a chunk of its prompt: a token once the last chunk is in
                seq.pending -= fed
                if seq.pending:
                    continue
            if not seq.done:
                seq.generated += 1
                if seq.first_token_s is None:
                    seq.first_token_s = replica.free_s
        before = replica.scheduler.kv.used
        out = replica.scheduler.finished(step, replica.free_s)
        used += replica.scheduler.kv.used - before
        inside -= len(out)
        replica.served += len(out)
        for seq in out:
            seq.replica = replica.index
        done.extend(out)

    interrupted = False
    try:
        while True:
            busy = [r for r in replicas if r.active]
            nearest = min(busy, key=lambda r: (r.free_s, r.index)) if busy else None
            if pending and (nearest is None or pending[0].request.arrival_s <= nearest.free_s):
                seq = pending.popleft()
                now = seq.request.arrival_s
                target = route()
                target.scheduler.waiting.append(seq)
                inside += 1
                if target.step is None:  # idle: it chooses a step now
                    target.free_s = max(target.free_s, now)
                    target.wake = True
                mark()
                continue
            if nearest is None:
                break
            now = nearest.free_s
            if nearest.step is not None:
                finish(nearest)
                mark()
            start(nearest)
    except KeyboardInterrupt:
        interrupted = True
    if not interrupted:
        timeline.append((now, 0, used))  # the last completion: the server empty
    return ServeResult(_summary(options, replicas, done, accepted, rejected, now, timer,
                                idle_w, blocks, per_token, interrupted),
                       [per_request(s) for s in sorted(done, key=lambda s: s.request.id)],
                       timeline, records)


def _summary(options: Options, replicas: list[Replica], done: list[Running],
             accepted: list[Request], rejected: list[Request], now: float,
             timer: StepTimer, idle_w: float, blocks: int, per_token: float,
             interrupted: bool) -> dict[str, Any]:
    rows = [per_request(seq) for seq in done]
    first = min((r.arrival_s for r in accepted), default=0.0)
    makespan = max(0.0, now - first)
    energy = sum(r.energy_j for r in replicas)
    energy += sum(idle_w * timer.devices * max(0.0, makespan - r.busy_s) for r in replicas)
    outputs = sum(s.request.output for s in done)
    good = [r for r in rows if (options.slo_ttft_s is None or r["ttft_s"] <= options.slo_ttft_s)
            and (options.slo_tpot_s is None or r["tpot_s"] <= options.slo_tpot_s)]
    busy = sum(r.busy_s for r in replicas)
    steps = {k: sum(r.steps[k] for r in replicas) for k in STEP_KINDS}
    summary: dict[str, Any] = {
        "scheduler": options.scheduler, "requests": len(rows), "rejected": len(rejected),
        "replicas": len(replicas), "router": options.router,
        "makespan_s": makespan,
        "requests_per_s": len(rows) / makespan if makespan else 0.0,
        "output_tokens_per_s": outputs / makespan if makespan else 0.0,
        "goodput_requests_per_s": len(good) / makespan if makespan else 0.0,
        **{name: spread([float(r[name]) for r in rows])
           for name in ("ttft_s", "tpot_s", "e2e_s", "queue_s")},
        "preemptions": sum(r.scheduler.preemptions for r in replicas),
        "energy_j": energy,
        "energy_per_output_token_j": energy / outputs if outputs else 0.0,
        "power_w": energy / makespan if makespan else 0.0,
        "kv_blocks": blocks, "kv_block_size": options.block_size,
        "kv_bytes_per_token": per_token,
        "kv_utilisation": {
            "mean": sum(r.kv_time for r in replicas) / busy / blocks if busy else 0.0,
            "max": max(r.kv_peak for r in replicas) / blocks},
        "steps": steps,
        "mean_batch": sum(r.sequences_in_steps for r in replicas) / max(1, sum(steps.values())),
        "bucket_tokens": options.bucket, "engine_runs": len(timer.memo) + len(timer.splits),
    }
    if len(replicas) > 1:
        summary["requests_per_replica"] = [r.served for r in replicas]
    if interrupted:
        summary["interrupted"] = True
        summary["unfinished"] = len(accepted) - len(done)
    return summary
