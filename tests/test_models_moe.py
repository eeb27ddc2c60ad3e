"""Mixture-of-experts models: fused experts become per-expert Linear layers that compute the same thing, carry the
on-disk names, see every token while statistics are collected, and run only on routed tokens otherwise."""

from __future__ import annotations

import pytest
import torch
from tiny_families import MOE, make_causal_lm, starve_experts
from torch import nn

from signround.models import LinearExperts, find_fused_experts, inventory, linear_experts, unfuse_experts
from signround.models.experts import observing_experts

IDS = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", sorted(MOE))
def test_unfused_experts_compute_what_the_fused_ones_did(family):
    model = make_causal_lm(family)
    with torch.no_grad():
        before = model(IDS).logits
    layouts = unfuse_experts(model)
    assert layouts, f"{family}: no fused experts found"
    assert not find_fused_experts(model), "every fused experts module is replaced"
    with torch.no_grad():
        after = model(IDS).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_gpt_oss_layout_interleaved_transposed_with_bias():
    model = make_causal_lm("gpt_oss")
    fused = next(iter(find_fused_experts(model).values()))
    gate_up, bias = fused.gate_up_proj.detach().clone(), fused.gate_up_proj_bias.detach().clone()
    layouts = unfuse_experts(model)
    layout = next(iter(layouts.values()))
    assert (layout.transposed, layout.concatenated, layout.has_bias) == (True, False, True)
    expert = next(iter(linear_experts(model).values()))[1]
    # interleaved columns: gate = even, up = odd columns of the transposed [hidden, 2*ffn] weight
    torch.testing.assert_close(expert.gate_proj.weight, gate_up[1][:, 0::2].t())
    torch.testing.assert_close(expert.up_proj.weight, gate_up[1][:, 1::2].t())
    torch.testing.assert_close(expert.up_proj.bias, bias[1][1::2])


@pytest.mark.parametrize(
    ("family", "names"),
    [
        ("mixtral", ("w1", "w3", "w2")),  # transformers' rule merges experts.*.w1 / w3 into gate_up_proj
        ("qwen3_moe", ("gate_proj", "up_proj", "down_proj")),
        ("deepseek_v3", ("gate_proj", "up_proj", "down_proj")),
        ("gpt_oss", ("gate_proj", "up_proj", "down_proj")),  # fused on disk: the default names
    ],
)
def test_per_expert_names_follow_the_checkpoint_conversion_rules(family, names):
    model = make_causal_lm(family)
    layouts = unfuse_experts(model)
    assert {layout.names for layout in layouts.values()} == {names}
    name, experts = next(iter(linear_experts(model).items()))
    assert isinstance(getattr(experts[0], names[0]), nn.Linear)
    assert f"{name}.0.{names[-1]}.weight" in model.state_dict()


def test_gate_up_down_naming_overrides_the_conversion_rules():
    """``moe_expert_names="gate_up_down"``: Mixtral's experts as gate_proj / up_proj / down_proj (Intel's loader),
    computing the same as under the original names; an unknown naming is refused."""
    model = make_causal_lm("mixtral")
    reference = make_causal_lm("mixtral")
    reference.load_state_dict(model.state_dict())
    layouts = unfuse_experts(model, naming="gate_up_down")
    assert {layout.names for layout in layouts.values()} == {("gate_proj", "up_proj", "down_proj")}
    unfuse_experts(reference)
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits)
    with pytest.raises(ValueError, match="moe_expert_names='w1' is not supported"):
        unfuse_experts(make_causal_lm("mixtral"), naming="w1")


def test_mixtral_per_expert_layers_are_views_of_the_fused_weights():
    """No copy of the experts while unfusing (the views keep the fused storage alive)."""
    model = make_causal_lm("mixtral")
    fused = next(iter(find_fused_experts(model).values()))
    ptr = fused.gate_up_proj.data_ptr()
    unfuse_experts(model)
    first = next(iter(linear_experts(model).values()))[0]
    assert first.w1.weight.data_ptr() == ptr


def test_routers_are_kept_in_16_bit_with_their_reason():
    model = make_causal_lm("qwen2_moe")
    unfuse_experts(model)
    inv = inventory(model)
    names = {name for name, _i, _o in inv.candidates}
    assert "model.layers.0.mlp.shared_expert_gate" not in names
    assert inv.kept["model.layers.0.mlp.shared_expert_gate"] == "router"
    assert "model.layers.0.mlp.experts.3.down_proj" in names
    assert "model.layers.0.mlp.shared_expert.down_proj" in names


def test_observing_feeds_every_token_to_experts_no_token_was_routed_to():
    model = make_causal_lm("mixtral")
    unfuse_experts(model)
    starve_experts(model, (0, 2))
    seen: dict[int, int] = {}
    experts = model.model.layers[0].mlp.experts
    for e in range(4):
        experts[e].w1.register_forward_hook(
            lambda _m, args, _o, e=e: seen.__setitem__(e, seen.get(e, 0) + len(args[0]))
        )
    with torch.no_grad():
        reference = model(IDS).logits
    assert set(seen) == {1, 3}, "outside observation, starved experts never run"
    seen.clear()
    with torch.no_grad(), observing_experts(model) as moe:
        observed = model(IDS).logits
    torch.testing.assert_close(observed, reference)  # outputs unchanged
    tokens = IDS.numel()
    assert seen[0] == tokens and seen[2] == tokens, "starved experts saw every token"
    counts = moe["model.layers.0.mlp.experts"].routed_tokens.tolist()
    assert counts[0] == counts[2] == 0
    assert counts[1] + counts[3] == 2 * tokens  # top-2 routing among the two left


def test_linear_experts_is_a_module_list_of_expert_mlps():
    model = make_causal_lm("qwen3_moe")
    unfuse_experts(model)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, LinearExperts) and len(experts) == 4
    assert not any(p.dim() == 3 for p in model.parameters())
