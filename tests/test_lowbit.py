"""GPU kernel mechanisms (power-limited clock, Little's law, tiles) and low-bit GEMMs and
quantization schemes (issue "GPU kernels that match measured ones")."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from simulator.api import run_trace, simulate
from simulator.cli import main
from simulator.hardware import load_hardware
from simulator.hardware.schema import Hardware
from simulator.mapping import map_trace
from simulator.oprun import gemm_op, run_op, run_stream
from simulator.tiling import plan_gemm
from simulator.validation.cases import load_cases, shipped_case_files
from simulator.workload.cache import get_trace
from simulator.workload.quant import SCHEMES, kronecker_factors, quantize
from simulator.workload.trace import Trace
from workloads.config import resolve_model

ONE_LAYER = {"num_hidden_layers": "1", "torch_dtype": "float16"}


def _latency(hw_name: str, m: int, n: int, k: int, act: str, weight: str = "",
             **hw_set: str) -> float:
    hw = load_hardware(hw_name, {"overheads.launch": "0 s", **hw_set})
    return run_op(hw, gemm_op(m, n, k, act, 1, weight)).latency_s


def test_the_power_limit_slows_busy_gemms_not_gemvs() -> None:
    hw = load_hardware("gpu_a100.yaml")
    assert hw.clock_scale(0.0) == 1.0
    full = hw.clock_scale(1.0)
    assert full == pytest.approx(hw.core_clock / hw.power.sustained_clock)
    boost = {"power.sustained_clock": "1410 MHz"}
    big = _latency("gpu_a100.yaml", 8192, 8192, 8192, "bf16")
    gemv = _latency("gpu_a100.yaml", 1, 8192, 8192, "bf16")
    assert big / _latency("gpu_a100.yaml", 8192, 8192, 8192, "bf16", **boost) > 1.05
    assert gemv / _latency("gpu_a100.yaml", 1, 8192, 8192, "bf16", **boost) < 1.01


def test_stream_bandwidth_follows_littles_law_and_saturates() -> None:
    hw = load_hardware("gpu_a100.yaml")
    rates = [run_stream(hw, "read", threads, 1 << 27) for threads in (64, 128, 256, 2048)]
    bandwidth = [r.bytes_moved / r.latency_s for r in rates]
    # in-flight bound: doubling the threads about doubles the rate at low occupancy
    assert 1.8 < bandwidth[1] / bandwidth[0] < 2.1 and 1.8 < bandwidth[2] / bandwidth[1] < 2.1
    dram = hw.memory.dram
    assert bandwidth[3] <= dram.bandwidth_per_channel * dram.efficiency * 1.001
    # mixing reads and writes costs bus turnarounds: scale saturates below read
    scale = run_stream(hw, "scale", 2048, 1 << 27)
    assert scale.bytes_moved / scale.latency_s < bandwidth[3]


def test_skinny_gemms_use_the_smallest_tile_rows() -> None:
    hw = load_hardware("gpu_a100.yaml")
    unit = hw.cores.units["tensor"]
    for m in (1, 8, 16):
        assert plan_gemm(hw, unit, 2048, m, 28672, 8192, 1, (2, 2, 2)).tm == 16
    assert plan_gemm(hw, unit, 2048, 4096, 4096, 4096, 1, (2, 2, 2)).tm >= 64


def test_low_bit_weights_cut_gemv_time_by_their_bytes() -> None:
    fp16 = _latency("gpu_a100.yaml", 1, 8192, 8192, "fp16")
    w4 = _latency("gpu_a100.yaml", 1, 8192, 8192, "fp16", "int4")
    w2 = _latency("gpu_a100.yaml", 1, 8192, 8192, "int8", "int2")
    assert 2.5 < fp16 / w4 < 4.0 and w2 < w4
    # compute-bound: W4A16 multiplies in fp16, so it is no faster than fp16 at large M
    big16 = _latency("gpu_a100.yaml", 4096, 8192, 8192, "fp16")
    big4 = _latency("gpu_a100.yaml", 4096, 8192, 8192, "fp16", "int4")
    assert 0.9 < big16 / big4 < 1.2


@pytest.mark.parametrize(("args", "flag"), [
    (["--dtype", "int4", "--weight-dtype", "int2"], "--weight-dtype int2"),
    (["--dtype", "fp8"], "--dtype fp8"),
    (["--dtype", "fp16", "--weight-dtype", "int3"], "--weight-dtype"),
])
def test_a_pair_the_machine_cannot_run_is_one_line(args: list[str], flag: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["op", "gemm", "--m", "1", "--n", "64", "--k", "64", "--hw", "gpu_a100.yaml",
                 *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err


def test_fp8_on_an_a100_is_one_line_naming_the_scheme(capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    argv = ["--hw", "gpu_a100.yaml", "--model", "tiny-llama", "--quant", "fp8"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--quant fp8" in err and "fp8" in err
    assert main(["--hw", "gpu_h100.yaml", "--model", "tiny-llama", "--quant", "fp8",
                 "--format", "json"]) == 0


def _trace(phase: str = "decode", batch: int = 1):
    cfg = resolve_model("llama2-7b", ONE_LAYER)
    return get_trace(cfg, phase, batch, 2048 if phase == "decode" else 0,
                     128 if phase == "prefill" else 0)


def test_schemes_rewrite_linears_add_their_kernels_and_bytes() -> None:
    trace = _trace()
    linears = [op for op in trace.ops if op.kind == "matmul" and op.module.startswith("layers.")]
    assert len(linears) == 7
    counts = {}
    for name in SCHEMES:
        quantized = quantize(trace, name)
        added = [op for op in quantized.ops if op.name in ("quantize", "kronecker_quantize",
                                                           "kronecker", "hadamard", "dequantize",
                                                           "transform", "kv_quantize")]
        counts[name] = {n: sum(op.name == n for op in added) for n in {op.name for op in added}}
        assert quantized.weights_bytes < trace.weights_bytes
        deps_ok = all(d < op.index for op in quantized.ops for d in op.deps)
        assert deps_ok and [op.index for op in quantized.ops] == list(range(len(quantized.ops)))
    assert counts["w4a16"] == {} and counts["w8a8"] == {"quantize": 4}
    # the new K and V are quantized and packed before they enter the 4-bit cache
    assert counts["w4a4"] == {"quantize": 4, "dequantize": 7, "kv_quantize": 2}
    assert counts["w4a4-quarot"] == {"quantize": 4, "dequantize": 7, "hadamard": 4,
                                     "kv_quantize": 2}
    # 4096 = 64 × 64 fused; 11008 = 86 × 128 is a transform and a quantize
    assert counts["w4a4-flatquant"] == {"kronecker_quantize": 3, "kronecker": 1, "quantize": 1,
                                        "dequantize": 7, "transform": 2, "kv_quantize": 2}
    assert kronecker_factors(4096) == (64, 64) and kronecker_factors(11008) == (86, 128)
    # w4a16 weights: half a byte plus an fp16 scale and zero per 128; the lm_head untouched
    w4 = quantize(trace, "w4a16")
    q_proj = next(op for op in w4.ops if op.module == "layers.0.attn.q_proj")
    assert q_proj.weight_bytes == 4096 * 4096 // 2 + 4096 * 4096 // 128 * 4
    assert next(op for op in w4.ops if op.module == "lm_head").weight_dtype == ""
    assert quantize(trace, "w4a16:g32").weights_bytes > w4.weights_bytes
    # a 4-bit KV cache: half a byte per element plus an fp16 scale and zero per head vector
    kv = quantize(trace, "w4a4")
    assert kv.state_bytes == pytest.approx(trace.state_bytes * (0.5 + 4 / 128) / 2, rel=1e-6)
    decode_attention = next(op for op in kv.ops if op.kind == "attention")
    assert decode_attention.dims["kv_bits"] == 4
    prefill = quantize(_trace("prefill"), "w4a4")  # attends over its fresh fp16 K/V
    assert "kv_bits" not in next(op for op in prefill.ops if op.kind == "attention").dims


def test_quarot_int4_gemm_runs_its_one_cutlass_tile_at_every_shape() -> None:
    """QuaRot's CUTLASS kernel is compiled for 128 × 256 × 128 without split-K: a decode
    step pads M = batch to 128 rows, so its GEMMs cost what a 128-row tile costs, while a
    tuned library (BitBLAS-style w4a4 through `simulate op`) takes a 16-row tile."""
    hw = load_hardware("gpu_rtx3090.yaml")
    decode = quantize(_trace("decode", 1), "w4a4")
    gemm = next(op for op in decode.ops if op.module == "layers.0.attn.q_proj")
    assert (gemm.dims["tile_m"], gemm.dims["tile_n"], gemm.dims["tile_k"]) == (128, 256, 128)
    task = next(t for t in map_trace(decode, hw) if t.op.module == gemm.module)
    assert (task.schedules[0].tm, task.schedules[0].tn, task.schedules[0].split_k) == (128,
                                                                                       256, 1)
    free = replace(decode, ops=tuple(
        replace(op, dims={k: v for k, v in op.dims.items() if not k.startswith("tile_")})
        for op in decode.ops))
    free_task = next(t for t in map_trace(free, hw) if t.op.module == gemm.module)
    assert free_task.schedules[0].tm == 16
    fixed_s = run_trace_latency(hw, decode, gemm.module)
    assert fixed_s > 1.5 * run_trace_latency(hw, free, gemm.module)
    # the tile is the scheme's kernel, not the machine's: w8a8 still lets the library pick
    w8 = quantize(_trace("decode", 1), "w8a8")
    assert all("tile_m" not in op.dims for op in w8.ops)


def run_trace_latency(hw: Hardware, trace: Trace, module: str) -> float:
    """Simulated seconds of the op of `module` in `trace` on `hw`."""
    _, _, timeline = run_trace(hw, trace)
    index = next(op.index for op in trace.ops if op.module == module)
    return (timeline.op_end_ns[index] - timeline.op_start_ns[index]) * 1e-9


@pytest.mark.parametrize("bad", ["w5", "w4a16:g0", "w8a8:g32", "w4a16:32"])
def test_a_bad_scheme_is_one_line(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--hw", "gpu_a100.yaml", "--model", "tiny-llama", "--quant", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--quant" in err


def test_a_low_bit_pair_on_an_untiled_machine_is_refused(capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    assert main(["op", "gemm", "--m", "1", "--n", "64", "--k", "64", "--hw", "fpga_8core.yaml",
                 "--dtype", "bf16", "--weight-dtype", "int4"]) == 2
    assert main(["--hw", "fpga_8core.yaml", "--model", "tiny-llama", "--quant", "w4a16"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "kernels" in err[0] and err[1].startswith("simulate: error: --quant")


def test_moe_weights_shrink_for_every_expert() -> None:
    kw = {"model_set": {"num_hidden_layers": "1"}}
    dense = simulate("gpu_h100.yaml", "mixtral-8x7b", **kw)
    w4 = simulate("gpu_h100.yaml", "mixtral-8x7b", quant="w4a16", **kw)
    assert w4.weights_bytes / dense.weights_bytes < 0.4  # all 8 experts, not the 2 routed


def test_a_ternary_model_is_not_quantized_again(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--hw", "gpu_a100.yaml", "--model", "tiny", "--quant", "w8a8"]) == 2
    assert "already ternary" in capsys.readouterr().err


def test_quantized_llama_speedups_follow_bytes_in_decode_and_flops_in_prefill() -> None:
    kw = {"model_set": {"num_hidden_layers": "2"}}
    base = simulate("gpu_a100.yaml", "llama2-7b", phase="decode", **kw)
    w4 = simulate("gpu_a100.yaml", "llama2-7b", phase="decode", quant="w4a16", **kw)
    w8 = simulate("gpu_a100.yaml", "llama2-7b", phase="decode", quant="w8a8", **kw)
    assert base.latency_s > w8.latency_s > w4.latency_s
    assert w4.memory_bytes < w8.memory_bytes < base.memory_bytes
    pre = simulate("gpu_a100.yaml", "llama2-7b", phase="prefill", prompt=2048, **kw)
    pre4 = simulate("gpu_a100.yaml", "llama2-7b", phase="prefill", prompt=2048, quant="w4a16",
                    **kw)
    pre8 = simulate("gpu_a100.yaml", "llama2-7b", phase="prefill", prompt=2048, quant="w8a8",
                    **kw)
    assert 0.85 < pre.latency_s / pre4.latency_s < 1.15  # fp16 MMA either way
    assert pre.latency_s / pre8.latency_s > 1.2  # int8 MMA at twice the rate
    assert json.loads(w4.to_json())["model"].endswith("[w4a16]")


def test_quantized_traces_map_on_every_gpu() -> None:
    trace = quantize(_trace("prefill", 2), "w4a4-flatquant")
    for name in ("gpu_a100.yaml", "gpu_a100_pcie.yaml", "gpu_rtx3090.yaml"):
        assert map_trace(trace, load_hardware(name))


def test_gpu_kernel_curves_hold_out_a_third_and_fit_only_given_data() -> None:
    path = next(p for p in shipped_case_files() if p.name == "gpu_kernels.yaml")
    cases = load_cases(path)
    by_curve: dict[str, list[str]] = {}
    for case in cases:
        if case.role in ("fitted", "held-out", "open"):
            curve = case.id.rsplit("-", 1)[0] if case.id.startswith("stream-") else (
                "-".join(case.id.split("-")[:3]))
            by_curve.setdefault(curve, []).append(case.role)
    assert len(by_curve) >= 8
    # a third of each fitted curve's gated points is held out (open points are measurements
    # the notes say are not kernel times: a host floor, an outlier of the log)
    for curve, roles in by_curve.items():
        gated = [role for role in roles if role != "open"]
        if curve.startswith(("stream-read", "stream-scale", "stream-triad", "bitblas")) and (
                "fitted" in gated):
            assert gated.count("held-out") * 3 >= len(gated), (curve, roles)
    assert all("gpu-measurements.md" in case.source or "gpu-benches" in case.source
               or "BitBLAS" in case.source or "ml-engineering" in case.source for case in cases)


def test_the_lowbit_study_writes_its_curves_and_the_measured_points(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from simulator.studies import lowbit

    monkeypatch.setattr(lowbit, "M_VALUES", (1, 64, 4096))
    monkeypatch.setattr(lowbit, "WEIGHTS", ((28672, 8192),))
    monkeypatch.setattr("sys.argv", ["lowbit", "--out", str(tmp_path)])
    lowbit.main()
    rows = (tmp_path / "lowbit.csv").read_text().splitlines()
    assert rows[0] == "hardware,scheme,m,n,k,latency_s,tflops,weight_gbps"
    schemes = {(r.split(",")[0], r.split(",")[1]) for r in rows[1:]}
    assert ("gpu_a100.yaml", "W4A4") in schemes and ("gpu_h100.yaml", "W4A4") not in schemes
    assert (tmp_path / "lowbit_tflops.png").stat().st_size > 10_000
    points = lowbit.measured()
    assert {p["role"] for p in points} >= {"fitted", "held-out"}
    assert all(p["scheme"] in {s[0] for s in lowbit.SCHEMES} for p in points)


def test_the_gpu_calibration_reproduces_the_shipped_values() -> None:
    """`python -m simulator.calibration.gpu` from its generic starts gives what the GPU
    files ship (each value to its 4 written digits)."""
    import yaml

    from simulator.calibration.gpu import calibrate
    from simulator.units import parse

    folder = Path(__file__).resolve().parents[1] / "hwconfigs"
    for name, values in calibrate().items():
        data = yaml.safe_load((folder / f"{name}.yaml").read_text())
        for path, text in values.items():
            node = data
            for key in path.split("."):
                node = node[key]
            shipped, fitted = str(node), text
            if " " in fitted:
                dimension = {"ns": "time", "GB/s": "bandwidth", "MHz": "frequency",
                             "cycle": "cycles"}[fitted.split()[1]]
                assert parse(shipped, dimension) == pytest.approx(parse(fitted, dimension),
                                                                  rel=1e-3), (name, path)
            else:
                assert float(shipped) == pytest.approx(float(fitted), rel=1e-3), (name, path)
