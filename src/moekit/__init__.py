"""moekit: load-balanced Mixture-of-Experts for PyTorch, from training to serving.

Importing moekit has no side effects; subpackages with heavy or optional dependencies
(``hf``, ``offload``, ``parallel``, ``placement``, ``train``) are imported on first use.
"""

from moekit.layer import MoE, MoEConfig, MoEOutput, optimizer_step_done
from moekit.routing import Routing

__version__ = "0.1.0"

__all__ = ["MoE", "MoEConfig", "MoEOutput", "Routing", "optimizer_step_done", "__version__"]
