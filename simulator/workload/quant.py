"""Quantization schemes applied to a captured trace: `--quant SCHEME`.

A scheme rewrites the linears inside the model's repeated blocks (matmuls with weights
whose module is nested in a block; the LM head and embeddings stay in the model's dtype,
as the papers keep them): their activation and weight dtypes, their weight bytes (with
scales), and the kernels the scheme adds in front of them, one per distinct linear input
(q/k/v share one, gate/up share one):

- w8a8: int8 × int8 GEMM; per-channel fp16 weight scales; a per-token quantize kernel
  (unfused) before each linear input; KV in the model's dtype.
- w8a16: model dtype × int8 weight-only (gpt-fast/torchao int8); per-channel scales.
- w4a16: model dtype × int4 (dequantized in registers, Marlin-style); groups of 128
  weights (w4a16:g32 for 32, also w4a8) with an fp16 scale and zero; no added kernel.
- w4a8: int8 × int4; groups of 128; a per-token quantize kernel.
- w4a4: int4 × int4; per-channel scales; a per-token quantize kernel; int4 KV cache.
- w4a4-quarot: as w4a4, plus QuaRot's online Hadamard transforms as separate kernels:
  before o_proj and down_proj, and on the new q/k heads.
- w4a4-flatquant: as w4a4, with FlatQuant's Kronecker transform P1 ⊗ P2 (two small
  matmuls per token, §3) in front of each linear input, fused with the quantize where a
  factor is ≤ 64 (4096 = 64 × 64; 11008 = 86 × 128 runs as two kernels), and a
  head_dim × head_dim matmul on the new q/k.
- fp8: fp8 × fp8; a per-tensor weight scale; a per-token quantize kernel.
- w2a8: int8 × int2 (BitNet-style); a per-tensor weight scale; a per-token quantize kernel.

w4a4's KV cache is 4-bit as in the QuaRot and FlatQuant code the papers time (per token
and head, an fp16 scale and zero, computed by a quantize-and-pack kernel on the new keys
and values before the cache write; a prefill still attends over its fresh fp16 K/V, as
there), and its int4 GEMM (QuaRot's CUTLASS kernel) runs one 128 × 256 × 128 tile without
split-K at every shape (a decode step pads its rows to 128) and writes int32 for a
separate dequantize kernel, as there. The other quantized GEMMs dequantize in their
epilogue, so their outputs stay in the model's dtype. Whether a machine runs a pair is the
machine's question (`cores.units.*.kernels`); an fp8 scheme on a GPU without fp8 tensor
cores is refused there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from simulator.errors import UserError
from simulator.tiling import DTYPE_BYTES
from simulator.workload.trace import Op, Trace

#: Bytes of one per-token (or per-group) scale.
SCALE_BYTES = 4
#: Bytes of an int32 GEMM output element.
INT32_BYTES = 4
#: Activations per group of a group-quantized weight (GPTQ/AWQ/Marlin default).
GROUP = 128
#: Largest Kronecker factor FlatQuant's kernel fuses with the quantize (its BLOCK_SIZE_M);
#: a larger one runs the transform and the quantize as two kernels.
FUSED_FACTOR = 64


@dataclass(frozen=True)
class Scheme:
    """What a quantization scheme does to each linear of a block."""

    act: str | None  # None: the model's dtype
    weight: str
    group: int | None  # weights per scale+zero group (None: one scale per output channel)
    quantize: bool  # a per-token activation quantize kernel before each linear input
    kv: str | None = None  # KV-cache dtype (None: the model's)
    transform: str | None = None  # "hadamard" (separate kernels) or "kronecker" (fused)
    #: the GEMM writes int32 and a separate kernel dequantizes (QuaRot's int4 GEMM);
    #: false: dequantized in the GEMM's epilogue
    dequantize: bool = False
    #: the one thread-block tile (tm, tn, tk) the scheme's GEMM kernel is compiled for, run
    #: without split-K; None: a tuned library picks per shape
    tile: tuple[int, int, int] | None = None


#: QuaRot's int4 GEMM (spcl/QuaRot quarot/kernels/gemm.cu, which FlatQuant builds too):
#: cutlass::gemm::device::Gemm<int4b_t, RowMajor, int4b_t, ColumnMajor, int32_t, RowMajor,
#: int32_t, OpClassTensorOp, Sm80> with CUTLASS's default configuration for it
#: (default_gemm_configuration.h): threadblock 128 × 256 × 128, 3 stages, no split-K, at
#: every shape (a decode step pads M = batch to 128 rows).
QUAROT_TILE = (128, 256, 128)


SCHEMES: dict[str, Scheme] = {
    "w8a8": Scheme("int8", "int8", None, True),
    "w8a16": Scheme(None, "int8", None, False),
    "w4a16": Scheme(None, "int4", GROUP, False),
    "w4a8": Scheme("int8", "int4", GROUP, True),
    "w4a4": Scheme("int4", "int4", None, True, kv="int4", dequantize=True,
                   tile=QUAROT_TILE),
    "w4a4-quarot": Scheme("int4", "int4", None, True, kv="int4", transform="hadamard",
                          dequantize=True, tile=QUAROT_TILE),
    "w4a4-flatquant": Scheme("int4", "int4", None, True, kv="int4", transform="kronecker",
                             dequantize=True, tile=QUAROT_TILE),
    "fp8": Scheme("fp8", "fp8", 0, True),
    "w2a8": Scheme("int8", "int2", 0, True),
}


def scheme(name: str) -> Scheme:
    """The scheme called `name` (a group-quantized one may name its group size:
    `w4a16:g32`); an unknown one is refused naming the flag."""
    base, _, group = name.partition(":")
    if base not in SCHEMES:
        raise UserError("--quant", f"expected one of {', '.join(SCHEMES)} (a grouped one "
                                   f"with :gN, e.g. w4a16:g32), not '{name}'")
    chosen = SCHEMES[base]
    if not group:
        return chosen
    size = group[1:]
    if not (chosen.group and group.startswith("g") and size.isdigit() and int(size) >= 1):
        expected = ("a group size like :g32" if chosen.group else
                    f"no group size ({base} has one scale per channel or tensor)")
        raise UserError("--quant", f"expected {expected}, not '{name}'")
    return replace(chosen, group=int(size))


def kronecker_factors(n: int) -> tuple[int, int]:
    """n = n1 · n2, the factor pair nearest √n (FlatQuant's get_decompose_dim: 4096 =
    64 × 64, 11008 = 86 × 128)."""
    n1 = math.isqrt(n)
    while n % n1:
        n1 -= 1
    return n1, n // n1


def _weight_bytes(op: Op, chosen: Scheme) -> int:
    """A quantized linear's stored weights and their scales (and zeros), in bytes."""
    d = op.dims
    count = d["k"] * d["n"] * d["batch"]
    stored = count * DTYPE_BYTES[chosen.weight]
    if chosen.group is None:  # per output channel
        scales = d["n"] * d["batch"] * 2
    elif chosen.group == 0:  # per tensor
        scales = SCALE_BYTES
    else:  # an fp16 scale and zero per group
        scales = math.ceil(count / chosen.group) * 4
    return math.ceil(stored + scales)


def in_block(op: Op) -> bool:
    """A linear with weights inside one of the model's repeated blocks."""
    return (op.kind == "matmul" and op.weight_bytes > 0 and op.layer != op.module
            and op.module.startswith(op.layer + "."))


def _act_bytes(op: Op, act: str) -> int:
    d = op.dims
    rows = d["m"] * d["batch"]
    return math.ceil(rows * d["k"] * DTYPE_BYTES[act] + rows * SCALE_BYTES)


def _added(op: Op, chosen: Scheme, act: str, model_dtype: str, what: str) -> list[Op]:
    """The kernels a scheme runs on one linear input (`op` is its first consumer)."""
    d = op.dims
    rows, width = d["m"] * d["batch"], d["k"]
    numel = rows * width
    elem = DTYPE_BYTES.get(model_dtype, 2)
    out = _act_bytes(op, act)
    base = {"module": f"{op.module}.{what}", "layer": op.layer, "dtype": model_dtype,
            "weight_bytes": 0, "state_read_bytes": 0, "state_write_bytes": 0,
            "index": 0, "deps": op.deps}
    added = []
    if chosen.transform == "hadamard" and what in ("o_input", "down_input"):
        added.append(Op(name="hadamard", fn="hadamard", kind="elementwise", ops=numel * max(
            1, round(math.log2(width))), input_bytes=int(numel * elem),
            output_bytes=int(numel * elem), dims={"numel": numel, "rows": rows,
                                                  "parallel": numel},
            shapes=f"[{rows},{width}] Hadamard", **base))
    if chosen.transform == "kronecker":
        n1, n2 = kronecker_factors(width)
        # X (n1 × n2 per token) → P1ᵀ · X · P2: a batched GEMM over tokens whose FLOPs
        # (2·n·(n1 + n2) per token) and bytes are the kernel's, fused with the quantize
        # where the factor fits FlatQuant's block, else writing fp16 for a quantize kernel
        fused = n1 <= FUSED_FACTOR
        added.append(Op(name="kronecker_quantize" if fused else "kronecker",
                        fn="kronecker", kind="matmul", ops=2 * numel * (n1 + n2),
                        input_bytes=int(numel * elem),
                        output_bytes=out if fused else int(numel * elem),
                        dims={"m": n1, "n": 2 * n2, "k": n2, "batch": rows,
                              "parallel": rows * n1},
                        shapes=f"[{rows},{n1}x{n2}] P1⊗P2" + (f" → {act}" if fused else ""),
                        **{**base, "weight_bytes": (n1 * n1 + n2 * n2) * int(elem)}))
        if fused:
            return added
    if chosen.quantize:
        added.append(Op(name="quantize", fn="quantize", kind="elementwise", ops=3 * numel,
                        input_bytes=int(numel * elem), output_bytes=out,
                        dims={"numel": numel, "rows": rows, "parallel": numel},
                        shapes=f"[{rows},{width}] → {act} per token", **base))
    return added


def _kv_factor(trace: Trace, chosen: Scheme, model_dtype: str) -> float:
    """KV-cache bytes after the scheme over before: the stored dtype plus an fp16 scale and
    zero per token and head (1 where the scheme keeps the cache)."""
    if not chosen.kv:
        return 1.0
    head_dim = next((op.dims["head_dim"] for op in trace.ops if op.kind == "attention"), 128)
    stored = DTYPE_BYTES[chosen.kv] + 2 * 2 / head_dim
    return stored / DTYPE_BYTES.get(model_dtype, 2)


def _dequantize(gemm: Op, model_dtype: str) -> Op:
    """The kernel after an int32-output GEMM: row scale × column scale × x, to the model's
    dtype."""
    d = gemm.dims
    numel = d["m"] * d["n"] * d["batch"]
    elem = int(DTYPE_BYTES.get(model_dtype, 2))
    return Op(index=0, name="dequantize", fn="dequantize", kind="elementwise",
              module=f"{gemm.module}.dequantize", layer=gemm.layer, dtype=model_dtype,
              ops=2 * numel, weight_bytes=0, state_read_bytes=0, state_write_bytes=0,
              input_bytes=numel * INT32_BYTES, output_bytes=numel * elem,
              dims={"numel": numel, "rows": d["m"] * d["batch"], "parallel": numel}, deps=(),
              shapes=f"[{d['m'] * d['batch']},{d['n']}] int32 → {model_dtype}")


#: Element ops of an asymmetric per-(token, head) KV quantize and pack (QuaRot's and
#: FlatQuant's asym_quantize_and_pack_i4): max, min, range, scale, zero, add, divide,
#: round, clamp, convert, shift, or, and the pairing of two nibbles.
KV_QUANTIZE_OPS = 13


def _kv_quantize(write: Op, packed: int) -> Op:
    """The kernel that quantizes the new keys (or values) before they enter a quantized
    cache: reads them in the model's dtype, writes the packed codes with their fp16 scale
    and zero (`packed` bytes), which the cache write then stores."""
    numel = write.dims["numel"]
    return Op(index=0, name="kv_quantize", fn="quantize", kind="elementwise",
              module=f"{write.module}.kv_quantize", layer=write.layer, dtype=write.dtype,
              ops=KV_QUANTIZE_OPS * numel, weight_bytes=0, state_read_bytes=0,
              state_write_bytes=0, input_bytes=write.state_write_bytes, output_bytes=packed,
              dims={"numel": numel, "rows": write.dims.get("rows", 1), "parallel": numel},
              deps=(), shapes=f"{write.shapes.split(' ')[0]} → packed int4 + scale, zero")


def _qk_transforms(attention: Op, chosen: Scheme, model_dtype: str) -> list[Op]:
    """The online transforms on the new queries and keys before a quantized KV cache:
    QuaRot's Hadamard per head, FlatQuant's head_dim × head_dim matmul (V untouched)."""
    d = attention.dims
    hd, elem = d["head_dim"], int(DTYPE_BYTES.get(model_dtype, 2))
    added = []
    for what, heads in (("q", d["heads"]), ("k", d["kv_heads"])):
        rows = d["batch"] * d["q_len"] * heads
        numel = rows * hd
        base = {"index": 0, "module": f"{attention.module}.{what}_transform",
                "layer": attention.layer, "dtype": model_dtype, "state_read_bytes": 0,
                "state_write_bytes": 0, "input_bytes": numel * elem,
                "output_bytes": numel * elem, "deps": ()}
        if chosen.transform == "hadamard":
            added.append(Op(name="hadamard", fn="hadamard", kind="elementwise",
                            ops=numel * max(1, round(math.log2(hd))), weight_bytes=0,
                            dims={"numel": numel, "rows": rows, "parallel": numel},
                            shapes=f"[{rows},{hd}] Hadamard", **base))
        else:
            added.append(Op(name="transform", fn="mm", kind="matmul", ops=2 * numel * hd,
                            weight_bytes=hd * hd * elem,
                            dims={"m": rows, "n": hd, "k": hd, "batch": 1, "parallel": hd},
                            shapes=f"[{rows},{hd}]x[{hd},{hd}]", **base))
    return added


#: Leaf module names of the projections QuaRot rotates online, by what they consume.
_O_PROJECTIONS = {"o_proj", "out_proj", "dense"}
_DOWN_PROJECTIONS = {"down_proj", "dense_4h_to_h", "fc2", "fc_out", "w2"}


def linear_input(op: Op) -> str:
    """What a linear consumes: the attention output (o_input), the MLP's hidden activations
    (down_input), or a block input (input)."""
    path = op.module.split(".")
    leaf = path[-1]
    if leaf in _DOWN_PROJECTIONS or (leaf == "c_proj" and "mlp" in path):
        return "down_input"
    if leaf in _O_PROJECTIONS or leaf == "c_proj":
        return "o_input"
    return "input"


def quantize(trace: Trace, name: str) -> Trace:
    """`trace` with scheme `name` applied (see the module notes)."""
    chosen = scheme(name)
    linears = [op for op in trace.ops if in_block(op)]
    if any(op.kind == "ternary_matmul" for op in trace.ops):
        raise UserError("--quant", f"{trace.model} is already ternary (W2A8 BitLinear); "
                                   "expected a model with floating-point linears")
    if not linears:
        raise UserError("--quant", f"{trace.model} has no linear layers inside repeated "
                                   "blocks to quantize")
    model_dtype = linears[0].dtype
    act = chosen.act or model_dtype
    kv_factor = _kv_factor(trace, chosen, model_dtype)
    ops: list[Op] = []
    moved: dict[int, int] = {}  # old index → new index
    quantized_inputs: dict[tuple[object, ...], int] = {}  # (layer, deps) → its kernel
    weights = trace.weights_bytes
    state = trace.state_bytes

    def emit(op: Op, deps: tuple[int, ...]) -> int:
        ops.append(replace(op, index=len(ops), deps=deps))
        return len(ops) - 1

    for op in trace.ops:
        deps = tuple(moved[d] for d in op.deps)
        if chosen.transform and op.kind == "attention":
            deps = tuple(emit(extra, deps) for extra in _qk_transforms(op, chosen, model_dtype)) \
                or deps
        if in_block(op):
            key = (op.layer, *deps)
            if key not in quantized_inputs:
                last = None
                for extra in _added(op, chosen, act, model_dtype, linear_input(op)):
                    last = emit(extra, deps if last is None else (last,))
                quantized_inputs[key] = last if last is not None else -1
            producer = quantized_inputs[key]
            new_weights = _weight_bytes(op, chosen)
            weights += new_weights - op.weight_bytes
            label = act if chosen.weight == act else f"{act}x{chosen.weight}"
            rewritten = replace(
                op, dtype=act, weight_dtype="" if chosen.weight == act else chosen.weight,
                weight_bytes=new_weights,
                input_bytes=_act_bytes(op, act) if chosen.quantize else op.input_bytes,
                output_bytes=(op.output_bytes * INT32_BYTES // int(DTYPE_BYTES.get(
                    model_dtype, 2)) if chosen.dequantize else op.output_bytes),
                dims={**op.dims, **_tile_dims(chosen)}, shapes=f"{op.shapes} [{label}]")
            moved[op.index] = emit(rewritten, (producer,) if producer >= 0 else deps)
            if chosen.dequantize:
                moved[op.index] = emit(_dequantize(rewritten, model_dtype), (moved[op.index],))
            continue
        if chosen.kv and op.kind == "attention" and op.dims["q_len"] < op.dims["kv_len"]:
            # decode reads the quantized cache; a prefill attends over its fresh fp16 K/V
            op = replace(op, state_read_bytes=math.ceil(op.state_read_bytes * kv_factor),
                         dims={**op.dims, "kv_bits": round(
                             kv_factor * DTYPE_BYTES.get(model_dtype, 2) * 8)})
        elif chosen.kv and op.state_write_bytes and op.kind == "memory":
            packed = math.ceil(op.state_write_bytes * kv_factor)
            deps = (emit(_kv_quantize(op, packed), deps),)
            op = replace(op, state_write_bytes=packed, input_bytes=packed)
        moved[op.index] = emit(op, deps)
    if chosen.kv:
        state = math.ceil(state * kv_factor)
    return replace(trace, model=f"{trace.model} [{name}]", ops=tuple(ops),
                   weights_bytes=_all_weights(trace, linears, weights), state_bytes=state)


def _tile_dims(chosen: Scheme) -> dict[str, int]:
    """The dims that pin a matmul to its kernel's one tile (none: the library picks)."""
    if chosen.tile is None:
        return {}
    return dict(zip(("tile_m", "tile_n", "tile_k"), chosen.tile, strict=True))


def _all_weights(trace: Trace, linears: list[Op], traced: int) -> int:
    """The model's weight bytes after quantization. A step touches only some experts of an
    MoE model, so the untouched ones (the trace's weights no op reads) shrink by the ratio
    of the touched linears."""
    read = sum(op.weight_bytes for op in trace.ops)
    untouched = max(0, trace.weights_bytes - read)
    before = sum(op.weight_bytes for op in linears)
    after = before + traced - trace.weights_bytes  # what the linears weigh now
    return math.ceil(traced + untouched * (after / before - 1)) if before else traced
