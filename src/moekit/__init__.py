"""moekit: load-balanced Mixture-of-Experts for PyTorch, from training to serving.

Importing moekit has no side effects; subpackages with heavy or optional dependencies
(``hf``, ``offload``, ``parallel``, ``placement``, ``train``) are imported on first
attribute access, so ``import moekit; moekit.hf.patch(model)`` works.
"""

import importlib

from moekit import metrics, routing
from moekit.layer import MoE, MoEConfig, MoEOutput, optimizer_step_done
from moekit.routing import Routing

__version__ = "0.1.0"

_LAZY_SUBPACKAGES = ("experts", "hf", "offload", "parallel", "placement", "trace", "train")

__all__ = ["MoE", "MoEConfig", "MoEOutput", "Routing", "optimizer_step_done", "metrics", "routing",
           *_LAZY_SUBPACKAGES, "__version__"]


def __getattr__(name: str):
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"moekit.{name}")
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
