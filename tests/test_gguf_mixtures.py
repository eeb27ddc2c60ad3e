"""llama.cpp's file types as per-tensor type choices (signround.quant.gguf_mixtures), on synthetic tensor lists.

The expected layer sets are written out by hand from llama.cpp's rules (not recomputed with the module's own
predicates); integration_tests/test_gguf_mixtures_llamacpp.py checks the same choices against llama.cpp itself.
"""

from __future__ import annotations

import pytest

from signround.quant.gguf import gguf_type
from signround.quant.gguf_mixtures import (
    FALLBACK,
    MIXTURES,
    Category,
    ModelFacts,
    When,
    category,
    is_quantized,
    mixture,
    mixture_names,
    plan_types,
    tensor_nbytes,
    tensor_type,
)

ALL = ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q2_k_s", "q3_k_s", "q3_k_m", "q3_k_l"]
ALL += ["q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k"]
# use_more_bits for 32 layers: the first and last eighth (0-3, 28-31) and every third layer from 4 on (6, 9, ...)
MORE_BITS_32 = {0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31}


def llama(
    n_layer: int = 32,
    n_embd: int = 4096,
    n_ff: int = 11008,
    n_head: int = 32,
    n_head_kv: int = 32,
    vocab: int = 32000,
    tied: bool = False,
) -> tuple[dict[str, tuple[int, ...]], ModelFacts]:
    """A Llama's GGUF tensors ``{name: ne}`` (``ne[0]`` = row length) and its facts; 4096 / 32 / 32 is Llama-7B."""
    kv = n_embd // n_head * n_head_kv
    tensors: dict[str, tuple[int, ...]] = {"token_embd.weight": (n_embd, vocab)}
    if not tied:
        tensors["output.weight"] = (n_embd, vocab)
    tensors["output_norm.weight"] = (n_embd,)
    for i in range(n_layer):
        p = f"blk.{i}."
        tensors |= {
            p + "attn_norm.weight": (n_embd,),
            p + "attn_q.weight": (n_embd, n_embd),
            p + "attn_k.weight": (n_embd, kv),
            p + "attn_v.weight": (n_embd, kv),
            p + "attn_output.weight": (n_embd, n_embd),
            p + "ffn_norm.weight": (n_embd,),
            p + "ffn_gate.weight": (n_embd, n_ff),
            p + "ffn_up.weight": (n_embd, n_ff),
            p + "ffn_down.weight": (n_ff, n_embd),
        }
    return tensors, ModelFacts(n_layer=n_layer, n_head=n_head, n_head_kv=n_head_kv, tied_output=tied)


def layers_with(plan: dict[str, str], kind: str, type_name: str) -> set[int]:
    return {int(name.split(".")[1]) for name, t in plan.items() if f".{kind}." in name and t == type_name}


def by_kind(plan: dict[str, str], kind: str) -> set[str]:
    return {t for name, t in plan.items() if f".{kind}." in name}


def test_registry_names_and_errors() -> None:
    assert mixture_names() == ALL
    assert mixture("Q4_K_M") is MIXTURES["q4_k_m"]
    assert mixture(MIXTURES["q6_k"]) is MIXTURES["q6_k"]
    with pytest.raises(ValueError, match=r"unknown GGUF mixture 'q4_k_xl'; supported: q4_0, q4_1, .*q5_k_m, q6_k"):
        mixture("q4_k_xl")
    with pytest.raises(ValueError, match="supported: q4_0"):
        plan_types("iq2_xxs", {}, ModelFacts(1, 1, 1))
    # llama_ftype numbers (general.file_type) are distinct, and each base type is one quant/gguf.py knows
    assert len({m.file_type for m in MIXTURES.values()}) == len(MIXTURES)
    for m in MIXTURES.values():
        assert gguf_type(m.base).name == m.base
        assert m.is_k_mixture == m.base.endswith("_k")


def test_q4_k_m_llama_7b() -> None:
    """The brief's example: attn_v / ffn_down q6_k on the use_more_bits layers, q4_k elsewhere, output q6_k."""
    tensors, facts = llama()
    plan = plan_types("q4_k_m", tensors, facts)
    assert list(plan) == list(tensors)  # input order
    for kind in ("attn_v", "ffn_down"):
        assert layers_with(plan, kind, "q6_k") == MORE_BITS_32
        assert layers_with(plan, kind, "q4_k") == set(range(32)) - MORE_BITS_32
    for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert by_kind(plan, kind) == {"q4_k"}
    assert by_kind(plan, "attn_norm") == by_kind(plan, "ffn_norm") == {"f32"}
    assert plan["output.weight"] == "q6_k"
    assert plan["token_embd.weight"] == "q4_k"  # untied: only looked up
    assert plan["output_norm.weight"] == "f32"
    assert {name: tensor_type("q4_k_m", name, ne, facts) for name, ne in tensors.items()} == plan


@pytest.mark.parametrize(
    ("name", "attn_v", "ffn_down", "attn_output", "rest"),
    [
        ("q2_k", {"q3_k": set(range(32))}, {"q3_k": set(range(32))}, "q3_k", "q2_k"),
        ("q2_k_s", {}, {"q4_k": {0, 1, 2, 3}}, "q2_k", "q2_k"),
        ("q3_k_s", {}, {}, "q3_k", "q3_k"),
        (
            "q3_k_m",
            {"q5_k": {0, 1}, "q4_k": set(range(2, 32))},
            {"q5_k": {0, 1}, "q4_k": set(range(2, 32))},
            "q4_k",
            "q3_k",
        ),
        ("q3_k_l", {"q5_k": set(range(32))}, {"q5_k": set(range(32))}, "q5_k", "q3_k"),
        ("q4_k_s", {"q5_k": {0, 1, 2, 3}}, {"q5_k": {0, 1, 2, 3}}, "q4_k", "q4_k"),
        ("q4_k_m", {"q6_k": MORE_BITS_32}, {"q6_k": MORE_BITS_32}, "q4_k", "q4_k"),
        ("q5_k_s", {}, {}, "q5_k", "q5_k"),
        ("q5_k_m", {"q6_k": MORE_BITS_32}, {"q6_k": MORE_BITS_32}, "q5_k", "q5_k"),
        ("q6_k", {}, {}, "q6_k", "q6_k"),
        ("q4_0", {}, {}, "q4_0", "q4_0"),
        ("q5_1", {}, {}, "q5_1", "q5_1"),
        ("q8_0", {}, {}, "q8_0", "q8_0"),
    ],
)
def test_every_mixture_on_llama_7b(name: str, attn_v: dict, ffn_down: dict, attn_output: str, rest: str) -> None:
    tensors, facts = llama()
    plan = plan_types(name, tensors, facts)
    for kind, bumped in (("attn_v", attn_v), ("ffn_down", ffn_down)):
        for type_name, layers in bumped.items():
            assert layers_with(plan, kind, type_name) == layers, (kind, type_name)
        assert layers_with(plan, kind, rest) == set(range(32)) - set().union(*bumped.values()), kind
    assert by_kind(plan, "attn_output") == {attn_output}
    assert by_kind(plan, "attn_q") == by_kind(plan, "ffn_up") == by_kind(plan, "ffn_gate") == {rest}
    assert plan["output.weight"] == ("q8_0" if name == "q8_0" else "q6_k")
    assert plan["token_embd.weight"] == rest


def test_gqa_lifts_low_bit_attn_v() -> None:
    """With 4 query heads per KV head (Llama-3-8B), q2_k / q2_k_s store the small V projection in q4_k."""
    tensors, facts = llama(n_ff=14336, n_head_kv=8, vocab=128256)
    assert facts.n_gqa == 4
    for name in ("q2_k", "q2_k_s"):
        assert by_kind(plan_types(name, tensors, facts), "attn_v") == {"q4_k"}
    tensors, facts = llama(n_head_kv=16)  # n_gqa 2: no lift
    assert by_kind(plan_types("q2_k", tensors, facts), "attn_v") == {"q3_k"}
    assert by_kind(plan_types("q2_k_s", tensors, facts), "attn_v") == {"q2_k"}


def test_tied_embeddings_are_the_output() -> None:
    tensors, facts = llama(n_layer=8, tied=True)
    assert "output.weight" not in tensors
    assert plan_types("q4_k_m", tensors, facts)["token_embd.weight"] == "q6_k"
    assert plan_types("q8_0", tensors, facts)["token_embd.weight"] == "q8_0"
    # plan_types decides tied-ness from the tensor list, as llama.cpp does, whatever the facts say
    untied, _ = llama(n_layer=8)
    assert plan_types("q4_k_m", untied, facts)["token_embd.weight"] == "q4_k"
    assert tensor_type("q4_k_m", "token_embd.weight", (4096, 32000), facts) == "q6_k"


def test_rows_not_multiple_of_256_fall_back() -> None:
    """A SmolLM2-135M-shaped model: 576-wide rows do not fit 256-blocks; the 1536-wide ffn_down rows do."""
    tensors, facts = llama(n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, vocab=49152, tied=True)
    expect_576 = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
    assert expect_576 == FALLBACK
    for name in ALL:
        m = MIXTURES[name]
        plan = plan_types(name, tensors, facts)
        assert by_kind(plan, "attn_q") == {expect_576.get(m.base, m.base)}, name
        assert by_kind(plan, "ffn_up") == {expect_576.get(m.base, m.base)}, name
        # the logits matrix: the base type's blocks do not fit -> q8_0 (legacy bases: q6_k, which falls back too)
        assert plan["token_embd.weight"] == "q8_0", name
        # 1536 = 6 * 256: ffn_down keeps the K types and their per-layer bumps
        assert not by_kind(plan, "ffn_down") - {"q2_k", "q3_k", "q4_k", "q5_k", "q6_k", m.base}, name
    q4_k_m = plan_types("q4_k_m", tensors, facts)
    # 30 layers: first / last eighth are 0-2 and 27-29 (7 * 30 // 8 = 26, so 26 too), every third from 3 on
    more_bits = {0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29}
    assert layers_with(q4_k_m, "ffn_down", "q6_k") == more_bits
    assert layers_with(q4_k_m, "attn_v", "q8_0") == more_bits  # q6_k, then the 576-row fallback
    assert layers_with(q4_k_m, "attn_v", "q5_0") == set(range(30)) - more_bits
    q3_k_m = plan_types("q3_k_m", tensors, facts)
    assert layers_with(q3_k_m, "attn_v", "q5_1") == {0, 1}  # q5_k -> q5_1
    assert layers_with(q3_k_m, "attn_output", "q5_0") == set(range(30))  # q4_k -> q5_0


def test_rows_not_multiple_of_32_become_f16() -> None:
    """stories260K's MLP is 172 wide: its ffn_down rows fit no block at all."""
    tensors, facts = llama(n_layer=5, n_embd=64, n_ff=172, n_head=8, n_head_kv=4, vocab=512, tied=True)
    for name in ALL:
        plan = plan_types(name, tensors, facts, source_types="f16")
        assert by_kind(plan, "ffn_down") == {"f16"}, name
        assert by_kind(plan, "attn_norm") == {"f16"}  # not quantized: keeps its (here: declared) input type
    assert tensor_type("q4_0", "output.weight", (100, 512), facts) == "f16"  # q8_0 does not fit 100 either


def test_one_dimensional_and_never_quantized_tensors_keep_their_type() -> None:
    facts = ModelFacts(n_layer=4, n_head=8, n_head_kv=8)
    kept = {
        "blk.0.attn_norm.weight": (4096,),
        "blk.0.attn_q.bias": (4096,),
        "blk.0.ffn_gate_inp_shexp.weight": (4096, 1),  # trailing 1: a 1-D tensor for ggml
        "blk.0.ffn_gate_inp.weight": (4096, 8),  # MoE router
        "position_embd.weight": (4096, 2048),
        "token_types.weight": (4096, 2),
        "blk.0.ssm_conv1d.weight": (4, 8192),
        "blk.0.time_mix_w1.weight": (4096, 160),
        "blk.0.attn_rel_b.weight": (32, 32),
        "v.position_embd.weight": (1024, 577),
        "rope_freqs": (64, 2),  # does not end in "weight"
    }
    for name, ne in kept.items():
        assert not is_quantized(name, ne), name
        assert tensor_type("q4_k_m", name, ne, facts) == "f32"
        assert tensor_type("q4_k_m", name, ne, facts, source_type="bf16") == "bf16"
    assert is_quantized("blk.0.attn_q.weight", (4096, 4096, 1))


def test_categories() -> None:
    assert category("blk.0.attn_qkv.weight") is Category.ATTN_V  # fused: carries the value projection
    assert category("blk.0.attn_kv_b.weight") is Category.ATTN_V
    assert category("blk.3.ffn_down_exps.weight") is Category.FFN_DOWN
    assert category("blk.3.ffn_gate_shexp.weight") is Category.FFN_GATE
    assert category("per_layer_token_embd.weight") is Category.TOKEN_EMBD
    assert category("blk.0.attn_output.weight") is Category.ATTN_OUTPUT
    assert category("output_norm.weight") is Category.OTHER


def test_fused_qkv_follows_attn_v_rules() -> None:
    facts = ModelFacts(n_layer=32, n_head=32, n_head_kv=32)
    plan = {i: tensor_type("q4_k_m", f"blk.{i}.attn_qkv.weight", (3072, 9216), facts) for i in range(32)}
    assert {i for i, t in plan.items() if t == "q6_k"} == MORE_BITS_32


def moe_8(n_layer: int = 32) -> tuple[dict[str, tuple[int, ...]], ModelFacts]:
    """A Mixtral-8x7B-shaped model: 8 experts stored as 3-D tensors."""
    tensors, _ = llama(n_layer=n_layer, n_ff=14336, n_head_kv=8)
    for i in range(n_layer):
        for kind in ("ffn_gate", "ffn_up", "ffn_down"):
            ne = tensors.pop(f"blk.{i}.{kind}.weight")
            tensors[f"blk.{i}.{kind}_exps.weight"] = (*ne, 8)
        tensors[f"blk.{i}.ffn_gate_inp.weight"] = (4096, 8)
    return tensors, ModelFacts(n_layer=n_layer, n_head=32, n_head_kv=8, n_expert=8)


def test_eight_experts() -> None:
    tensors, facts = moe_8()
    q4_k_m = plan_types("q4_k_m", tensors, facts)
    assert by_kind(q4_k_m, "attn_v") == by_kind(q4_k_m, "attn_k") == {"q8_0"}
    assert by_kind(q4_k_m, "attn_output") == {"q5_k"}
    assert layers_with(q4_k_m, "ffn_down_exps", "q6_k") == MORE_BITS_32  # layer read from the name
    assert by_kind(q4_k_m, "ffn_gate_exps") == by_kind(q4_k_m, "ffn_up_exps") == {"q4_k"}
    assert by_kind(q4_k_m, "ffn_gate_inp") == {"f32"}
    # the 8-expert branch replaces the dense one: q3_k_l is not in its list and keeps the base type
    assert by_kind(plan_types("q3_k_l", tensors, facts), "attn_output") == {"q3_k"}
    assert by_kind(plan_types("q5_k_m", tensors, facts), "attn_output") == {"q5_k"}  # not in the 8-expert list
    assert by_kind(plan_types("q2_k_s", tensors, facts), "attn_output") == {"q2_k"}
    with pytest.raises(ValueError, match="cannot tell its layer"):
        tensor_type("q4_k_m", "ffn_down_exps.weight", (14336, 4096, 8), facts)
    with pytest.raises(ValueError, match="cannot tell its layer"):
        tensor_type("q4_k_m", "blk.32.ffn_down_exps.weight", (14336, 4096, 8), facts)


def test_70b_attn_v() -> None:
    """Llama-2/3-70B (80 layers, 8 query heads per KV head): q3_k / q4_k attn_v become q5_k."""
    tensors, facts = llama(n_layer=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, vocab=128256)
    assert facts.is_70b
    assert not ModelFacts(n_layer=80, n_head=64, n_head_kv=64).is_70b  # Llama-65B: no GQA
    assert ModelFacts(n_layer=80, n_head=64, n_head_kv=64, arch="qwen2").is_70b
    assert by_kind(plan_types("q3_k_s", tensors, facts), "attn_v") == {"q5_k"}
    assert by_kind(plan_types("q4_k_m", tensors, facts), "attn_v") == {"q5_k", "q6_k"}
    assert by_kind(plan_types("q2_k", tensors, facts), "attn_v") == {"q5_k"}  # q4_k (GQA) -> q5_k
    assert by_kind(plan_types("q5_k_s", tensors, facts), "attn_v") == {"q5_k"}


def test_falcon() -> None:
    facts = ModelFacts(n_layer=32, n_head=71, n_head_kv=1, arch="falcon")
    assert tensor_type("q4_k_m", "output.weight", (4608, 65024), facts) == "q8_0"
    down = {i: tensor_type("q4_k_m", f"blk.{i}.ffn_down.weight", (18432, 4608), facts) for i in range(32)}
    assert {i for i, t in down.items() if t == "q6_k"} == {0, 1}  # first sixteenth
    assert {i for i, t in down.items() if t == "q5_k"} == MORE_BITS_32 - {0, 1}
    assert tensor_type("q3_k_l", "blk.5.attn_output.weight", (4608, 4608), facts) == "q4_k"
    assert tensor_type("q3_k_m", "blk.5.attn_output.weight", (4608, 4608), facts) == "q3_k"
    assert tensor_type("q4_k_s", "blk.0.ffn_down.weight", (18432, 4608), facts) == "q4_k"


def test_imatrix_guards_first_ffn_down_of_q4_0_and_q5_0() -> None:
    tensors, facts = llama()
    for name, guarded in (("q4_0", "q4_1"), ("q5_0", "q5_1")):
        assert layers_with(plan_types(name, tensors, facts, imatrix=True), "ffn_down", guarded) == {0, 1, 2, 3}
        assert by_kind(plan_types(name, tensors, facts), "ffn_down") == {name}
    assert by_kind(plan_types("q4_k_m", tensors, facts, imatrix=True), "ffn_down") == {"q4_k", "q6_k"}


def test_positions_count_attn_v_tensors_not_blocks() -> None:
    """A hybrid model with attention in every 4th block: llama.cpp's attn_v position is its index among the 4
    attn_v tensors, so use_more_bits of 4 marks the 3rd and 4th (blocks 11 and 15), not blocks 0-1 and 14-15."""
    tensors, facts = llama(n_layer=16, n_embd=256, n_ff=512, n_head=4, n_head_kv=4, vocab=512)
    for i in range(16):
        if i % 4 != 3:
            for kind in ("attn_q", "attn_k", "attn_v", "attn_output"):
                del tensors[f"blk.{i}.{kind}.weight"]
    plan = plan_types("q4_k_m", tensors, facts)
    assert layers_with(plan, "attn_v", "q6_k") == {11, 15}
    assert layers_with(plan, "attn_v", "q4_k") == {3, 7}
    assert When.MORE_BITS.holds(2, 4, facts) and When.MORE_BITS.holds(3, 4, facts)


def test_errors() -> None:
    facts = ModelFacts(n_layer=4, n_head=8, n_head_kv=8)
    with pytest.raises(ValueError, match="cannot tell its layer"):
        tensor_type("q4_k_m", "attn_v.weight", (4096, 4096), facts)
    with pytest.raises(ValueError, match="ne"):
        tensor_type("q4_k_m", "blk.0.attn_q.weight", (), facts)
    with pytest.raises(ValueError, match="ne"):
        tensor_type("q4_k_m", "blk.0.attn_q.weight", (4096, 0), facts)
    with pytest.raises(ValueError, match="no requantizing"):
        tensor_type("q4_k_m", "blk.0.attn_norm.weight", (4096,), facts, source_type="q8_0")
    with pytest.raises(ValueError, match="n_layer >= 1"):
        ModelFacts(n_layer=0, n_head=8, n_head_kv=8)


def test_tensor_nbytes() -> None:
    assert tensor_nbytes("q4_k", (4096, 4096)) == 4096 // 256 * 144 * 4096
    assert tensor_nbytes("q8_0", (576, 49152)) == 576 // 32 * 34 * 49152
    assert tensor_nbytes("q6_k", (14336, 4096, 8)) == 14336 // 256 * 210 * 4096 * 8
    assert tensor_nbytes("f32", (576,)) == 576 * 4
    assert tensor_nbytes("f16", (172, 64)) == 172 * 64 * 2
    with pytest.raises(ValueError, match="blocks of 256"):
        tensor_nbytes("q4_k", (576, 576))
    tensors, facts = llama(n_layer=30, n_embd=576, n_ff=1536, n_head=9, n_head_kv=3, vocab=49152, tied=True)
    for name in ALL:  # every planned type fits its tensor
        for tensor, t in plan_types(name, tensors, facts).items():
            assert tensor_nbytes(t, tensors[tensor]) > 0
