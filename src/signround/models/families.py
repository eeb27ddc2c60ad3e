"""Per-family facts, as data: the single place a new architecture is taught.

Planning, tuning and loading all read these tables; no module elsewhere branches on a model family.
"""

from __future__ import annotations

# Where architectures keep their decoder blocks (an ``nn.ModuleList``), most common first.  Text decoders of
# vision-language models come before their vision towers so the text path wins when both exist.
TEXT_BLOCK_PATHS: tuple[str, ...] = (
    "model.layers",
    "model.language_model.layers",
    "language_model.model.layers",
    "model.language_model.model.layers",
    "transformer.h",
    "model.decoder.layers",
    "transformer.blocks",
    "gpt_neox.layers",
    "transformer.layers",
)

# Vision / audio towers of multimodal models: their block lists, quantized only with ``quant_nontext_module``.
NONTEXT_BLOCK_PATHS: tuple[str, ...] = (
    "model.visual.blocks",
    "model.vision_tower.vision_model.encoder.layers",
    "model.vision_tower.encoder.layers",
    "model.vision_tower.timm_model.blocks",
    "visual.blocks",
    "vision_tower.vision_model.encoder.layers",
)

# Module-name prefixes (relative to the model) of non-text parts: their layers are reported as kept for "vision".
NONTEXT_PREFIXES: tuple[str, ...] = (
    "model.visual",
    "model.vision_tower",
    "model.multi_modal_projector",
    "model.audio_tower",
    "visual",
    "vision_tower",
    "multi_modal_projector",
)

# The final norm before lm_head (its outputs weigh the head's optimised-RTN init).
FINAL_NORM_PATHS: tuple[str, ...] = (
    "model.norm",
    "model.language_model.norm",
    "transformer.ln_f",
    "model.decoder.final_layer_norm",
    "gpt_neox.final_layer_norm",
)

# Leaf names of routers inside a mixture-of-experts block (a module that has an ``experts`` child).  They stay in
# 16 bit: quantizing a router changes which experts run (the reference once shipped that regression).
ROUTER_LEAF_NAMES: frozenset[str] = frozenset(
    {"gate", "router", "shared_expert_gate", "shared_experts_gate", "gate_proj_router", "wg"}
)

# Per-expert layer names on disk when transformers has no conversion rule that names them (families whose
# original checkpoints store experts fused): (gate, up, down) or (up, down) for experts without a gate.
DEFAULT_EXPERT_NAMES: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
DEFAULT_UNGATED_EXPERT_NAMES: tuple[str, str] = ("up_proj", "down_proj")

# How quantized per-expert tensors are named on disk (``moe_expert_names``).  "original": the names of the family's
# original checkpoint, from transformers' conversion rules (Mixtral ``w1 / w3 / w2``), which vLLM and SGLang read;
# "gate_up_down": always the defaults above, which Intel auto-round 0.16.1's and GPTQModel's loaders expect.
EXPERT_NAMINGS: tuple[str, ...] = ("original", "gate_up_down")

# Fused experts that are not decorated with transformers' ``use_experts_implementation`` and whose per-expert form
# transformers itself provides: experts class -> (module, class) of that ModuleList of per-expert MLPs (named
# gate_proj / up_proj / down_proj, the names the reference writes).  Their fused weights are stored transposed
# ([experts, in, out]) with gate and up concatenated.
SEQUENTIAL_EXPERTS: dict[str, tuple[str, str]] = {
    "Llama4TextExperts": ("transformers.quantizers.base", "SequentialLlama4TextExperts"),
}
