"""Single kernels on a machine: `simulate op gemm` and `simulate op attention`.

A kernel is wrapped as a one-op trace and run through the same mapping and engine as a
model, so its time comes out of the event simulation too. FLOPs follow the usual
conventions: 2·M·N·K for a GEMM; for attention exactly those of FlashAttention-2's
benchmark script (Dao-AILab/flash-attention `benchmarks/benchmark_flash_attention.py`,
function `flops`): forward 4·B·S²·H·D, halved when causal; backward 2.5 × forward;
forward+backward 3.5 × forward, timed as the forward plus the backward kernels
(`time_f + time_b` in that script).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from simulator.engine import simulate_tasks
from simulator.errors import UserError
from simulator.hardware import Hardware
from simulator.mapping import map_trace
from simulator.tiling import DTYPE_BYTES
from simulator.workload.trace import Op, Trace

MAX_DIM = 1 << 24
#: What an attention run times: the forward kernel, the backward kernels, or both.
Mode = Literal["fwd", "bwd", "fwd_bwd"]
MODES: tuple[Mode, ...] = get_args(Mode)
#: FLOPs of each mode as multiples of the forward's (the FA-2 benchmark script's `flops`).
MODE_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


@dataclass(frozen=True)
class KernelResult:
    hardware: str
    kernel: str
    latency_s: float
    flops: float
    bytes_moved: float
    tflops: float
    shape: dict[str, int | str]

    def to_dict(self) -> dict[str, object]:
        return {"hardware": self.hardware, "kernel": self.kernel, "latency_s": self.latency_s,
                "flops": self.flops, "bytes_moved": self.bytes_moved, "tflops": self.tflops,
                "shape": self.shape}


def _check(**dims: int) -> None:
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_DIM:
            raise UserError(f"--{name.replace('_', '-')}",
                            f"expected a whole number from 1 to {MAX_DIM}, not {value!r}")


def _dtype(dtype: str) -> float:
    if dtype not in DTYPE_BYTES:
        raise UserError("--dtype", f"expected one of {', '.join(DTYPE_BYTES)}, not '{dtype}'")
    return DTYPE_BYTES[dtype]


#: The output dtype of a GEMM by activation dtype: integer kernels dequantize to fp16.
OUTPUT_DTYPES = {"int8": "fp16", "int4": "fp16", "fp8": "bf16"}


def gemm_op(m: int, n: int, k: int, dtype: str = "bf16", batch: int = 1,
            weight_dtype: str = "") -> Op:
    """C (M×N) = A (M×K) · B (K×N), B held like a weight in `weight_dtype` (default: the
    activations' `dtype`); the output is in the activation type, fp16 after an integer
    GEMM (its scales applied in the epilogue) and bf16 after an fp8 one."""
    _check(m=m, n=n, k=k, batch=batch)
    elem = _dtype(dtype)
    weight = weight_dtype or dtype
    if weight not in DTYPE_BYTES:
        raise UserError("--weight-dtype",
                        f"expected one of {', '.join(DTYPE_BYTES)}, not '{weight}'")
    out = DTYPE_BYTES[OUTPUT_DTYPES.get(dtype, dtype)]
    label = dtype if weight == dtype else f"{dtype}x{weight}"
    return Op(index=0, name="gemm", fn="mm", kind="matmul", module="gemm", layer="gemm",
              dtype=dtype, ops=2 * batch * m * n * k,
              weight_bytes=math.ceil(batch * k * n * DTYPE_BYTES[weight]),
              state_read_bytes=0, state_write_bytes=0, input_bytes=math.ceil(batch * m * k * elem),
              output_bytes=int(batch * m * n * out),
              dims={"m": m, "n": n, "k": k, "batch": batch, "parallel": batch * n}, deps=(),
              shapes=f"[{m},{k}]x[{k},{n}]{label}",
              weight_dtype="" if weight == dtype else weight)


#: STREAM kernels (te42kyfo/gpu-benches cuda-stream): 8-byte loads and stores per element.
STREAMS = {"init": (0, 1), "read": (1, 0), "scale": (1, 1), "triad": (2, 1)}


def run_stream(hw: Hardware, stream: str, threads: int, elements: int) -> KernelResult:
    """One STREAM kernel over `elements` doubles with `threads` resident threads per core,
    each keeping its 8-byte access per array in flight: the machine's streaming in-flight
    bytes become threads × 8 B × arrays. `bytes_moved` counts what the benchmark counts:
    8 B per element per array touched."""
    if stream not in STREAMS:
        raise UserError("stream", f"expected one of {', '.join(STREAMS)}, not '{stream}'")
    _check(threads=threads)
    if not 1 <= elements <= 1 << 40:
        raise UserError("elements", f"expected a whole number from 1 to 2^40, not {elements}")
    loads, stores = STREAMS[stream]
    in_flight = threads * 8 * (loads + stores)
    machine = hw.model_copy(update={"cores": hw.cores.model_copy(
        update={"stream_in_flight": float(in_flight)})})
    op = Op(index=0, name="stream", fn=stream, kind="memory", module="stream", layer="stream",
            dtype="fp32", ops=elements, weight_bytes=0, state_read_bytes=0, state_write_bytes=0,
            input_bytes=8 * loads * elements, output_bytes=8 * stores * elements,
            dims={"numel": elements, "parallel": elements}, deps=(), shapes=f"[{elements}]f64")
    result = run_op(machine, op)
    moved = 8 * (loads + stores) * elements
    return KernelResult(hardware=hw.name, kernel=f"stream-{stream}", latency_s=result.latency_s,
                        flops=0.0, bytes_moved=moved, tflops=0.0,
                        shape={"threads": threads, "elements": elements, "stream": stream})


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool,
                    mode: Mode = "fwd") -> float:
    """FlashAttention-2's convention: 4·B·S²·H·D (÷2 causal) × 1, 2.5 or 3.5 by `mode`."""
    if mode not in MODE_FLOPS:
        raise UserError("--mode", f"expected one of {', '.join(MODES)}, not '{mode}'")
    forward = 4 * seq * seq * head_dim * heads * batch / (2 if causal else 1)
    return MODE_FLOPS[mode] * forward


def attention_op(batch: int, heads: int, seq: int, head_dim: int, causal: bool = False,
                 backward: bool = False, dtype: str = "bf16") -> Op:
    _check(batch=batch, heads=heads, seq=seq, head_dim=head_dim)
    elem = _dtype(dtype)
    tensor = int(batch * heads * seq * head_dim * elem)
    pairs = seq * (seq + 1) // 2 if causal else seq * seq
    dims = {"batch": batch, "heads": heads, "kv_heads": heads, "q_len": seq, "kv_len": seq,
            "head_dim": head_dim, "causal": int(causal), "pairs": pairs,
            "parallel": batch * heads, "backward": int(backward)}
    return Op(index=0, name="attention", fn="attention", kind="attention", module="attention",
              layer="attention", dtype=dtype,
              ops=int(4 * batch * heads * head_dim * pairs * (2.5 if backward else 1)),
              weight_bytes=0, state_read_bytes=0, state_write_bytes=0,
              input_bytes=(5 if backward else 3) * tensor,
              output_bytes=(3 if backward else 1) * tensor, dims=dims, deps=(),
              shapes=f"B{batch} H{heads} S{seq} D{head_dim}")


def run_attention(hw: Hardware, batch: int, heads: int, seq: int, head_dim: int,
                  causal: bool = False, mode: Mode = "fwd", dtype: str = "bf16") -> KernelResult:
    """Time attention in `mode`; fwd_bwd is the forward and the backward run one after the
    other (latency and bytes added), with 3.5 × the forward's FLOPs."""
    flops = attention_flops(batch, heads, seq, head_dim, causal, mode)
    shape = (batch, heads, seq, head_dim, causal)
    runs = [run_op(hw, attention_op(*shape, backward, dtype))
            for backward in ((False, True) if mode == "fwd_bwd" else (mode == "bwd",))]
    latency = sum(run.latency_s for run in runs)
    shape_dims = {k: v for k, v in runs[0].shape.items() if k != "backward"}
    return KernelResult(hardware=hw.name, kernel="attention", latency_s=latency, flops=flops,
                        bytes_moved=sum(run.bytes_moved for run in runs),
                        tflops=flops / latency * 1e-12 if latency else 0.0,
                        shape={**shape_dims, "mode": mode})


def run_op(hw: Hardware, op: Op, flops: float | None = None) -> KernelResult:
    """Simulate one kernel on `hw`."""
    trace = Trace(model=op.name, model_key="", phase="prefill", batch=1, context=0, prompt=1,
                  tokens=1, weights_bytes=op.weight_bytes, state_bytes=0, activation_bytes=0,
                  ops=(op,))
    timeline = simulate_tasks(hw, map_trace(trace, hw))
    latency = timeline.makespan_ns * 1e-9
    work = float(op.ops if flops is None else flops)
    shape = {k: v for k, v in op.dims.items() if k not in ("parallel", "pairs")}
    return KernelResult(hardware=hw.name, kernel=op.name, latency_s=latency, flops=work,
                        bytes_moved=timeline.usage.dram_bytes,
                        tflops=work / latency * 1e-12 if latency else 0.0, shape=shape)
