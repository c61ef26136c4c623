"""Hugging Face ``transformers`` integration: find MoE blocks, patch them with moekit layers
that share their weights, record routing traces, export a moekit-trained LM as a Mixtral model. Needs the ``hf`` extra only at call time."""

from moekit.hf.export import to_mixtral
from moekit.hf.families import FAMILIES, Family, MoEBlock, find_moe_blocks, predict_block, route_block
from moekit.hf.patch import HFSharedExperts, PatchedMoE, moe_config_of, patch
from moekit.hf.record import RoutingRecorder, record_routing

__all__ = [
    "FAMILIES",
    "Family",
    "MoEBlock",
    "find_moe_blocks",
    "route_block",
    "predict_block",
    "patch",
    "PatchedMoE",
    "HFSharedExperts",
    "moe_config_of",
    "record_routing",
    "RoutingRecorder",
    "to_mixtral",
]
