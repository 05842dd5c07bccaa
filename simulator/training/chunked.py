"""FPDT's chunked pipeline in a training step (`--chunk N`; Yao et al., arXiv 2408.16978,
DeepSpeed `deepspeed/sequence/fpdt_layer.py`): each sequence cut into u = S / N chunks of
N tokens (the global chunk: after Ulysses' all-to-all a device holds N tokens' share of
the heads), the blocks run chunk by chunk.

What it changes, as the implementation does it:

- attention: one chunk's q, k, v (and in the backward its output, log-sum-exp and output
  gradient, and the fp32 q-gradient accumulator) on the device, the current one and the
  one being prefetched (2/u of the whole); the rest in host memory. The recompute pass
  (the pass that saves for the backward under full checkpointing) copies every chunk's
  q, k, v, output, log-sum-exp and input norm out; the backward, for each k/v chunk, streams
  the later q chunks' q, output, log-sum-exp, output gradient and q-gradient in and the
  q-gradient back (Σ (u − i) / u = (u + 1) / 2 of their whole size), overlapped with the
  attention backward: it waits for the first chunk, and the op after it for the stream;
- the feed-forward keeps only its input; its internals live a chunk at a time (1/u), and
  its backward recomputes them (the input-side GEMMs and activation again);
- the loss computes the logits a chunk at a time (1/u) and recomputes them in the backward;
  the final norm's output goes to host memory and comes back a chunk at a time (those two
  copies, one hidden-state tensor each way, are not timed).

The ops stay whole (one kernel per op, its time that of the whole sequence's share): at the
chunk sizes FPDT runs (≥ 16K tokens a device) a GEMM's efficiency does not depend on M, and
the chunked causal attention does the causal attention's work. Every chunk's all-to-all is
counted as one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from simulator.errors import UserError
from simulator.training.offload import host_copy
from simulator.workload.trace import Op, readers_of
from simulator.workload.training import Buffer, TrainingTrace

#: bytes of the log-sum-exp per token and head (fp32)
_LSE_BYTES = 4


def chunks_of(chunk: int | str | None, seq_len: int, recompute: str, tp: int, pp: int) -> int:
    """How many chunks `--chunk` cuts a sequence into (1: no chunking); refuses what is
    not modelled."""
    if chunk is None:
        return 1
    try:
        tokens = int(chunk)
    except (TypeError, ValueError):
        tokens = 0
    if isinstance(chunk, bool) or tokens < 1:
        raise UserError("--chunk", f"expected a whole number of tokens ≥ 1, not {chunk!r}")
    if seq_len % tokens:
        raise UserError("--chunk", f"expected a divisor of the {seq_len}-token sequence, "
                                   f"not {tokens}")
    if recompute != "full":
        raise UserError("--chunk", f"FPDT's chunks are modelled with full checkpointing; "
                                   f"expected --recompute full, not {recompute}")
    if tp * pp > 1:
        raise UserError("--chunk", f"FPDT runs on Ulysses sequence parallelism (--sp); "
                                   f"expected --tp 1 --pp 1, not --tp {tp} --pp {pp}")
    return seq_len // tokens


def _copy(kind: str, nbytes: int, at: Op, stage: str, what: str) -> Op:
    return host_copy(kind, nbytes, at, stage, f"fpdt_{what}")


def _ancestors(index: int, ops: tuple[Op, ...], within: set[int]) -> set[int]:
    seen, todo = set(), [index]
    while todo:
        for dep in ops[todo.pop()].deps:
            if dep in within and dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _regions(ops: tuple[Op, ...]) -> list[str]:
    """Which part of FPDT's chunked layer each op belongs to, found from the graph (module
    names differ between models): `attention` (q, k, v and what makes them, the attention
    and their backward), `attention_input` (the norm feeding them), `mlp` (the feed-forward's
    input GEMMs, activation and output GEMM, and their backward), `loss` (the logits and
    the loss), `loss_input` (the final norm), or "" (kept whole)."""
    region = [""] * len(ops)
    groups: dict[tuple[str, str], set[int]] = {}
    for op in ops:
        if op.stage in ("fwd", "recompute"):
            groups.setdefault((op.layer, op.stage), set()).add(op.index)
    inside: dict[str, dict[str, str]] = {}  # layer → module → region, for the backward
    for (layer, _), members in groups.items():
        attention = next((i for i in sorted(members) if ops[i].kind == "attention"), None)
        if attention is None:
            continue
        prefix = ops[attention].module
        before = _ancestors(attention, ops, members) | {attention}
        attn = {i for i in before if ops[i].module == prefix
                or ops[i].module.startswith(prefix + ".")}
        modules = inside.setdefault(layer, {})
        for i in attn:
            region[i] = "attention"
            modules[ops[i].module] = "attention"
        for i in attn:
            for dep in ops[i].deps:
                if dep in members and dep not in attn and ops[dep].kind != "memory":
                    region[dep] = "attention_input"
        after = {i for i in members if attention in _ancestors(i, ops, members)}
        ffn = [i for i in sorted(members - before - after) if ops[i].kind == "matmul"] + [
            i for i in sorted(after) if ops[i].kind == "matmul"
            and not ops[i].module.startswith(prefix + ".")]
        ffn_set = set(ffn)
        outputs = [i for i in ffn if _ancestors(i, ops, members) & ffn_set]
        for out in outputs:
            for i in (_ancestors(out, ops, members) - before) | {out}:
                if ops[i].kind == "matmul" and i not in ffn_set:
                    continue  # the attention's output projection
                if i in ffn_set or _ancestors(i, ops, members) & ffn_set:
                    region[i] = "mlp"
                    modules[ops[i].module] = "mlp"
    for op in ops:
        if op.fn in ("d2h", "h2d"):  # checkpoint offload's copies
            region[op.index] = ""
        elif op.stage == "recompute" and not region[op.index]:
            # a recompute stops at the last tensor the backward needs: its feed-forward
            # may lack the output GEMM that the forward's graph finds it by
            region[op.index] = inside.get(op.layer, {}).get(op.module) or ""
        elif op.stage in ("bwd_act", "bwd_weight"):
            region[op.index] = inside.get(op.layer, {}).get(op.module, region[op.index])
            if op.layer == "model":
                region[op.index] = "loss"
        elif op.stage == "fwd" and (op.layer == "model" or op.module == "lm_head"):
            region[op.index] = "loss"
            if op.module == "lm_head":
                for dep in op.deps:
                    region[dep] = "loss_input"
    return region


def fpdt_chunks(training: TrainingTrace, u: int) -> TrainingTrace:
    """`training` (one device's share under Ulysses, full recompute) run in FPDT's `u`
    chunks per sequence."""
    if u == 1:
        return training
    ops = training.trace.ops
    readers = readers_of(ops)
    region = _regions(ops)
    double = min(1.0, 2 / u)

    def internal(index: int, inside: Callable[[str], bool]) -> bool:
        return all(inside(region[r]) for r in readers.get(index, ()))

    def scale(buffer: Buffer) -> float:
        where, op = region[buffer.alloc], ops[buffer.alloc]
        if buffer.category == "gradients":
            return 1.0
        if where == "attention" and internal(buffer.alloc, lambda r: r == "attention"):
            return double
        if where == "attention_input" and op.stage != "bwd_act":
            return double  # offloaded a chunk at a time, read back per chunk
        if where == "mlp" and internal(buffer.alloc, lambda r: r == "mlp"):
            return 1 / u
        if where in ("loss", "loss_input"):
            return 1 / u
        return 1.0

    out: list[Op] = []
    moved: dict[int, int] = {}
    waits: dict[int, list[int]] = {}  # an op → copies it must wait for

    def emit(op: Op, deps: tuple[int, ...]) -> int:
        out.append(op.evolve(index=len(out), deps=deps))
        return len(out) - 1

    def redo(forward: list[Op]) -> int:
        """`forward` run again as a recompute after what is emitted so far; its last op."""
        last, again = len(out) - 1, {}
        for fwd in forward:
            deps = tuple(again.get(d, moved[d]) for d in fwd.deps)
            again[fwd.index] = emit(fwd.evolve(stage="recompute"), (*deps, last))
        return len(out) - 1

    saved = _saved_bytes(ops, region)
    recomputed_mlp: dict[str, list[Op]] = {}
    recomputed_loss = [op for op in ops if region[op.index] == "loss" and op.stage == "fwd"
                       and op.kind != "collective"]
    sent: dict[str, int] = {}
    loss_redone = False
    for op in ops:
        deps = tuple(moved[d] for d in op.deps) + tuple(waits.pop(op.index, ()))
        where = region[op.index]
        if where == "mlp" and op.stage == "recompute":
            recomputed_mlp.setdefault(op.layer, []).append(op)
        if where == "mlp" and op.stage in ("bwd_act", "bwd_weight") and op.layer in \
                recomputed_mlp:  # the backward recomputes the feed-forward's internals
            deps = (*deps, redo(recomputed_mlp.pop(op.layer)))
        if where == "loss" and op.stage == "bwd_act" and not loss_redone:
            loss_redone = True  # the logits again, a chunk at a time
            deps = (*deps, redo(recomputed_loss))
        if op.kind == "attention" and op.stage == "bwd_act" and op.layer in sent:
            q, kv, o, ln = saved[op.layer]
            lse = _lse(op)
            stream = (q + o + o + lse + 2 * q) * (u + 1) / 2  # q, out, dout, lse, fp32 dq
            whole = kv + ln + stream
            first = emit(_copy("h2d", math.ceil(whole / u), op, op.stage, "prefetch"),
                         (sent.pop(op.layer),))
            rest = emit(_copy("h2d", math.ceil(whole * (u - 1) / u), op, op.stage, "stream"),
                        (first,))
            back = emit(_copy("d2h", math.ceil(2 * q * (u + 1) / 2 + o), op, op.stage,
                              "dq"), (first,))
            moved[op.index] = emit(op, (*deps, first))
            for r in readers.get(op.index, ()):
                waits.setdefault(r, []).extend((rest, back))
            continue
        moved[op.index] = emit(op, deps)
        if op.kind == "attention" and op.stage == "recompute":
            q, kv, o, ln = saved[op.layer]
            sent[op.layer] = emit(_copy("d2h", q + kv + o + ln + _lse(op), op, op.stage,
                                        "offload"), (moved[op.index],))
    buffers = tuple(replace(b, bytes=math.ceil(b.bytes * scale(b)), alloc=moved[b.alloc],
                            free=b.free if b.free < 0 else moved[b.free])
                    for b in training.buffers)
    return replace(training, trace=replace(training.trace,
                                           model=f"{training.trace.model} [fpdt {u} chunks]",
                                           ops=tuple(out)), buffers=buffers)


def _lse(op: Op) -> int:
    d = op.dims
    return d.get("batch", 1) * d["q_len"] * d["heads"] * _LSE_BYTES


def _saved_bytes(ops: tuple[Op, ...], region: list[str]
                 ) -> dict[str, tuple[int, int, int, int]]:
    """Per layer: one device's q, k + v, attention output and attention-input (norm) bytes
    that FPDT keeps in host memory."""
    saved: dict[str, tuple[int, int, int, int]] = {}
    norms = {op.layer: op.output_bytes for op in ops
             if op.stage == "recompute" and region[op.index] == "attention_input"}
    for op in ops:
        if op.kind != "attention" or op.stage != "recompute":
            continue
        d = op.dims
        q = math.ceil(op.input_bytes * d["heads"] / (d["heads"] + 2 * d["kv_heads"]))
        saved[op.layer] = (q, op.input_bytes - q, op.output_bytes, norms.get(op.layer, 0))
    return saved
