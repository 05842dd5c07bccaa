"""Serving: the request loop, its schedulers and KV cache, and `simulate serve`."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from simulator.api import simulate
from simulator.cli import main
from simulator.serving.loop import Options
from simulator.serving.requests import load_spec
from simulator.serving.serve import run_serving

TWO = {"num_hidden_layers": "2"}


def _serve(spec: dict, **options: object):
    return run_serving("gpu_a100.yaml", "llama2-7b", load_spec(spec, "spec"),
                       Options(**options), model_set=TWO)  # type: ignore[arg-type]


def test_one_request_alone_takes_a_prefill_then_decode_steps_exactly() -> None:
    done = _serve({"arrival": "burst", "num_requests": 1, "prompt": 64, "output": 2},
                  bucket=1)
    prefill = simulate("gpu_a100.yaml", "llama2-7b", model_set=TWO, phase="prefill",
                       prompt=64)
    decode = simulate("gpu_a100.yaml", "llama2-7b", model_set=TWO, context=64)
    row = done.requests[0]
    assert row["ttft_s"] == prefill.latency_s and row["queue_s"] == 0.0
    # (finish − first token) / 1: the step's time to its last bit, but for one rounding
    assert row["tpot_s"] == pytest.approx(decode.latency_s, rel=1e-15, abs=0)
    assert row["e2e_s"] == prefill.latency_s + decode.latency_s
    assert done.summary["energy_j"] == prefill.energy_j + decode.energy_j  # never idle


def test_littles_law_holds_on_a_long_stable_run() -> None:
    done = _serve({"rate": "40 /s", "num_requests": 600, "prompt": 32, "output": 24,
                   "seed": 1})
    timeline = done.timeline
    area = sum(n * (later[0] - t) for (t, n, _), later in itertools.pairwise(timeline))
    span = timeline[-1][0] - timeline[0][0]
    busy_mean = area / span  # requests in the server, time-averaged from the loop's state
    little = done.summary["requests_per_s"] * done.summary["e2e_s"]["mean"]
    assert busy_mean == pytest.approx(little, rel=0.02)
    assert done.summary["requests"] == 600


def test_a_tight_kv_cache_preempts_and_every_request_still_completes() -> None:
    done = _serve({"arrival": "burst", "num_requests": 24, "prompt": 48, "output": 80},
                  kv_blocks=40, block_size=16)  # room for ~5 whole sequences at a time
    s = done.summary
    assert s["requests"] == 24 and s["preemptions"] > 0
    assert s["kv_utilisation"]["max"] <= 1.0
    assert max(row["preemptions"] for row in done.requests) >= 1
    assert all(row["e2e_s"] > row["ttft_s"] > 0 for row in done.requests)


def test_iteration_batching_beats_request_batching_on_a_saturated_server() -> None:
    spec = {"rate": "200 /s", "num_requests": 64, "prompt": 32,
            "output": {"dist": "uniform", "low": 4, "high": 64}, "seed": 2}
    vllm = _serve(spec, max_sequences=16).summary
    static = _serve(spec, scheduler="static", max_sequences=16).summary
    assert vllm["output_tokens_per_s"] > static["output_tokens_per_s"]
    assert vllm["e2e_s"]["mean"] < static["e2e_s"]["mean"]


def test_the_same_seed_gives_byte_identical_json(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["serve", "--hw", "gpu_a100.yaml", "--model", "llama2-7b", "--model-set",
            "num_hidden_layers=2", "--rate", "20", "--num-requests", "40", "--prompt", "32",
            "--output", "16", "--seed", "7", "--format", "json"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first
    summary = json.loads(first)
    for name in ("ttft_s", "tpot_s", "e2e_s", "queue_s"):
        assert set(summary[name]) == {"mean", "p50", "p90", "p99"}
    for name in ("makespan_s", "requests_per_s", "output_tokens_per_s", "preemptions",
                 "energy_per_output_token_j", "kv_blocks"):
        assert name in summary


@pytest.mark.parametrize(("extra", "flag"), [
    (["--rate", "0"], "rate"),
    (["--rate", "4", "--prompt", "5000"], "--requests"),  # beyond the KV cache
    (["--rate", "4", "--kv-blocks", "0"], "--kv-blocks"),
    (["--rate", "4", "--scheduler", "fifo"], "--scheduler"),
    (["--rate", "4", "--memory-fraction", "1.5"], "--memory-fraction"),
    (["--rate", "4", "--instance-overhead", "0.2"], "--instance-overhead"),
    (["--rate", "4", "--scheduler", "instances", "--instance-overhead", "-1"],
     "--instance-overhead"),
])
def test_bad_serving_input_is_one_line(extra: list[str], flag: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--hw", "gpu_a100.yaml", "--model", "llama2-7b", "--model-set",
                 "num_hidden_layers=2", "--num-requests", "3", "--kv-blocks", "64", *extra]
                ) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err, err


def test_requests_that_can_never_fit_are_counted_when_asked() -> None:
    done = _serve({"arrival": "burst", "num_requests": 3,
                   "prompt": {"dist": "uniform", "low": 16, "high": 2000}, "seed": 3},
                  kv_blocks=64, reject=True)
    assert done.summary["rejected"] + done.summary["requests"] == 3
    assert done.summary["rejected"] >= 1


def test_one_instance_is_one_request_on_the_vllm_server() -> None:
    spec = {"arrival": "burst", "num_requests": 1, "prompt": 40, "output": 6}
    alone = _serve(spec, scheduler="instances", bucket=1).requests[0]
    assert alone == _serve(spec, scheduler="vllm", bucket=1).requests[0]


def test_instances_take_turns_on_the_device() -> None:
    """k equal requests in k instances: each round runs k batch-one steps one after another,
    so everything takes k times one request's time, and all finish together."""
    one = {"arrival": "burst", "num_requests": 1, "prompt": 40, "output": 6}
    single = _serve(one, scheduler="instances").summary["makespan_s"]
    four = _serve({**one, "num_requests": 4}, scheduler="instances")
    assert four.summary["makespan_s"] == pytest.approx(4 * single, rel=1e-12)
    assert {row["e2e_s"] for row in four.requests} == {four.summary["makespan_s"]}
    fused = _serve({**one, "num_requests": 4}, scheduler="orca").summary["makespan_s"]
    assert fused < 1.2 * single  # one fused step costs about one batch-one step
    stretched = _serve({**one, "num_requests": 4}, scheduler="instances",
                       instance_overhead=0.1).summary["makespan_s"]
    assert stretched == pytest.approx(1.3 * four.summary["makespan_s"], rel=1e-12)


def test_orca_reserves_whole_sequences_and_never_preempts() -> None:
    spec = {"arrival": "burst", "num_requests": 24, "prompt": 48, "output": 80}
    done = _serve(spec, scheduler="orca", kv_blocks=40, block_size=16)
    assert done.summary["preemptions"] == 0 and done.summary["requests"] == 24
    assert done.summary["mean_batch"] <= 5  # 40 blocks hold 5 whole 128-token sequences
    assert done.summary["kv_utilisation"]["max"] <= 1.0


def _loop(requests: list, **options: object):
    """The serving loop alone on a given request list (2-layer Llama-2-7B, one A100)."""
    from simulator.hardware.loader import load_hardware
    from simulator.serving.loop import serve
    from simulator.serving.steps import StepTimer
    from workloads.config import resolve_model

    chip = load_hardware("gpu_a100.yaml")
    timer = StepTimer(chip, resolve_model("llama2-7b", TWO, None))
    return serve(timer, requests, Options(kv_blocks=500, **options),  # type: ignore[arg-type]
                 chip.memory.dram.capacity, 4096, chip.power.idle)


def test_round_robin_replicas_serve_their_shares_as_separate_servers() -> None:
    """Two replicas under round robin: each serves every other request, exactly as one
    server given only those requests (arrivals kept) would."""
    from simulator.serving.requests import make_requests

    requests = make_requests(load_spec({"rate": "30 /s", "num_requests": 40, "prompt": 32,
                                        "output": 12, "seed": 4}, "spec"))
    two = _loop(requests, replicas=2)
    assert two.summary["requests_per_replica"] == [20, 20]
    for replica in (0, 1):
        alone = _loop(requests[replica::2]).requests
        mine = [{**row, "replica": 0} for row in two.requests if row["replica"] == replica]
        assert mine == alone
    assert two.summary["e2e_s"]["mean"] < _loop(requests).summary["e2e_s"]["mean"]


def test_least_outstanding_routes_around_a_busy_replica() -> None:
    """Long and short requests in turn, one sequence per step: round robin sends every long
    one to replica 0, where the queue builds; least-outstanding sends each arrival to the
    replica with fewer requests in it."""
    from simulator.serving.requests import Request

    requests = [Request(i, 0.01 * i, 32, 120 if i % 2 == 0 else 2) for i in range(24)]
    rr = _loop(requests, replicas=2, max_sequences=1)
    lo = _loop(requests, replicas=2, max_sequences=1, router="least_outstanding")
    assert {r["replica"] for r in rr.requests if r["id"] % 2 == 0} == {0}
    assert {r["replica"] for r in lo.requests if r["id"] % 2 == 0} == {0, 1}
    assert lo.summary["e2e_s"]["mean"] < 0.8 * rr.summary["e2e_s"]["mean"]
    assert lo.summary["requests"] == rr.summary["requests"] == 24


def test_replicas_beyond_the_systems_devices_are_refused(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--hw", "hgx_a100_4gpu.yaml", "--model", "llama2-7b",
                 "--model-set", "num_hidden_layers=2", "--rate", "4", "--num-requests", "3",
                 "--tp", "2", "--replicas", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--replicas" in err and "4" in err, err


def test_the_perfetto_trace_and_plots_have_a_track_per_replica_and_request(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace, plots = tmp_path / "serve.json", tmp_path / "plots"
    assert main(["serve", "--hw", "gpu_a100.yaml", "--model", "llama2-7b", "--model-set",
                 "num_hidden_layers=2", "--rate", "20", "--num-requests", "9", "--prompt",
                 "32", "--output", "5", "--replicas", "2", "--perfetto", str(trace),
                 "--plot", str(plots), "--format", "json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] ==
             "process_name"}
    assert names == {"replica 0", "replica 1", "requests"}
    steps = [e for e in events if e["ph"] == "X" and e["pid"] in (1, 2)]
    assert len(steps) == sum(summary["steps"].values())
    per_request = [e for e in events if e["ph"] == "X" and e["pid"] == 3]
    assert len(per_request) == 3 * 9 and {e["tid"] for e in per_request} == set(range(1, 10))
    span = (max(e["ts"] + e["dur"] for e in per_request)
            - min(e["ts"] for e in per_request))  # first arrival to last completion
    assert span == pytest.approx(summary["makespan_s"] * 1e6, rel=1e-9)
    assert sorted(p.name for p in plots.iterdir()) == ["serving_cdf.png",
                                                       "serving_over_time.png"]


def test_ctrl_c_prints_the_partial_summary_and_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import simulator.serving.loop as loop

    real, calls = loop._cost, []

    def interrupted_later(*args: object) -> object:
        calls.append(1)
        if len(calls) == 200:
            raise KeyboardInterrupt
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(loop, "_cost", interrupted_later)
    trace = tmp_path / "serve.json"
    assert main(["serve", "--hw", "gpu_a100.yaml", "--model", "llama2-7b", "--model-set",
                 "num_hidden_layers=2", "--rate", "20", "--num-requests", "50", "--prompt",
                 "32", "--output", "16", "--perfetto", str(trace), "--format", "json"]) == 130
    out, err = capsys.readouterr()
    summary = json.loads(out)
    assert summary["interrupted"] is True
    assert 0 < summary["requests"] < 50 and summary["unfinished"] == 50 - summary["requests"]
    assert "interrupted" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
