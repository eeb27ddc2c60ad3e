"""Tiny random models of many transformers families, for the architecture coverage matrix.

Every model has hidden 64 and intermediate sizes that are multiples of 32, so every Linear of its decoder blocks
is quantizable at group size 32, and vocab 512 so the stories260K tokenizer drives it.
"""

from __future__ import annotations

from typing import Any

import torch

SMALL = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    tie_word_embeddings=False,
)


def make_tiny_llama(seed: int = 0, initializer_range: float = 0.02):
    """A random LlamaForCausalLM whose every block Linear is quantizable at group size 32.

    hidden 64, intermediate 128, 2 blocks, 4 heads of 16, 2 kv heads (k/v_proj out = 32), vocab 512 (the
    stories260K tokenizer's size, so that tokenizer can drive it).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **{**SMALL, "max_position_embeddings": 512},
        initializer_range=initializer_range,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


DENSE: dict[str, dict[str, Any]] = {
    "llama": {},
    "qwen2": {},
    "qwen3": {"head_dim": 16},
    "mistral": {},
    "gemma2": {"head_dim": 16},
    "gemma3_text": {"head_dim": 16},
    "phi3": {"pad_token_id": 0},
    "olmo2": {},
    "granite": {},
    "cohere": {},
    "opt": {"ffn_dim": 128, "word_embed_proj_dim": 64},
    "gpt_neox": {},
    "falcon": {"new_decoder_architecture": True, "num_kv_heads": 2},
    "olmo3": {},
    "smollm3": {"pad_token_id": 0},
    "glm4": {"head_dim": 16, "pad_token_id": 0},
    "starcoder2": {},
    "phi": {},
    "stablelm": {},
    "exaone4": {"head_dim": 16},
    "seed_oss": {"head_dim": 16},
    "hunyuan_v1_dense": {"head_dim": 16},
}

MOE: dict[str, dict[str, Any]] = {
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64,
    },
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "head_dim": 16},
    "deepseek_v3": {
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "first_k_dense_replace": 1,
        "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 32, "qk_nope_head_dim": 16, "v_head_dim": 16,
        "n_group": 1, "topk_group": 1, "num_key_value_heads": 4,
    },
    "gpt_oss": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
    "olmoe": {"num_experts": 4, "num_experts_per_tok": 2},
    "deepseek_v2": {
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "first_k_dense_replace": 1,
        "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 32, "qk_nope_head_dim": 16, "v_head_dim": 16,
        "n_group": 1, "topk_group": 1, "num_key_value_heads": 4,
    },
    "glm4_moe": {
        "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "first_k_dense_replace": 1,
        "n_group": 1, "topk_group": 1, "head_dim": 16,
    },
    "phimoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "granitemoe": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "ernie4_5_moe": {"moe_num_experts": 4, "moe_k": 2, "moe_intermediate_size": 64},
    "hunyuan_v1_moe": {"num_experts": 4, "moe_topk": 2, "moe_intermediate_size": 64, "head_dim": 16},
    "minimax": {"num_local_experts": 4, "num_experts_per_tok": 2, "head_dim": 16},
    "exaone_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64, "head_dim": 16},
    "qwen3_next": {  # 4 layers: 3 linear-attention ones, then a full-attention one
        "num_hidden_layers": 4, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
        "shared_expert_intermediate_size": 64, "head_dim": 16, "linear_num_value_heads": 4,
        "linear_num_key_heads": 2, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
    },
    "llama4_text": {"num_local_experts": 4, "num_experts_per_tok": 1, "intermediate_size_mlp": 128, "head_dim": 16},
}  # fmt: skip

OTHER: dict[str, dict[str, Any]] = {
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 256},
}


def make_causal_lm(family: str, seed: int = 0):
    """A random ``AutoModelForCausalLM`` of ``family`` (a key of DENSE, MOE or OTHER)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if family in OTHER:
        config = AutoConfig.for_model(family, **OTHER[family])
    else:
        config = AutoConfig.for_model(family, **{**SMALL, **{**DENSE, **MOE}[family]})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def starve_experts(model, experts: tuple[int, ...]) -> int:
    """Make every Mixtral-style top-k router of ``model`` never pick ``experts`` (their logits set to -inf), as a
    small calibration set does to some experts; returns how many routers were changed."""
    import torch.nn.functional as F

    def masked(router):
        def forward(hidden_states):
            hidden_states = hidden_states.reshape(-1, router.hidden_dim)
            logits = F.linear(hidden_states, router.weight)
            logits[:, list(experts)] = float("-inf")
            probs = torch.softmax(logits.float(), dim=-1)
            top_value, top_index = torch.topk(probs, router.top_k, dim=-1)
            return logits, top_value / top_value.sum(dim=-1, keepdim=True), top_index

        return forward

    routers = [m for m in model.modules() if type(m).__name__ == "MixtralTopKRouter"]
    for router in routers:
        router.forward = masked(router)
    return len(routers)


def save_tiny_llava(directory, stories_dir) -> None:
    """A random Llava (CLIP vision tower 32 wide, 2 blocks; Llama text decoder as SMALL) with a working processor
    (the stories260K tokenizer plus an ``<image>`` token, a 32x32 CLIP image processor) saved to ``directory``."""
    from transformers import (
        AutoConfig,
        AutoModelForImageTextToText,
        AutoTokenizer,
        CLIPImageProcessor,
        LlavaProcessor,
    )

    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    text = {**SMALL, "vocab_size": 544}
    vision = {
        "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "image_size": 32, "patch_size": 8, "projection_dim": 32,
    }  # fmt: skip
    config = AutoConfig.for_model(
        "llava", text_config={"model_type": "llama", **text}, vision_config=vision, image_token_id=image_token_id
    )
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(config).eval()
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=8, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, image_token="<image>",
    )  # fmt: skip
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


_VLM_TEXT = {k: v for k, v in SMALL.items() if k != "tie_word_embeddings"}
VLM: dict[str, dict[str, Any]] = {
    "qwen2_vl": {
        "text_config": {"model_type": "qwen2_vl_text", **_VLM_TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}},
        "vision_config": {
            "depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2,
        },
        "image_token_id": 500, "video_token_id": 501, "vision_start_token_id": 502,
    },
    "gemma3": {
        "text_config": {"model_type": "gemma3_text", **_VLM_TEXT, "head_dim": 16},
        "vision_config": {
            "model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
        },
        "mm_tokens_per_image": 4, "image_token_index": 500, "boi_token_index": 501, "eoi_token_index": 502,
    },
}  # fmt: skip


def make_vlm(family: str, seed: int = 0):
    """A random ``AutoModelForImageTextToText`` of ``family`` (a key of VLM); its text decoder is like SMALL."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.for_model(family, **VLM[family])
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config).eval()
