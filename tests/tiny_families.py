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
