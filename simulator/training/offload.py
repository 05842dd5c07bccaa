"""CPU offload of activation checkpoints (`--offload activations`, DeepSpeed's
`cpu_checkpointing`; FPDT's "OC"): with full checkpointing, each block's checkpointed
input is copied to host memory as the forward makes it and prefetched back one block ahead
of its recompute (double buffering: the checkpoint in use and the next).

The copies are transfers on the chip's host link (`host_link`: its bandwidth and latency)
that overlap the kernel stream, one at a time; a recompute waits for its checkpoint's
prefetch. A checkpoint is on the device from the op that makes it until its copy is
issued, and again from its prefetch to its last reader. Host memory is not limited.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from simulator.errors import UserError
from simulator.hardware import Hardware
from simulator.workload.trace import Op, readers_of
from simulator.workload.training import Buffer, TrainingTrace

OFFLOADS = ("activations", "optimizer")
_COPIES = ("d2h", "h2d")


def parse_offload(text: str | None, recompute: str) -> bool:
    """Whether `--offload` asks for activation offload; refuses what is not modelled."""
    if text is None:
        return False
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in wanted if part not in OFFLOADS]
    if not wanted or unknown:
        raise UserError("--offload", f"expected a comma-separated list of "
                                     f"{', '.join(OFFLOADS)}, not {text!r}")
    if "optimizer" in wanted:
        raise UserError("--offload", "optimizer offload (a CPU optimizer step) is not "
                                     "modelled yet; expected --offload activations")
    if recompute != "full":
        raise UserError("--offload", "offloads the checkpoints of full activation "
                                     f"checkpointing; expected --recompute full, not "
                                     f"{recompute}")
    return True


def host_copy(kind: str, nbytes: int, at: Op, stage: str, what: str) -> Op:
    """A `kind` ("d2h" or "h2d") copy of `nbytes` over the host link, issued at `at`, in
    `stage`, named `at.module`.`what`; timed by `host_links`."""
    return Op(index=0, name=kind, fn=kind, kind="collective", module=f"{at.module}.{what}",
              layer=at.layer, dtype=at.dtype, ops=0, weight_bytes=0, state_read_bytes=0,
              state_write_bytes=0, input_bytes=nbytes, output_bytes=nbytes,
              dims={"devices": 1, "overlap": 1}, deps=(), stage=stage,
              shapes=f"{nbytes} B over the host link")


def _copy(kind: str, buffer: Buffer, at: Op) -> Op:
    return host_copy(kind, buffer.bytes, at, at.stage, kind)


def offload_checkpoints(training: TrainingTrace) -> TrainingTrace:
    """`training` (full recompute) with its checkpoints offloaded to the host."""
    ops = training.trace.ops
    readers = readers_of(ops)
    checkpoints: dict[int, int] = {}  # buffer number → its first recompute reader
    for number, buffer in enumerate(training.buffers):
        if (buffer.category == "activations" and buffer.free >= 0
                and ops[buffer.alloc].stage == "fwd"):
            recomputes = [r for r in readers.get(buffer.alloc, ()) if ops[r].stage == "recompute"]
            if recomputes:
                checkpoints[number] = min(recomputes)
    backward = next((op.index for op in ops if op.stage not in ("fwd", "")), len(ops))
    # backward order: the last block's checkpoint is prefetched as the backward starts,
    # each other one as the checkpoint before it (in the backward's order) is first read
    order = sorted(checkpoints, key=lambda n: checkpoints[n])
    prefetch_at = {n: (backward if i == 0 else checkpoints[order[i - 1]])
                   for i, n in enumerate(order)}
    copies_out = {training.buffers[n].alloc: n for n in checkpoints}
    fetches: dict[int, list[int]] = {}
    for n, at in prefetch_at.items():
        fetches.setdefault(at, []).append(n)
    out: list[Op] = []
    moved: dict[int, int] = {}
    sent: dict[int, int] = {}
    fetched: dict[int, int] = {}
    needs: dict[int, list[int]] = {}  # a first reader → its checkpoints' prefetches

    def emit(op: Op, deps: tuple[int, ...]) -> int:
        out.append(op.evolve(index=len(out), deps=deps))
        return len(out) - 1

    for n, reader in checkpoints.items():
        needs.setdefault(reader, []).append(n)
    for op in ops:
        for n in fetches.get(op.index, ()):
            prior = (len(out) - 1,) if out else ()
            fetched[n] = emit(_copy("h2d", training.buffers[n], op), prior)
        deps = tuple(moved[d] for d in op.deps) + tuple(fetched[n]
                                                        for n in needs.get(op.index, ()))
        moved[op.index] = emit(op, deps)
        if op.index in copies_out:
            n = copies_out[op.index]
            sent[n] = emit(_copy("d2h", training.buffers[n], op), (moved[op.index],))
    buffers: list[Buffer] = []
    for number, buffer in enumerate(training.buffers):
        free = buffer.free if buffer.free < 0 else moved[buffer.free]
        if number in checkpoints:
            buffers.append(replace(buffer, alloc=moved[buffer.alloc], free=sent[number]))
            buffers.append(replace(buffer, alloc=fetched[number], free=free))
        else:
            buffers.append(replace(buffer, alloc=moved[buffer.alloc], free=free))
    return replace(training, trace=replace(training.trace, ops=tuple(out)),
                   buffers=tuple(buffers))


def host_links(links: Callable[[Op], float] | None, hw: Hardware, flag: str = "--offload"
               ) -> Callable[[Op], float]:
    """`links` (the system's collectives, ns) with the host copies timed on the chip's
    host link."""
    host = hw.host_link
    if host is None:
        raise UserError(flag, f"{hw.name} declares no host link (host_link); expected "
                                     "a machine with one")
    ns_per_byte = 1e9 / host.bandwidth
    latency_ns = host.latency.seconds * 1e9

    def timed(op: Op) -> float:
        if op.fn in _COPIES:
            return op.input_bytes * ns_per_byte + latency_ns
        if links is None:
            raise AssertionError(f"{op.name}: a collective without a system")
        return links(op)

    return timed
