"""The hardware description format: pydantic v2 models, validated once at load.

Every quantity is a string with its unit, converted to an SI float on load
(`Frequency` → Hz, `Bandwidth` → bytes/s, `Size` → bytes, `Bits` → bits,
`Energy` → J, `Power` → W). A `Delay` may be given in time ("45 ns") or in cycles of
the owning clock ("4 cycle"). Unknown keys are rejected so a typo never becomes a default.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    PrivateAttr,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import CoreSchema, core_schema

from simulator.units import UnitError, parse

#: Largest host-path slow-down (log10) the arbitration growth may reach.
MAX_ARBITRATION_LOG10 = 6
#: Data types a functional unit can be rated for.
DType = Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int32", "int8", "int4", "int2", "ternary"]
#: Classes of traced ops a vector unit can be given (see simulator.workload.trace.OpKind).
VectorClass = Literal["elementwise", "activation", "reduction", "norm", "recurrence", "softmax",
                      "embedding", "memory"]
UnitKind = Literal["matrix", "ternary", "vector"]
#: Ways to spread a step over the cores (simulator.mapping): split every op, or per sequence.
MappingMode = Literal["tensor", "batch"]


def _quantity(dimension: str, *, positive: bool) -> object:
    def convert(value: object) -> float:
        try:
            number = parse(value, dimension)  # type: ignore[arg-type]
        except UnitError as exc:
            raise ValueError(str(exc)) from None
        if positive and number <= 0:
            raise ValueError(f"'{value}' must be greater than zero")
        if number < 0:
            raise ValueError(f"'{value}' must not be negative")
        return number

    return BeforeValidator(convert)


def _schema(dimension: str, example: str | None = None, units: str = "") -> WithJsonSchema:
    """A quantity's JSON Schema: with one example, or (types whose fields differ too much
    for one example: sizes, bits, bandwidths) the units, each field giving its own."""
    if example is None:
        return WithJsonSchema({"type": "string", "description": f"{dimension} with unit ({units})"})
    return WithJsonSchema({"type": "string", "description": f"{dimension} with unit, e.g. "
                                                            f"'{example}'", "examples": [example]})


Frequency = Annotated[float, _quantity("frequency", positive=True), _schema("frequency", "60 MHz")]
Bandwidth = Annotated[float, _quantity("bandwidth", positive=True),
                      _schema("bandwidth", units="MB/s, GB/s, TB/s, GiB/s")]
Size = Annotated[float, _quantity("size", positive=True),
                 _schema("size", units="B, KiB, MiB, GiB, kB, MB, GB")]
Bits = Annotated[float, _quantity("bits", positive=True), _schema("bits", units="bit, B")]
Energy = Annotated[float, _quantity("energy", positive=False), _schema("energy", "0.9 pJ")]
Power = Annotated[float, _quantity("power", positive=False), _schema("power", "13.4 W")]
Rate = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: A whole number written as one (a YAML `true` or `1.5` is an error, not 1).
TileSize = Annotated[int, Field(strict=True, ge=1, le=1 << 16)]
Fraction = Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]


class Delay(NamedTuple):
    """A delay given in seconds, in cycles of the owning clock, or both added."""

    seconds: float = 0.0
    cycles: float = 0.0

    def ns(self, clock_hz: float) -> float:
        """The delay in nanoseconds at `clock_hz`."""
        return self.seconds * 1e9 + self.cycles / clock_hz * 1e9

    def text(self) -> str:
        """The delay as a hardware file writes it: '4.5e-08 s', '4 cycle', '0 s', or
        '4.5e-08 s + 4 cycle' (both)."""
        parts = [f"{_number(self.seconds)} s"] if self.seconds or not self.cycles else []
        if self.cycles:
            parts.append(f"{_number(self.cycles)} cycle")
        return " + ".join(parts)

    @classmethod
    def __get_pydantic_core_schema__(cls, _source: Any, _handler: GetCoreSchemaHandler
                                     ) -> CoreSchema:
        """Read from text (`_delay`); written back as text the loader reads (`text`), so
        the defaults `simulate schema` shows load too."""
        return core_schema.no_info_plain_validator_function(
            _delay, serialization=core_schema.plain_serializer_function_ser_schema(cls.text))


def _number(value: float) -> str:
    """`value` as short as it reads back exactly."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def _delay(value: object) -> Delay:
    if isinstance(value, Delay):
        return value
    if isinstance(value, str) and " + " in value:  # a time and a cycle count, added
        parts = [_delay(part) for part in value.split(" + ")]
        return Delay(sum(p.seconds for p in parts), sum(p.cycles for p in parts))
    try:
        return Delay(seconds=parse(value, "time"))  # type: ignore[arg-type]
    except UnitError:
        pass
    try:
        cycles = parse(value, "cycles")  # type: ignore[arg-type]
    except UnitError:
        raise ValueError(f"expected a time or a cycle count with unit, e.g. '45 ns' or "
                         f"'4 cycle', not '{value}'") from None
    if cycles < 0:
        raise ValueError(f"'{value}' must not be negative")
    return Delay(cycles=cycles)


def _non_negative_delay(delay: Delay) -> Delay:
    if delay.seconds < 0:
        raise ValueError("a delay must not be negative")
    return delay


DelayField = Annotated[
    Delay,
    AfterValidator(_non_negative_delay),
    WithJsonSchema({"type": "string", "description": "time or cycles with unit, e.g. '45 ns'",
                    "examples": ["45 ns", "4 cycle"]}),
]


def _positive_delay(delay: Delay) -> Delay:
    if delay.seconds <= 0 and delay.cycles <= 0:
        raise ValueError("expected a delay greater than zero, e.g. '1 cycle'")
    return delay


PositiveDelayField = Annotated[DelayField, AfterValidator(_positive_delay)]


class Strict(BaseModel):
    """Base of every section: frozen, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class LowBitKernel(Strict):
    """A GEMM kernel whose weights are stored in a narrower type than its activations (or
    both quantized): the weights are unpacked on the vector unit inside the K loop (the
    matrix unit's `unpack` cost of the weight dtype) and multiplied in `mma`."""

    act: DType = Field(description="activation dtype")
    weight: DType = Field(description="stored weight dtype")
    mma: DType = Field(description="dtype the matrix unit multiplies in")


class Unit(Strict):
    """A functional unit inside a core.

    `ops_per_cycle` counts operations per cycle per data type: FLOPs for a matrix unit
    (a multiply-accumulate is 2), add/sub per weight for a ternary unit, elements for a
    vector unit.
    """

    kind: UnitKind
    ops_per_cycle: dict[DType, Rate] = Field(min_length=1)
    latency: DelayField = Delay()
    handles: tuple[VectorClass, ...] | None = Field(
        default=None, description="vector units only: op classes this unit executes")
    stages: int = Field(default=1, ge=1, le=64, strict=True,
                        description="sequential passes over the data per op (RMS unit: 3)")
    slow_ops: dict[str, Rate] = Field(
        default_factory=dict,
        description="cycles per element for costly functions by name (exp, sigmoid, div...)")
    efficiency: Fraction = Field(
        default=1.0, description="fraction of the rated throughput sustained in a kernel's "
                                 "main loop (matrix units of GPU-like machines)")
    tiles: tuple[tuple[TileSize, TileSize, TileSize], ...] = Field(
        default=(), description="thread-block tiles (tm, tn, tk) a GEMM library picks from; "
                                "empty: ops are split across cores without tiling")
    step_overhead: DelayField = Field(
        default=Delay(), description="fixed cost of each K step of a tile, not hidden by its "
                                     "pipes: the barrier and pipeline wait between stages")
    tile_overhead: DelayField = Field(
        default=Delay(), description="fixed cost of each thread-block tile besides its K loop: "
                                     "prologue (first loads in flight) and epilogue sync")
    kernels: tuple[LowBitKernel, ...] = Field(
        default=(), description="mixed-dtype GEMM kernels (activation × weight pairs) the "
                                "machine's libraries provide, beyond same-dtype ones")
    dtype_efficiency: dict[DType, Fraction] = Field(
        default_factory=dict, description="share of the rated rate a GEMM main loop sustains "
                                          "in a dtype where no mechanism explains the "
                                          "shortfall (a fitted, empirical term); default 1")
    unpack: dict[DType, Annotated[float, Field(ge=0, le=64, allow_inf_nan=False)]] = Field(
        default_factory=dict, description="vector-unit integer ops per weight element, per "
                                          "tile that multiplies it, to unpack weights stored "
                                          "in this dtype (by kernels)")

    @model_validator(mode="after")
    def _kernels_rated(self) -> Unit:
        seen = set()
        for kernel in self.kernels:
            pair = f"kernel {kernel.act}×{kernel.weight}"
            if kernel.mma not in self.ops_per_cycle:
                raise ValueError(f"{pair} runs its MMA in {kernel.mma}, which ops_per_cycle "
                                 "does not rate")
            if kernel.weight not in self.unpack:
                raise ValueError(f"{pair} needs unpack.{kernel.weight} (ops per weight)")
            if (kernel.act, kernel.weight) in seen:
                raise ValueError(f"{pair} is listed twice")
            seen.add((kernel.act, kernel.weight))
        return self


class Cores(Strict):
    count: int = Field(ge=1, le=100_000, strict=True)
    clock: Frequency | None = None
    units: dict[str, Unit] = Field(min_length=1)
    sram: Size = Field(description="on-chip tile buffer/register file per core",
                       examples=["192 KiB"])
    issue: DelayField = Field(default=Delay(), description="per op issued on a core")
    pipeline_stages: int = Field(
        default=2, ge=1, le=16, strict=True,
        description="chunks a core's loads may run ahead of its compute (2: double buffering)")
    sram_bandwidth: int | None = Field(
        default=None, ge=1, le=1 << 16, strict=True,
        description="bytes per cycle a core's tile buffer (shared memory) feeds its matrix "
                    "unit; none: not a limit")
    stream_in_flight: Size | None = Field(
        default=None, description="bytes of loads a core keeps in flight in streaming "
                                  "(element-wise, norm, softmax) kernels; with the DRAM "
                                  "latency it caps the core's fetch rate (Little's law); none: "
                                  "no cap")


class Dram(Strict):
    kind: str
    channels: int = Field(ge=1, le=4096, strict=True)
    bandwidth_per_channel: Bandwidth = Field(examples=["19.2 GB/s"])
    efficiency: Fraction = 1.0
    latency: DelayField = Delay()
    queue_bandwidth: Bandwidth | None = Field(
        default=None, description="loaded latency: the access latency grows by the bytes in "
                                  "flight across all cores over this rate (queueing in the "
                                  "memory system); none: latency is fixed")
    turnaround: float = Field(
        default=0.0, ge=0, le=4, allow_inf_nan=False,
        description="extra channel time of a kernel that mixes reads and writes (bus "
                    "turnarounds): its DRAM bytes take 1 + turnaround × 2·min(read, write) / "
                    "(read + write) times as long; 0: none")
    capacity: Size = Field(examples=["32 GiB"])
    access_width: Bits = Field(
        examples=["512 bit"],
        description="bits one core moves per access (its port). Each access holds the "
                    "channel for max(access_width, burst), so below `burst` the channel is busy "
                    "for a whole burst but moves access_width of useful data: a non-burst 8-bit "
                    "DDR4 read occupies a 64-byte BL8 burst, 1/64 of the channel's bandwidth. "
                    "Reports show both: channel_utilisation (time held) and "
                    "channel_useful_utilisation (useful bytes / bandwidth × time)")
    access_interval: PositiveDelayField = Field(
        default=Delay(cycles=1), description="core cycles between two accesses of one core "
                                             "(more than zero: an access takes time)")
    burst: Size = Field(
        examples=["64 B"],
        description="bytes of channel time one access takes, at least: the DRAM's minimum "
                    "transfer (DDR4 BL8 on a 64-bit channel: 64 B; GPU sectors: 32 B); an "
                    "access narrower than this wastes the rest (see access_width)")
    arbitration_growth: float = Field(
        default=1.0, ge=1.0, le=16.0, allow_inf_nan=False,
        description="host-path latency factor per additional core sharing a channel "
                    "(arbitration and buffering logic doubling per core: 2)")
    interleave: bool = Field(
        default=False,
        description="true: every core's traffic spreads over all channels; "
                    "false: core i uses channel i mod channels")


class L2(Strict):
    capacity: Size = Field(examples=["40 MiB"])
    bandwidth: Bandwidth = Field(examples=["7.2 TB/s"])
    latency: DelayField = Field(default=Delay(), description="load-to-use latency of a hit")


class Memory(Strict):
    dram: Dram
    l2: L2 | None = None


class HostLink(Strict):
    bandwidth: Bandwidth = Field(examples=["15.75 GB/s"])
    latency: DelayField = Delay()
    transaction: Size | None = Field(
        default=None, examples=["8 B"],
        description="bytes per host write (8 B for MMIO); none: one DMA")
    transaction_time: DelayField = Field(default=Delay(), description="cost of each write")


#: Host runtimes a GPU's kernels can be launched under (see `Overheads`).
Runtime = Literal["eager", "cuda_graphs"]


class ConcurrentInstances(Strict):
    """How model instances that share one device, each on its own stream and host thread
    (FasterTransformer's concurrent instances), overlap. A round in which k instances each
    take a step costs the longest step, plus for each other instance its launches and
    `device_share` of its kernels' time, all of that grown by 1 + `contention` × (k − 1)².
    The defaults (1, 0) are strict turn-taking: a round costs the sum of the steps."""

    device_share: float = Field(
        default=1.0, ge=0.0, le=1.0,
        description="share of an added instance's kernel time the round pays (the rest "
                    "runs alongside the other instances' kernels)")
    contention: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="growth of each added instance's cost per (instances − 1)²")


class Overheads(Strict):
    """What starting ops costs. A GPU names the host runtime it models: `eager` pays `launch`
    before every kernel; `cuda_graphs` pays `graph_launch` once per step (its kernels captured
    in one graph) and `graph_kernel_gap` before each kernel. No `runtime` (custom cores): ops
    pay `launch` each, whatever issues them."""

    runtime: Runtime | None = Field(
        default=None, description="host runtime modelled: eager (a launch per kernel) or "
                                  "cuda_graphs (one graph launch per step); none: no host runtime")
    launch: DelayField = Field(default=Delay(), description="per op (kernel) launch, serial")
    graph_launch: DelayField | None = Field(
        default=None, description="cuda_graphs: one graph launch per step, serial; none: the "
                                  "machine has no CUDA-graph runtime")
    graph_kernel_gap: DelayField = Field(
        default=Delay(), description="cuda_graphs: GPU-side gap before each kernel of a graph")
    barrier: DelayField = Field(default=Delay(), description="cross-core sync after a split op")
    instances: ConcurrentInstances = Field(
        default_factory=ConcurrentInstances,
        description="concurrent model instances sharing the device (serving's `instances`)")

    @model_validator(mode="after")
    def _graphs_declared(self) -> Overheads:
        if self.runtime == "cuda_graphs" and self.graph_launch is None:
            raise ValueError("runtime cuda_graphs needs overheads.graph_launch (per step)")
        if self.graph_launch is not None and self.runtime is None:
            raise ValueError("overheads.graph_launch needs overheads.runtime (eager or "
                             "cuda_graphs): a CUDA-graph launch belongs to a host runtime")
        return self

    def runtimes(self) -> tuple[Runtime, ...]:
        """The runtimes this machine can run under (none without a host runtime)."""
        if self.runtime is None:
            return ()
        return ("eager", "cuda_graphs") if self.graph_launch is not None else ("eager",)


class FlashAttention(Strict):
    """FlashAttention-2 kernel shape and the costs a roofline cannot see."""

    q_tile: int = Field(default=128, ge=1, le=1024, strict=True)
    kv_tile: int = Field(default=64, ge=1, le=1024, strict=True)
    backward_q_tile: int = Field(default=64, ge=1, le=1024, strict=True)
    backward_kv_tile: int = Field(default=128, ge=1, le=1024, strict=True)
    efficiency: Fraction = Field(default=1.0, description="tensor-core efficiency of its loops")
    softmax_overlap: float = Field(default=0.0, ge=0, le=1, allow_inf_nan=False,
                                   description="share of softmax work hidden under matmuls")
    block_overhead: DelayField = Field(
        default=Delay(), description="fixed cost of each thread block: prologue (first "
                                     "tiles in flight) and epilogue (normalise, write O)")


class Scheduling(Strict):
    overlap_ops: bool = Field(
        default=False, description="independent ops may run concurrently on free units")
    fused_attention: bool = Field(
        default=False, description="attention as one fused kernel (O(N·d) DRAM traffic)")
    flash: FlashAttention = FlashAttention()
    resident_activations: bool = Field(
        default=False,
        description="activations that fit a core's SRAM stay there between ops (register "
                    "file of a custom core); false: every op reads and writes them (GPU kernels)")
    mappings: tuple[MappingMode, ...] = Field(
        default=("tensor", "batch"), min_length=1,
        description="ways the machine may spread a step over its cores (--mapping): tensor "
                    "(every op split across the cores) and/or batch (each core runs whole ops "
                    "for its own sequences); a file that does not say allows both")


class ByteEnergy(Strict):
    dram: Energy
    # defaults as a file writes them (validated), so `simulate schema` shows loadable ones
    l2: Energy = Field(default="0 pJ", validate_default=True)
    sram: Energy = Field(default="0 pJ", validate_default=True)
    host: Energy = Field(default="0 pJ", validate_default=True)


class LogicPower(Strict):
    """Static power of programmable logic in proportion to how much of it a design uses."""

    utilisation: Fraction = Field(description="fraction of the logic (ALMs) the design uses")
    full: Power = Field(description="static power of the whole logic fabric in use")


class PowerModel(Strict):
    idle: Power = Field(description="platform power with every core idle")
    logic: LogicPower | None = None
    per_core: Power = Field(default="0 W", validate_default=True,
                            description="static power of each active core")
    op_energy: dict[UnitKind, dict[DType | Literal["default"], Energy]]
    byte_energy: ByteEnergy
    tdp: Power | None = None
    sustained_clock: Frequency | None = Field(
        default=None, description="core clock the board's power limit allows with the matrix "
                                  "units busy every cycle; a kernel whose matrix units are busy "
                                  "a share u of its time runs at clock − u·(clock − this); none: "
                                  "always at clock")


class Hardware(Strict):
    """One machine."""

    name: str
    description: str = ""
    clock: Frequency
    cores: Cores
    memory: Memory
    host_link: HostLink | None = None
    overheads: Overheads = Overheads()
    scheduling: Scheduling = Scheduling()
    power: PowerModel
    #: the file it was read from (see `source`)
    _source: str = PrivateAttr(default="")

    @property
    def source(self) -> str:
        """The file this machine was read from, for errors; its name if built in Python."""
        return self._source or self.name

    def read_from(self, shown: str) -> Hardware:
        """Note the file this machine was read from; returns the machine."""
        self._source = shown
        return self

    @model_validator(mode="after")
    def _energies_cover_units(self) -> Hardware:
        for name, unit in self.cores.units.items():
            table = self.power.op_energy.get(unit.kind, {})
            for dtype in unit.ops_per_cycle:
                if dtype not in table and "default" not in table:
                    raise ValueError(
                        f"power.op_energy.{unit.kind} has no energy for {dtype} "
                        f"(used by cores.units.{name}); give '{dtype}' or 'default'")
        return self

    @model_validator(mode="after")
    def _arbitration_stays_finite(self) -> Hardware:
        growth, extra = self.memory.dram.arbitration_growth, self.cores_per_channel - 1
        if extra and math.log10(growth) * extra > MAX_ARBITRATION_LOG10:
            raise ValueError(
                f"memory.dram.arbitration_growth {growth:g} over {self.cores_per_channel} "
                f"cores per channel multiplies host latency by {growth:g}^{extra}; expected "
                f"at most 1e{MAX_ARBITRATION_LOG10} (add channels or lower the growth)")
        return self

    @property
    def cores_per_channel(self) -> int:
        """Cores attached to the busiest DRAM channel (1 where traffic interleaves)."""
        dram = self.memory.dram
        return 1 if dram.interleave else math.ceil(self.cores.count / dram.channels)

    @property
    def core_clock(self) -> float:
        """Core clock in Hz."""
        return self.cores.clock or self.clock

    def clock_scale(self, matrix_busy: float) -> float:
        """How much slower than at `core_clock` a kernel runs whose matrix units are busy a
        share `matrix_busy` of its time: the power limit trims the clock in proportion to
        that activity, down to `power.sustained_clock` (≥ 1)."""
        sustained = self.power.sustained_clock
        if sustained is None:
            return 1.0
        busy = min(1.0, max(0.0, matrix_busy))
        return self.core_clock / (self.core_clock - busy * (self.core_clock - sustained))

    @model_validator(mode="after")
    def _unpack_has_a_vector_unit(self) -> Hardware:
        needs = [name for name, unit in self.cores.units.items() if unit.kernels]
        vectors = [u for u in self.cores.units.values() if u.kind == "vector"
                   and (u.handles is None or "elementwise" in u.handles)]
        if needs and not vectors:
            raise ValueError(f"cores.units.{needs[0]}.kernels unpack weights on a vector unit, "
                             "but no vector unit handles elementwise; add one or drop the "
                             "kernels")
        return self

    @model_validator(mode="after")
    def _sustained_below_clock(self) -> Hardware:
        sustained = self.power.sustained_clock
        if sustained is not None and sustained > self.core_clock:
            raise ValueError(f"power.sustained_clock {sustained / 1e6:g} MHz is above the core "
                             f"clock {self.core_clock / 1e6:g} MHz; expected at most that")
        return self
