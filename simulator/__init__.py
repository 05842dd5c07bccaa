"""A cycle-approximate hardware performance simulator for language models.

    >>> from simulator import simulate
    >>> result = simulate("fpga_8core.yaml", "1.3b")
    >>> result.tokens_per_s, result.power_w
"""

from simulator.api import simulate
from simulator.errors import UserError
from simulator.hardware import Hardware, load_hardware
from simulator.report import Result

__all__ = ["Hardware", "Result", "UserError", "load_hardware", "simulate"]
