"""`simulate serve`: a request workload through a batching server on a machine."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from simulator.errors import UserError
from simulator.serving.loop import Options, ServeResult, serve
from simulator.serving.requests import RequestSpec, make_requests, summary
from simulator.serving.steps import StepTimer


def run_serving(hw: str | Path, model: str, spec: RequestSpec, options: Options, *,
                model_set: dict[str, str] | None = None, tp: int = 1, pp: int = 1,
                runtime: str | None = None, hw_set: dict[str, Any] | None = None,
                memo: dict[Any, Any] | None = None) -> ServeResult:
    """Serve the requests `spec` makes with `model` on `hw` (a chip or a system file, with
    `tp` × `pp` devices per replica, dotted `hw_set` overrides) under `options`. `memo`: the
    step times of earlier runs of the same model, machine and parallelism, kept across runs
    (filled in as steps are timed)."""
    from simulator.api import with_runtime
    from simulator.hardware.system import load_machine
    from simulator.parallel import Parallelism, check_degrees
    from workloads.config import resolve_model

    check_degrees(Parallelism(tp, pp))
    system, chip = load_machine(str(hw), hw_set or None)
    if system is not None and tp * pp * options.replicas > system.count:
        raise UserError("--replicas", f"{options.replicas} replica(s) of {tp * pp} device(s) "
                                      f"need {tp * pp * options.replicas}; {hw} has "
                                      f"{system.count}; expected fewer replicas or devices")
    chip = with_runtime(chip, runtime)
    cfg = resolve_model(model, model_set, None)
    requests = make_requests(spec)
    devices = tp * pp
    if system is None:  # one chip: the same machine object for every step (its memos)
        timer = StepTimer(chip, cfg, options.bucket, devices)
    else:
        timer = StepTimer(str(hw), cfg, options.bucket, devices, tp=tp, pp=pp, runtime=runtime,
                          hw_set=hw_set or None)
    if memo is not None:  # whole steps and mixed steps' attention splits alike
        timer.memo = memo.setdefault("steps", {})
        timer.splits = memo.setdefault("splits", {})
    positions = cfg.position_limit
    result = serve(timer, requests, options, chip.memory.dram.capacity, positions,
                   chip.power.idle, chip.overheads.instances)
    result.summary["workload"] = summary(requests)
    result.summary["machine"] = system.name if system is not None else chip.name
    result.summary["model"] = cfg.name
    result.summary["devices"] = devices * options.replicas
    return result


def to_json(result: ServeResult) -> str:
    return json.dumps(result.summary, sort_keys=True, indent=2)


def to_csv(result: ServeResult) -> str:
    if not result.requests:
        return ""
    columns = list(result.requests[0])
    lines = [",".join(columns)]
    lines += [",".join(repr(row[c]) if isinstance(row[c], float) else str(row[c])
                       for c in columns) for row in result.requests]
    return "\n".join(lines) + "\n"


def rows(result: ServeResult) -> list[tuple[str, str]]:
    """The table's rows."""
    s: dict[str, Any] = result.summary

    def ms(spread: dict[str, float]) -> str:
        return (f"mean {spread['mean'] * 1e3:.1f} · p50 {spread['p50'] * 1e3:.1f} · "
                f"p90 {spread['p90'] * 1e3:.1f} · p99 {spread['p99'] * 1e3:.1f} ms")

    work = s["workload"]
    replicas = (f"{s['replicas']} replicas ({s['router']}), " if s["replicas"] > 1 else "")
    done = [("interrupted", f"{s['unfinished']} requests unfinished; the summary covers "
                            "those that finished")] if s.get("interrupted") else []
    return [
        *done,
        ("server", f"{s['scheduler']} on {s['machine']} ({replicas}{s['devices']} "
                   f"device(s)), {s['model']}"),
        ("workload", f"{s['requests']} requests ({s['rejected']} rejected), prompt "
                     f"{work['mean_prompt_tokens']:.0f} / output "
                     f"{work['mean_output_tokens']:.0f} tokens on average"),
        ("makespan", f"{s['makespan_s']:.3f} s"),
        ("throughput", f"{s['requests_per_s']:.3f} requests/s, "
                       f"{s['output_tokens_per_s']:.1f} output tokens/s"),
        ("time to first token", ms(s["ttft_s"])),
        ("time per output token", ms(s["tpot_s"])),
        ("end to end", ms(s["e2e_s"])),
        ("queueing", ms(s["queue_s"])),
        ("preemptions", str(s["preemptions"])),
        ("energy per output token", f"{s['energy_per_output_token_j'] * 1e3:.2f} mJ "
                                    f"({s['power_w']:.1f} W on average)"),
        ("KV cache", f"{s['kv_blocks']} blocks × {s['kv_block_size']} tokens, use mean "
                     f"{s['kv_utilisation']['mean']:.1%}, max {s['kv_utilisation']['max']:.1%}"),
        ("steps", ", ".join(f"{count} {kind}" for kind, count in s["steps"].items() if count)
                  + f"; {s['mean_batch']:.1f} sequences each on average; {s['engine_runs']} "
                  f"engine runs (lengths in buckets of {s['bucket_tokens']})"),
    ]
