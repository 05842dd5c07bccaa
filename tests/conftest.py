"""Shared fixtures: an isolated trace cache and a small synthetic machine."""

from __future__ import annotations

import copy
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings

# Hypothesis keeps no example database in the source tree.
settings.register_profile("project", database=None)
settings.load_profile("project")

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


# --- Tests never write into the source tree -------------------------------------------------
ROOT = Path(__file__).resolve().parents[1]
#: folders of tools and the environment, not of the project
NOT_SOURCE = {".git", ".venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".hypothesis"}


def source_tree() -> dict[str, tuple[int, int]]:
    """(size, mtime) of every project file."""
    state = {}
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if d not in NOT_SOURCE
                         and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder) / name
            info = path.stat()
            state[str(path.relative_to(ROOT))] = (info.st_size, info.st_mtime_ns)
    return state


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_TREE] = source_tree()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    before, after = session.config.stash[_TREE], source_tree()
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))
    if changed:
        print(f"\ntests wrote into the source tree: {', '.join(changed[:10])}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


_TREE = pytest.StashKey[dict]()
