"""What a machine's runs can share across calls: mapped ops and ops simulated alone.

A serving run simulates hundreds of step shapes of one model on one machine; most of their
ops (every linear at a batch it met before, every norm) recur from step to step. Results
are kept per machine object (the last few), so a changed or reloaded machine starts
afresh; a run's results do not depend on what was kept (the same op on the same machine
maps and runs the same).
"""

from __future__ import annotations

from typing import Any

from simulator.hardware.schema import Hardware

#: Machines kept; each holds its tables alive (a strong reference, so its id stays its own).
KEEP = 4
_TABLES: dict[int, tuple[Hardware, dict[str, dict[Any, Any]]]] = {}


def table(hw: Hardware, name: str) -> dict[Any, Any]:
    """The table `name` kept for the machine object `hw` (empty at first)."""
    kept = _TABLES.pop(id(hw), None)
    if kept is None or kept[0] is not hw:
        kept = (hw, {})
    _TABLES[id(hw)] = kept  # most recent last
    while len(_TABLES) > KEEP:
        del _TABLES[next(iter(_TABLES))]
    return kept[1].setdefault(name, {})
