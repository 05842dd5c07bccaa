"""Serving: the request loop, its schedulers and KV cache, and `simulate serve`."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import yaml

from simulator.api import simulate
from simulator.cli import main
from simulator.serving.loop import Options
from simulator.serving.requests import load_spec
from simulator.serving.serve import run_serving

TWO = {"num_hidden_layers": "2"}


def _serve(spec: dict, hw_set: dict | None = None, **options: object):
    return run_serving("gpu_a100.yaml", "llama2-7b", load_spec(spec, "spec"),
                       Options(**options), model_set=TWO,  # type: ignore[arg-type]
                       hw_set=hw_set)


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
    (["--rate", "4", "--scheduler", "instances", "--hw-set",
      "overheads.instances.device_share=1.5"], "device_share"),
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


TURNS = {"overheads.instances.device_share": 1, "overheads.instances.contention": 0}


def test_instances_take_turns_on_the_device_without_overlap() -> None:
    """k equal requests in k instances that do not overlap: each round runs k batch-one
    steps one after another, so everything takes k times one request's time."""
    one = {"arrival": "burst", "num_requests": 1, "prompt": 40, "output": 6}
    single = _serve(one, TURNS, scheduler="instances").summary["makespan_s"]
    four = _serve({**one, "num_requests": 4}, TURNS, scheduler="instances")
    assert four.summary["makespan_s"] == pytest.approx(4 * single, rel=1e-12)
    assert {row["e2e_s"] for row in four.requests} == {four.summary["makespan_s"]}
    fused = _serve({**one, "num_requests": 4}, scheduler="orca").summary["makespan_s"]
    assert fused < 1.2 * single  # one fused step costs about one batch-one step


def test_overlapping_instances_pay_launches_and_a_share_of_kernels() -> None:
    """A round of k equal instances: one whole step, and k − 1 times (launches + share ×
    kernel time), × (1 + contention (k − 1)²); with one request, its step alone."""
    share, contention = 0.4, 0.01
    spec = {"arrival": "burst", "num_requests": 3, "prompt": 8, "output": 2}
    sets = {"overheads.instances.device_share": share,
            "overheads.instances.contention": contention}
    three = _serve(spec, sets, scheduler="instances", bucket=1).summary["makespan_s"]
    prefill = simulate("gpu_a100.yaml", "llama2-7b", model_set=TWO, phase="prefill", prompt=8)
    decode = simulate("gpu_a100.yaml", "llama2-7b", model_set=TWO, context=8)
    rounds = sum(r.latency_s + 2 * (r.launch_s + share * (r.latency_s - r.launch_s))
                 * (1 + contention * 4) for r in (prefill, decode))
    assert three == pytest.approx(rounds, rel=1e-12)
    alone = _serve({**spec, "num_requests": 1}, sets, scheduler="instances", bucket=1)
    assert alone.summary["makespan_s"] == pytest.approx(
        prefill.latency_s + decode.latency_s, rel=1e-12)
    assert prefill.launch_s > 0 and decode.launch_s < decode.latency_s


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


def _timer():
    from simulator.hardware.loader import load_hardware
    from simulator.serving.steps import StepTimer
    from workloads.config import resolve_model

    return StepTimer(load_hardware("gpu_a100.yaml"), resolve_model("llama2-7b", TWO, None),
                     bucket=1)


def test_a_mixed_step_of_one_kind_is_that_step() -> None:
    """A mixed step of one whole prompt is its prefill exactly; of decodes only, the decode
    step up to the ops that differ between the two traces (the cache append), within 1 %;
    and a chunk after cached tokens costs more than the same chunk alone."""
    timer = _timer()
    whole, alone = timer.mixed([(96, 0)], []), timer.prefill([96])
    assert (whole.latency_s, whole.energy_j) == (alone.latency_s, alone.energy_j)
    for batch, context in ((1, 200), (8, 300)):
        mixed, decode = timer.mixed([], [context] * batch), timer.decode([context] * batch)
        assert mixed.latency_s == pytest.approx(decode.latency_s, rel=0.01)
        assert mixed.energy_j == pytest.approx(decode.energy_j, rel=0.01)
    assert timer.mixed([(96, 900)], []).latency_s > whole.latency_s
    both = timer.mixed([(96, 0)], [300] * 8)
    assert max(whole.latency_s, timer.decode([300] * 8).latency_s) < both.latency_s < (
        whole.latency_s + timer.decode([300] * 8).latency_s)


def test_orca_runs_a_joining_prompt_with_the_running_decodes() -> None:
    """Selective batching: a request that arrives while another decodes is prefilled in a
    mixed step with that decode; no step is a prefill of its own, and the first request's
    tokens keep coming one a step."""
    spec = {"arrival": "fixed", "rate": "250 /s", "num_requests": 2, "prompt": 64,
            "output": 12}
    done = _serve(spec, scheduler="orca", bucket=1, record_steps=True)
    assert done.summary["steps"]["mixed"] == sum(1 for s in done.steps)
    assert done.summary["steps"]["prefill"] == done.summary["steps"]["decode"] == 0
    # 12 tokens for the first, then the second's 12 (the first of them in a shared step)
    assert len(done.steps) <= 24 and max(s.sequences for s in done.steps) == 2
    flover = _serve(spec, scheduler="flover", bucket=1).summary
    assert flover["steps"]["prefill"] == 2 and flover["steps"]["mixed"] == 0


def test_sarathi_chunks_long_prompts_within_the_token_budget() -> None:
    """A 1,000-token prompt under a 250-token budget is prefilled in 4 chunks, its first
    token after the 4th (the requests behind it wait for budget); the decodes then share
    each step with the next prompts' chunks."""
    spec = {"arrival": "fixed", "rate": "2000 /s", "num_requests": 6, "prompt": 1000,
            "output": 20}
    done = _serve(spec, scheduler="sarathi", token_budget=250, bucket=1, record_steps=True)
    s = done.summary
    assert s["requests"] == 6 and s["steps"]["mixed"] == len(done.steps)
    first = done.requests[0]
    timer = _timer()
    chunks = sum(timer.mixed([(250, 250 * i)], []).latency_s for i in range(4))
    assert first["ttft_s"] == pytest.approx(chunks, rel=1e-12)
    vllm = _serve(spec, bucket=1).summary
    assert s["tpot_s"]["p99"] < vllm["tpot_s"]["p99"]  # no decode waits on a whole prompt


def test_sarathi_preempts_under_a_tight_cache_and_completes_everything() -> None:
    spec = {"arrival": "burst", "num_requests": 24, "prompt": 48, "output": 80}
    done = _serve(spec, scheduler="sarathi", kv_blocks=40, block_size=16, token_budget=64)
    assert done.summary["requests"] == 24 and done.summary["preemptions"] > 0
    assert done.summary["kv_utilisation"]["max"] <= 1.0
    assert all(row["e2e_s"] > row["ttft_s"] > 0 for row in done.requests)


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


def test_a_serving_throughput_case_is_output_tokens_over_the_makespan(tmp_path: Path) -> None:
    from simulator.validation.cases import load_cases, run_cases

    requests = {"arrival": "burst", "num_requests": 6, "prompt": 32, "output": 8}
    path = tmp_path / "cases.yaml"
    path.write_text(yaml.safe_dump({"cases": [{
        "id": "x", "description": "a static batch", "hardware": "gpu_a100.yaml",
        "model": "llama2-7b", "model_set": TWO, "metric": "serving_output_tokens_per_s",
        "serving": {"scheduler": "static", "max_sequences": 4, "requests": requests},
        "reference": 1000.0, "role": "report", "tolerance": 0.15, "formula": "tokens / s",
        "formula_source": "here", "source": "here"}]}))
    (outcome,) = run_cases(load_cases(path))
    done = _serve(requests, scheduler="static", max_sequences=4)
    assert done.summary["steps"]["prefill"] == 2  # 6 requests in batches of at most 4
    assert outcome.simulated == 6 * 8 / done.summary["makespan_s"]
