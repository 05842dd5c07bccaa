"""The tile-level GPU model: GEMM waves, GEMV bandwidth, FlashAttention-2, the 13B case."""

import json
import statistics
from pathlib import Path

import pytest
import yaml

from simulator.calibration import flash
from simulator.calibration.fit import rms_error
from simulator.cli import main
from simulator.hardware import load_hardware
from simulator.oprun import attention_flops, attention_op, gemm_op, run_op
from simulator.studies.gemm import peak_tflops
from simulator.tiling import plan_gemm
from simulator.validation.cases import load_cases, run_cases, shipped_case_files

A100 = load_hardware("gpu_a100.yaml")
HWCONFIGS = Path(__file__).resolve().parents[1] / "hwconfigs"
CASES = {p.name: p for p in shipped_case_files()}


@pytest.fixture(scope="module")
def attention() -> dict:
    return {o.case.id: o for o in run_cases(load_cases(CASES["flashattention2_a100.yaml"]))}


def test_flashattention2_grid_median_and_worst_error(attention: dict) -> None:
    fa2 = [o for o in attention.values() if o.case.id.startswith("fa2-")]
    assert len(fa2) == 24
    assert all(o.case.kernel.mode == "fwd_bwd" and o.case.metric == "tflops" for o in fa2)
    for role, gate in (("fitted", 0.10), ("held-out", 0.15)):
        errors = [abs(o.error) for o in fa2 if o.case.role == role]
        assert statistics.median(errors) <= 0.10 and max(errors) <= gate, role


def test_a_third_of_the_fa2_points_are_never_fitted(attention: dict) -> None:
    from simulator.calibration.flash import fitted_cases

    fa2 = {i: o for i, o in attention.items() if i.startswith("fa2-")}
    used = {case.id for case in fitted_cases()}  # what the calibration script fits on
    held = {i for i, o in fa2.items() if o.case.role == "held-out"}
    assert used and not used & held
    assert used | held == set(fa2)
    for panel in ("d64-full", "d128-full", "d64-causal", "d128-causal"):
        points = {i for i in fa2 if i.startswith(f"fa2-{panel}-")}
        assert len(points & held) * 3 >= len(points), panel  # at least a third of each curve
    assert all(abs(fa2[i].error) <= 0.15 for i in held)
    assert all(abs(fa2[i].error) <= 0.10 for i in used)


def test_unfused_curve_is_predicted_without_fitting(attention: dict) -> None:
    from simulator.calibration.flash import fitted_cases
    from simulator.validation.render import bias_lines

    pytorch = [o for i, o in attention.items() if i.startswith("pytorch-")]
    assert len(pytorch) == 20 and all(o.case.role == "open" for o in pytorch)
    assert not {o.case.id for o in pytorch} & {case.id for case in fitted_cases()}
    # the known one-sided bias is reported, and stays what the case notes say it is
    errors = sorted(o.error for o in pytorch)
    assert errors[0] > 0.0 and errors[-1] < 0.25
    assert any(line.startswith("one-sided bias: pytorch-unfused") for line in bias_lines(pytorch))


def test_shipped_flash_parameters_are_the_least_squares_optimum() -> None:
    """A Gauss-Newton step from the shipped values finds nothing better (the full fit
    from generic starts, `python -m simulator.calibration.flash`, takes ≈ 4 min)."""
    data = yaml.safe_load((HWCONFIGS / "gpu_a100.yaml").read_text())
    shipped = data["scheduling"]["flash"]
    start = [float(shipped["efficiency"]), float(shipped["softmax_overlap"]),
             float(shipped["block_overhead"].split()[0])]
    stepped = list(flash.calibrate(start=start, iterations=1).values())
    cases = flash.fitted_cases()
    assert stepped == pytest.approx(start, rel=0.05)
    assert rms_error(cases, flash.PARAMETERS, start) <= rms_error(
        cases, flash.PARAMETERS, stepped) + 1e-3


def test_13b_case_memory_within_20_percent_and_open_latency_pinned() -> None:
    outcomes = {o.case.id: o for o in run_cases(load_cases(CASES["mmfree_gpu.yaml"]))}
    for case in ("13b-memory-ratio", "13b-mmfree-memory", "13b-transformerpp-memory",
                 "13b-transformerpp-latency"):
        assert abs(outcomes[case].error) <= 0.20, case
    # a known miss, reported as such; a change that closes it must promote these cases
    assert {i for i, o in outcomes.items() if o.case.role == "open"} == {
        "13b-mmfree-latency", "13b-latency-ratio"}


def test_gemm_rises_with_size_and_saturates_below_peak() -> None:
    small, large = (run_op(A100, gemm_op(s, s, s)).tflops for s in (256, 16384))
    peak = peak_tflops(A100)
    assert small < 0.05 * peak
    assert 0.75 * peak < large < 0.95 * peak


def test_wave_quantisation_costs_a_partial_wave() -> None:
    # 108 SMs: 108 tiles of 128 × 128 fill one wave; 109 need a second wave
    one_tile = load_hardware("gpu_a100.yaml", {"cores.units.tensor.tiles": [[128, 128, 32]]})
    full = run_op(one_tile, gemm_op(128 * 12, 128 * 9, 8192))
    over = run_op(one_tile, gemm_op(128 * 12 + 1, 128 * 9, 8192))
    assert over.latency_s > 1.08 * full.latency_s
    unit = one_tile.cores.units["tensor"]
    exact = plan_gemm(one_tile, unit, 2048, 128 * 12, 128 * 9, 8192, 1, (2, 2, 2))
    ragged = plan_gemm(one_tile, unit, 2048, 128 * 12 + 1, 128 * 9, 8192, 1, (2, 2, 2))
    assert exact.tiles == 108 and exact.split_k == 1
    assert ragged.split_k > 1  # a second, nearly empty wave is worse than splitting K
    # with the whole tile menu the planner dodges most of it, as library heuristics do
    full = run_op(A100, gemm_op(128 * 12, 128 * 9, 8192))
    over = run_op(A100, gemm_op(128 * 12 + 1, 128 * 9, 8192))
    assert full.tflops * 0.7 < over.tflops < full.tflops * 0.95


def test_decode_gemv_runs_near_hbm_bandwidth() -> None:
    hbm = A100.memory.dram.bandwidth_per_channel
    for m in (1, 8, 16):
        result = run_op(A100, gemm_op(m, 8192, 8192))
        assert result.bytes_moved >= 8192 * 8192 * 2
        assert result.bytes_moved / result.latency_s > 0.7 * hbm


def test_fused_attention_moves_linear_bytes_unfused_quadratic() -> None:
    unfused_hw = load_hardware("gpu_a100.yaml", {"scheduling.fused_attention": False})
    fused = [run_op(A100, attention_op(1, 16, s, 128)).bytes_moved for s in (2048, 8192)]
    unfused = [run_op(unfused_hw, attention_op(1, 16, s, 128)).bytes_moved for s in (2048, 8192)]
    assert fused[1] / fused[0] == pytest.approx(4, rel=0.1)
    assert unfused[1] / unfused[0] > 10


def test_op_command_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["op", "gemm", "--hw", "gpu_a100.yaml", "--m", "4096", "--n", "4096", "--k",
                 "4096", "--dtype", "bf16", "--format", "json"]) == 0
    gemm = json.loads(capsys.readouterr().out)
    assert {"latency_s", "flops", "bytes_moved", "tflops"} <= set(gemm)
    assert gemm["flops"] == 2 * 4096**3
    assert gemm["tflops"] == pytest.approx(gemm["flops"] / gemm["latency_s"] / 1e12)
    runs = {}
    for mode in ("fwd", "bwd", "fwd_bwd", "--backward"):
        flag = ["--backward"] if mode == "--backward" else ["--mode", mode]
        assert main(["op", "attention", "--hw", "gpu_a100.yaml", "--batch", "4", "--heads", "16",
                     "--seq", "4096", "--head-dim", "128", "--causal", *flag,
                     "--format", "json"]) == 0
        runs[mode] = json.loads(capsys.readouterr().out)
    forward = 4 * 4 * 4096**2 * 16 * 128 / 2  # 4·B·S²·H·D, halved causal (FA-2's script)
    for mode, factor in (("fwd", 1.0), ("bwd", 2.5), ("fwd_bwd", 3.5), ("--backward", 3.5)):
        assert runs[mode]["flops"] == factor * forward
        assert runs[mode]["flops"] == attention_flops(4, 16, 4096, 128, True,
                                                      "fwd_bwd" if mode == "--backward" else mode)
    both = runs["fwd_bwd"]
    assert both["latency_s"] == pytest.approx(runs["fwd"]["latency_s"] + runs["bwd"]["latency_s"])
    assert both == runs["--backward"] and both["shape"]["mode"] == "fwd_bwd"
    assert both["tflops"] == pytest.approx(3.5 * forward / both["latency_s"] / 1e12)
    assert main(["op", "attention", "--hw", "gpu_a100.yaml", "--batch", "1", "--heads", "1",
                 "--seq", "8", "--head-dim", "8", "--backward", "--mode", "fwd"]) == 2
    assert main(["op", "gemm", "--hw", "gpu_a100.yaml", "--m", "0", "--n", "1", "--k",
                 "1"]) == 2
    assert main(["op", "gemm", "--hw", "gpu_a100.yaml", "--m", "8", "--n", "8", "--k", "8",
                 "--dtype", "fp7"]) == 2


def test_llama2_7b_on_a100_from_first_principles(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--hw", "gpu_a100.yaml", "--model", "llama2-7b", "--format", "json"]) == 0
    decode = json.loads(capsys.readouterr().out)
    hbm = A100.memory.dram.bandwidth_per_channel
    floor = (decode["weights_bytes"] + decode["state_bytes"]) / hbm  # read once per token
    assert floor < decode["latency_s"] < 2 * floor
    assert main(["--hw", "gpu_a100.yaml", "--model", "llama2-7b", "--phase", "prefill",
                 "--prompt", "2048", "--format", "json"]) == 0
    prefill = json.loads(capsys.readouterr().out)
    flops = 2 * 6.74e9 * 2048  # ≈ 2 × parameters × tokens
    assert flops / 312e12 < prefill["latency_s"] < 2 * flops / 312e12


def test_a_gpu_without_l2_reads_tiles_from_dram() -> None:
    no_l2 = load_hardware("gpu_a100.yaml", {"memory.l2": None})
    with_l2 = run_op(A100, gemm_op(2048, 2048, 2048))
    without = run_op(no_l2, gemm_op(2048, 2048, 2048))
    assert without.bytes_moved > 2 * with_l2.bytes_moved  # re-reads reach DRAM
    assert without.latency_s >= with_l2.latency_s
