"""Model-family knowledge: where blocks, experts, routers and towers are (facts as data in ``families``)."""

from .conv1d import is_conv1d, is_linear_like, to_linear
from .experts import ExpertsLayout, LinearExperts, find_fused_experts, linear_experts, observing_experts, unfuse_experts
from .layout import (
    HEAD_NOT_TUNED,
    Inventory,
    block_lists,
    final_norm,
    find_blocks,
    head_is_tied,
    head_name,
    inventory,
    is_router,
    quantizable_layers,
)

__all__ = [
    "HEAD_NOT_TUNED",
    "ExpertsLayout",
    "Inventory",
    "LinearExperts",
    "block_lists",
    "final_norm",
    "find_blocks",
    "find_fused_experts",
    "head_is_tied",
    "head_name",
    "inventory",
    "is_conv1d",
    "is_linear_like",
    "is_router",
    "linear_experts",
    "observing_experts",
    "quantizable_layers",
    "to_linear",
    "unfuse_experts",
]
