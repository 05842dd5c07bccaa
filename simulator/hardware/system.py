"""Systems: devices joined by links, level by level (a node's NVSwitch, the fabric between
nodes). A system file names one chip file, how many of it a node holds, how many nodes
there are, and one link level per tier of the topology, innermost first:

    devices: {chip: gpu_a100.yaml, per_node: 8}
    nodes: 1
    links:
      - {name: nvswitch, span: node, bandwidth: 300 GB/s, latency: 2 us, efficiency: 1}

Each level is a non-blocking switch: every device has one port into it per direction,
`bandwidth` per direction (what it can send while it receives as much), `latency` from
the first byte leaving to its arrival, and `efficiency` the share of the rate a transfer
sustains. Two devices talk over the innermost level that holds both
(simulator.engine.network). A level's `span` is `node` (the devices of one node) or
`system` (every device).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from simulator.errors import UserError
from simulator.hardware.schema import Bandwidth, DelayField, Fraction, Hardware, Strict

Span = Literal["node", "system"]


class Devices(Strict):
    chip: str = Field(description="the chip file every device is (a shipped name or a path "
                                  "relative to the system file)")
    per_node: int = Field(ge=1, le=1024, strict=True, description="devices in one node")


class Level(Strict):
    """One tier of the topology: a non-blocking switch with one port per device."""

    name: str = Field(min_length=1)
    span: Span = Field(description="node: joins the devices of one node; system: all devices")
    bandwidth: Bandwidth = Field(description="per device and direction")
    latency: DelayField = Field(description="first byte out to its arrival")
    efficiency: Fraction = Field(default=1.0, description="share of `bandwidth` a transfer "
                                                          "sustains")
    multicast: bool = Field(default=False, description="the switch reduces and multicasts "
                                                       "(NVLink SHARP): --algorithm nvls")

    @model_validator(mode="after")
    def _latency_in_time(self) -> Level:
        if self.latency.cycles:
            raise ValueError("latency: expected a time (e.g. '2 us'); a link has no clock "
                             "to count cycles of")
        return self


class System(Strict):
    """Devices and the links between them (see the module notes)."""

    name: str = Field(min_length=1)
    description: str = ""
    devices: Devices
    nodes: int = Field(default=1, ge=1, le=4096, strict=True)
    links: tuple[Level, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _levels_cover_the_devices(self) -> System:
        spans = [level.span for level in self.links]
        if spans != sorted(spans, key=("node", "system").index) or len(set(spans)) != len(spans):
            raise ValueError("links: expected at most one node level, then at most one "
                             "system level, innermost first")
        if self.nodes > 1 and "system" not in spans:
            raise ValueError(f"links: {self.nodes} nodes need a level with span: system "
                             "to join them")
        return self

    @property
    def count(self) -> int:
        """All devices of the system."""
        return self.devices.per_node * self.nodes


#: An override of a system's chip file (`--hw-set chip.scheduling.fused_attention=false`).
CHIP = "chip."


def is_system(data: Any) -> bool:
    """Whether parsed YAML describes a system (it names its devices) rather than one chip."""
    return isinstance(data, dict) and "devices" in data and "cores" not in data


def load_machine(name: str | Path, overrides: Mapping[str, Any] | None = None
                 ) -> tuple[System | None, Hardware]:
    """A hardware file by path or shipped name, with dotted `--hw-set` overrides: a system
    (with the chip its devices are; a path under `chip.` overrides the chip's file) or one
    chip (None, the chip)."""
    from simulator.hardware.loader import (
        apply_overrides,
        describe_error,
        load_hardware,
        locate,
        parse_yaml,
        validate,
    )

    shown, text = locate(name)
    data, node = parse_yaml(text, shown)
    overrides = dict(overrides or {})
    on_chip = {key[len(CHIP):]: overrides.pop(key) for key in list(overrides)
               if key.startswith(CHIP)} if is_system(data) else {}
    if overrides and isinstance(data, dict):
        apply_overrides(data, overrides, "--hw-set")
    if not is_system(data):
        return None, validate(data, shown, node)
    try:
        system = System.model_validate(data)
    except ValidationError as exc:
        raise describe_error(exc, shown, node, System) from None
    beside = Path(shown).parent / system.devices.chip
    chip = beside if Path(shown).is_file() and beside.is_file() else system.devices.chip
    try:
        locate(chip)
    except UserError as exc:  # the system file's field is what is wrong
        raise UserError(f"{shown}: devices.chip",
                        f"{system.devices.chip!r}: {exc.message}") from None
    return system, load_hardware(chip, on_chip or None)


def load_system(name: str | Path, overrides: Mapping[str, Any] | None = None
                ) -> tuple[System, Hardware]:
    """A system file and the chip its devices are; a chip file is refused in one line."""
    system, chip = load_machine(name, overrides)
    if system is None:
        raise UserError(str(name), "is one chip; expected a system file (devices, nodes, "
                                   "links), e.g. dgx_a100.yaml or hgx_a100_4gpu.yaml")
    return system, chip
