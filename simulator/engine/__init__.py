"""The SimPy engine: machine resources and the simulation of mapped tasks (time in ns)."""

from simulator.engine.machine import Machine, Usage
from simulator.engine.simulation import Slice, Timeline, simulate_tasks

__all__ = ["Machine", "Slice", "Timeline", "Usage", "simulate_tasks"]
