"""A cycle-approximate hardware performance simulator for language models.

    >>> from simulator import simulate
    >>> result = simulate("fpga_8core.yaml", "1.3b")
    >>> result.tokens_per_s, result.power_w
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

#: The public names, each imported from its module on first use: `import simulator.cli`
#: (every command) does not load the engine, and `workloads` may import `simulator.errors`
#: first without a cycle.
_EXPORTS = {"simulate": "simulator.api", "UserError": "simulator.errors",
            "Hardware": "simulator.hardware", "load_hardware": "simulator.hardware",
            "Result": "simulator.report"}
__all__ = ["Hardware", "Result", "UserError", "load_hardware", "simulate"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'simulator' has no attribute {name!r}")
