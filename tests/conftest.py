"""Shared fixtures: an isolated trace cache and a small synthetic machine."""

from __future__ import annotations

import copy
import os
import tempfile
from typing import Any

import pytest

# One trace cache for the whole test session, never the user's.
os.environ.setdefault("SIMULATE_CACHE_DIR", tempfile.mkdtemp(prefix="simulate-test-cache-"))

BASE_MACHINE: dict[str, Any] = {
    "name": "test-machine",
    "clock": "100 MHz",
    "cores": {
        "count": 2,
        "sram": "64 KiB",
        "units": {
            "mac": {"kind": "matrix", "ops_per_cycle": {"bf16": 64, "int8": 128}},
            "vec": {"kind": "vector", "ops_per_cycle": {"bf16": 4, "fp32": 4, "int8": 4,
                                                         "int32": 4}},
        },
    },
    "memory": {"dram": {"kind": "test", "channels": 2, "bandwidth_per_channel": "1 GB/s",
                        "capacity": "1 GiB", "access_width": "64 bit", "burst": "8 B"}},
    "power": {"idle": "10 W", "per_core": "1 W",
              "op_energy": {"matrix": {"default": "1 pJ"}, "vector": {"default": "2 pJ"}},
              "byte_energy": {"dram": "10 pJ"}},
}


@pytest.fixture
def machine_data() -> dict[str, Any]:
    """A fresh, valid hardware description as a dict (tests mutate it)."""
    return copy.deepcopy(BASE_MACHINE)
