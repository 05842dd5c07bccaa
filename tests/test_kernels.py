"""Functional kernels: bit-exact ternary products by additions only, the full BitLinear,
the decomposition covering every output once, and `simulate check` end to end."""

from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.cli import main
from simulator.decompose import matmul_tiles
from simulator.hardware import load_hardware
from simulator.kernels import ternary
from simulator.kernels.check import run_check
from simulator.kernels.functional import Fault
from simulator.mapping import map_trace
from simulator.workload.cache import get_trace
from workloads.config import resolve_model
from workloads.hgrn_bit import BitLinear
from workloads.ops import pack_ternary

FORBIDDEN = {"multiply", "matmul", "dot", "vdot", "inner", "outer", "einsum", "tensordot",
             "kron", "true_divide", "divide", "power"}


class Traced(np.ndarray):
    """An array that records every numpy function and ufunc applied to it."""

    calls: ClassVar[set[str]] = set()

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        Traced.calls.add(ufunc.__name__)
        plain = [i.view(np.ndarray) if isinstance(i, Traced) else i for i in inputs]
        if "out" in kwargs:
            kwargs["out"] = tuple(o.view(np.ndarray) if isinstance(o, Traced) else o
                                  for o in kwargs["out"])
        result = getattr(ufunc, method)(*plain, **kwargs)
        return result.view(Traced) if isinstance(result, np.ndarray) else result

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        Traced.calls.add(func.__name__)
        result = func(*_plain(args), **_plain(kwargs))
        return result.view(Traced) if isinstance(result, np.ndarray) else result


def _plain(value: Any) -> Any:
    if isinstance(value, Traced):
        return value.view(np.ndarray)
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


shapes = st.tuples(st.integers(1, 9), st.integers(1, 37), st.integers(1, 41))


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_ternary_product_is_bit_exact(shape: tuple[int, int, int], seed: int) -> None:
    m, n, k = shape  # sizes that are not multiples of 4, of a tile or of a core count
    rng = np.random.default_rng(seed)
    weights = rng.integers(-1, 2, (n, k))
    x = rng.integers(-128, 128, (m, k)).astype(np.int8)
    packed = ternary.pack(weights)
    assert packed.shape == (n, -(-k // 4))
    assert np.array_equal(packed, pack_ternary(torch.tensor(weights)).numpy())
    got = ternary.matmul(x, packed, k)
    assert got.dtype == np.int32
    assert np.array_equal(got, x.astype(np.int32) @ weights.T.astype(np.int32))


def test_ternary_product_uses_no_multiplication() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, (3, 21)).astype(np.int8).view(Traced)
    packed = ternary.pack(rng.integers(-1, 2, (5, 21))).view(Traced)
    Traced.calls = set()
    result = ternary.matmul(x, packed, 21)
    assert {"add", "subtract"} <= Traced.calls
    assert not Traced.calls & FORBIDDEN, Traced.calls & FORBIDDEN
    reference = x.view(np.ndarray).astype(np.int32) @ ternary.signs(
        packed.view(np.ndarray), 21)[0].astype(np.int32).T
    assert result.shape == reference.shape


def test_bitlinear_matches_the_reference_module() -> None:
    torch.manual_seed(0)
    layer = BitLinear(37, 11, torch.float32)
    layer.load_float_weight(torch.randn(11, 37))
    with torch.no_grad():
        layer.norm_weight.copy_(1 + 0.1 * torch.randn(37))
        x = torch.randn(4, 37)
        expected = layer(x).numpy()
    got = ternary.bitlinear(x.numpy(), layer.norm_weight.detach().numpy(), layer.packed.numpy(),
                            37, float(layer.weight_scale), layer.eps)
    assert np.allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("hardware", "mapping", "batch", "model"), [
    ("fpga_8core.yaml", "tensor", 1, "tiny"), ("fpga_26core.yaml", "tensor", 1, "tiny"),
    ("fpga_8core.yaml", "batch", 5, "tiny"), ("gpu_a100.yaml", "tensor", 3, "tiny-llama"),
    ("gpu_a100.yaml", "tensor", 1, "tiny")])
def test_tiles_cover_every_output_exactly_once(hardware: str, mapping: str, batch: int,
                                               model: str) -> None:
    hw = load_hardware(hardware)
    trace = get_trace(resolve_model(model), "decode", batch, 4, 0)
    tasks = map_trace(trace, hw, mapping)  # type: ignore[arg-type]
    for op, task in zip(trace.ops, tasks, strict=True):
        if op.kind not in ("matmul", "ternary_matmul"):
            continue
        d = op.dims
        cover = np.zeros((d["m"] * d["batch"], d["n"], d["k"]), dtype=np.int32)
        tiles = matmul_tiles(op, task)
        for tile in tiles:
            cover[slice(*tile.rows), slice(*tile.cols), slice(*tile.depth)] += 1
        assert cover.min() == 1 and cover.max() == 1, op.module
        # the cores that get tiles are the cores the timed parts run on
        assert {t.core for t in tiles} == {c for p in task.stages[0] for c in p.cores}


@pytest.mark.parametrize(("hardware", "mapping", "batch", "model", "phase"), [
    ("fpga_1core.yaml", "tensor", 1, "tiny", "decode"),
    ("fpga_8core.yaml", "tensor", 1, "tiny", "decode"),
    ("fpga_8core.yaml", "batch", 8, "tiny", "decode"),
    ("gpu_a100.yaml", "tensor", 1, "tiny", "decode"),
    ("gpu_a100.yaml", "tensor", 2, "tiny", "prefill"),
    ("gpu_a100.yaml", "tensor", 2, "tiny-llama", "prefill"),
    ("fpga_8core.yaml", "tensor", 1, "tiny-llama", "decode")])
def test_check_passes(hardware: str, mapping: str, batch: int, model: str, phase: str) -> None:
    result = run_check(load_hardware(hardware), resolve_model(model), mapping=mapping,  # type: ignore[arg-type]
                       batch=batch, phase=phase, prompt=24)  # type: ignore[arg-type]
    assert result.passed, [layer for layer in result.layers if not layer.passed]
    kinds = {op.kind for op in result.ops if op.by_kernel}
    assert {"norm", "embedding"} <= kinds
    assert ("ternary_matmul" in kinds) == (model == "tiny")
    assert all(op.max_abs == 0 for op in result.ops if op.kind == "ternary_matmul")


@pytest.mark.parametrize("fault", [Fault("ternary_matmul", "drop_tile", 3),
                                   Fault("ternary_matmul", "misslice", 5),
                                   Fault("ternary_matmul", "misslice", 0)])
def test_a_broken_schedule_fails_the_check(fault: Fault) -> None:
    result = run_check(load_hardware("fpga_8core.yaml"), resolve_model("tiny"), fault=fault)
    assert not result.passed
    assert result.kernel_failures and result.kernel_failures[0].kind == "ternary_matmul"


def test_a_dropped_gemm_tile_fails_on_the_gpu() -> None:
    result = run_check(load_hardware("gpu_a100.yaml"), resolve_model("tiny-llama"),
                       fault=Fault("matmul", "drop_tile", 0))
    assert not result.passed


def test_check_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", "--hw", "fpga_8core.yaml", "--model", "tiny", "--mapping", "batch",
                 "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "lm_head" in out and out.strip().endswith("PASS")
    assert "computed by the PyTorch reference" in out
    assert main(["check", "--hw", "fpga_8core.yaml", "--model", "llama2-7b"]) == 2
    assert "functional check" in capsys.readouterr().err
