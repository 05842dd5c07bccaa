"""Training steps: simulate a captured training trace (simulator.workload.training) and
report step time, MFU and device memory over the step."""

from simulator.training.step import TrainingResult, simulate_training

__all__ = ["TrainingResult", "simulate_training"]
