"""Workloads: real PyTorch models (built on the `meta` device) and their presets.

Importing this package does not import torch; `workloads.build` does.
"""

from workloads.config import ALIASES, PRESETS, ModelConfig, resolve_model

__all__ = ["ALIASES", "PRESETS", "ModelConfig", "resolve_model"]
