"""Sweeps: resumable after kill -9, identical with local processes and a Dask cluster."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from simulator.cli import main
from simulator.sweep import load, points, run_sweep

# 2 machines × 10 core counts × 10 clocks = 200 points of the tiny model
SPEC_200 = {"hardware": ["fpga_1core.yaml", "fpga_1core_burst.yaml"],
            "grid": {"cores.count": [1, 2, 3, 4, 6, 8, 12, 16, 20, 26],
                     "clock": [f"{c} MHz" for c in (50, 60, 75, 100, 125, 150, 175, 200, 250,
                                                    300)]},
            "models": ["tiny"]}


def write_spec(tmp_path: Path, spec: dict) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_points_are_the_product_with_stable_keys(tmp_path: Path) -> None:
    from simulator.sweep import load_spec

    spec = load_spec(write_spec(tmp_path, SPEC_200))
    first, second = points(spec), points(spec)
    assert len(first) == 200 and first == second
    assert len({p["key"] for p in first}) == 200


def test_killed_sweep_resumes_without_losing_or_repeating(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, SPEC_200)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "simulator.cli", "sweep", str(spec), "--out", str(out),
               "--no-progress"]
    process = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    log = out / "points.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.exists() and log.read_text().count("\n") >= 20:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # the sweep and its worker processes
    process.wait()
    partial = log.read_text().count("\n")
    assert 20 <= partial < 200
    assert not (out / "results.csv").exists()
    table = run_sweep(spec, out, progress=False)
    keys = [json.loads(line)["key"] for line in log.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 200
    frame = load(out)
    assert len(frame) == 200 and frame["key"].is_unique
    assert (frame["status"] == "ok").all()
    assert table.name == "results.csv"


def test_torn_last_line_is_dropped(tmp_path: Path) -> None:
    spec = write_spec(tmp_path, {"hardware": ["fpga_1core.yaml"], "models": ["tiny"],
                                 "grid": {"cores.count": [1, 2, 4]}})
    out = tmp_path / "out"
    run_sweep(spec, out, workers=1, progress=False)
    log = out / "points.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # killed mid-write
    run_sweep(spec, out, workers=1, progress=False)
    assert len(load(out)) == 3 and log.read_text().count("\n") == 3


def test_local_and_dask_give_identical_rows(tmp_path: Path) -> None:
    from distributed import LocalCluster

    spec = write_spec(tmp_path, {"hardware": ["fpga_8core.yaml", "gpu_a100.yaml"],
                                 "grid": {"memory.dram.capacity": ["40 GiB", "1 KiB"]},
                                 "models": ["tiny", "tiny-llama"], "phases": ["decode",
                                                                             "prefill"],
                                 "prompt": 16, "context": 16})
    local = run_sweep(spec, tmp_path / "local", workers=2, progress=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address=None, processes=True) as cluster:
        remote = run_sweep(spec, tmp_path / "dask", scheduler=cluster.scheduler_address,
                           progress=False)
    assert local.read_text() == remote.read_text()
    frame = load(tmp_path / "local")
    assert set(frame["status"]) == {"ok", "infeasible"}  # 1 KiB of DRAM holds nothing
    assert (frame[frame.status == "infeasible"]["message"].str.contains("capacity")).all()


def test_bad_spec_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write_spec(tmp_path, {"hardware": ["fpga_1core.yaml"], "modles": ["tiny"]})
    assert main(["sweep", str(spec), "--out", str(tmp_path / "o")]) == 2
    assert "modles" in capsys.readouterr().err
    assert main(["sweep", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "o")]) == 2


def test_a_sweep_covers_routing_policies_and_encoders(tmp_path: Path) -> None:
    """MoE routing policies are a sweep axis (results carry the imbalance); an encoder runs
    its forward phase, and a phase a model has not is an error row, not a crash."""
    mixtral = tmp_path / "moe.json"
    mixtral.write_text(json.dumps({
        "model_type": "mixtral", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": 256, "num_local_experts": 8, "num_experts_per_tok": 2}))
    spec = write_spec(tmp_path, {"hardware": ["gpu_a100.yaml"],
                                 "models": [str(mixtral), "resnet50"],
                                 "phases": ["prefill", "forward"], "prompt": 64,
                                 "context": None, "batch": [2],
                                 "moe_routing": [None, "zipf:2"]})
    run_sweep(spec, tmp_path / "out", workers=1, progress=False)
    frame = load(tmp_path / "out").set_index(["model", "phase", "moe_routing"], drop=False)
    moe = frame[(frame.model == str(mixtral)) & (frame.phase == "prefill")]
    assert set(moe.status) == {"ok"} and len(moe) == 2
    balanced = moe[moe.moe_routing.isna()].iloc[0]
    skewed = moe[moe.moe_routing == "zipf:2"].iloc[0]
    assert balanced.expert_imbalance == 1.0 < skewed.expert_imbalance
    resnet = frame[(frame.model == "resnet50") & frame.moe_routing.isna()]
    assert set(resnet[resnet.phase == "forward"].status) == {"ok"}
    # resnet50 takes no routing policy and has no prefill; Mixtral has no forward
    assert set(frame[frame.status == "error"].message.str.extract(r"^(--\w[\w-]*)")[0]) == {
        "--moe-routing", "--phase"}


def test_a_serving_sweep_over_arrival_rates_resumes_and_draws_its_curve(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rate is an axis: a row per (scheduler, rate) with the run's throughput and
    percentiles, equal to `simulate serve` at that rate; a second run redoes nothing."""
    from simulator.serving.loop import Options
    from simulator.serving.requests import load_spec as load_requests
    from simulator.serving.serve import run_serving

    model = tmp_path / "small.json"
    model.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 256, "intermediate_size": 512,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 1000,
        "max_position_embeddings": 2048}))
    requests = {"arrival": "poisson", "num_requests": 60, "prompt": 64, "output": 16,
                "seed": 3}
    spec = write_spec(tmp_path, {"hardware": ["gpu_a100.yaml"], "models": [str(model)],
                                 "serve": {"requests": requests, "rates": ["5 /s", "1 /ms"],
                                           "schedulers": ["vllm", "static"],
                                           "options": {"max_sequences": 8}}})
    out = tmp_path / "out"
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1", "--no-progress",
                 "--plot"]) == 0
    frame = load(out)
    assert list(frame.rate_per_s) == [5.0, 1000.0, 5.0, 1000.0]
    assert set(frame.status) == {"ok"}
    direct = run_serving("gpu_a100.yaml", str(model),
                         load_requests({**requests, "rate": "1 /ms"}, "spec"),
                         Options(scheduler="static", max_sequences=8)).summary
    row = frame.iloc[3]
    assert row.output_tokens_per_s == direct["output_tokens_per_s"]
    assert row.ttft_p99_s == direct["ttft_s"]["p99"]
    saturated = frame[frame.rate_per_s == 1000.0].set_index("scheduler")
    assert saturated.output_tokens_per_s["vllm"] > saturated.output_tokens_per_s["static"]
    assert (out / "serving_rate.png").stat().st_size > 0
    log = (out / "points.jsonl").read_text()
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "1",
                 "--no-progress"]) == 0
    assert (out / "points.jsonl").read_text() == log  # nothing redone
    capsys.readouterr()
    for bad, word in ((["4"], "unit"), (["-2 /s"], "above zero")):
        spec = write_spec(tmp_path, {"hardware": ["gpu_a100.yaml"], "models": ["gpt2"],
                                     "serve": {"requests": requests, "rates": bad}})
        assert main(["sweep", str(spec), "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "rates" in err and word in err, err
    spec = write_spec(tmp_path, {"hardware": ["gpu_a100.yaml"], "models": ["gpt2"],
                                 "batch": [2], "serve": {"requests": requests,
                                                         "rates": ["1 /s"]}})
    assert main(["sweep", str(spec), "--out", str(tmp_path / "bad")]) == 2
    assert "batch" in capsys.readouterr().err
