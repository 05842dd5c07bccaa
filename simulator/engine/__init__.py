"""The SimPy engine: machine resources and the simulation of mapped tasks (time in ns)."""

from simulator.engine.machine import Machine, Slice, Usage
from simulator.engine.simulation import Timeline, simulate_tasks

__all__ = ["Machine", "Slice", "Timeline", "Usage", "simulate_tasks"]
