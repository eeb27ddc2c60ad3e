"""Norm tuning (``enable_norm_bias_tuning``): the block's norm weights move with the rounding, within half a step."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from signround.quant.int import dequantize
from signround.schemes import LayerSpec
from signround.tuning.block import TuneOptions, clamp_after_step, run_block, tune_block
from signround.tuning.inputs import capture_block_inputs
from signround.tuning.norms import TunableNorm, norm_modules
from signround.tuning.rtn import plain_rtn_params


def _setup(tiny_llama_factory):
    model = tiny_llama_factory(seed=1, initializer_range=0.2)
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():  # norm weights of different sizes per channel, as trained models have
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(2))
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, ids)
    return block, inputs, run_block(block, inputs, 8)


def _layers(block, spec):
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    return {n: (m, spec, plain_rtn_params(m.weight, spec)) for n, m in linears.items()}


def test_the_blocks_norms_are_found_and_the_linears_are_not(tiny_llama) -> None:
    block = tiny_llama.model.layers[0]
    found = norm_modules(block, {"self_attn.q_proj"})
    assert set(found) == {"input_layernorm", "post_attention_layernorm"}
    assert norm_modules(block, {"input_layernorm"}).keys() == {"post_attention_layernorm"}


def test_a_tunable_norm_at_its_start_is_the_norm_and_moves_at_most_half_a_step() -> None:
    norm = nn.LayerNorm(64)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 64))
    x = torch.randn(3, 5, 64)
    tn = TunableNorm(norm, bits=2, group_size=32)
    assert torch.equal(tn(x), norm(x))
    with torch.no_grad():
        tn.v.fill_(3.0)
    clamp_after_step({}, {"norm": tn})
    moved = tn.weight_of(tn.v) - norm.weight
    step = (norm.weight.view(2, 32).amax(-1) - norm.weight.view(2, 32).amin(-1)) / 3  # per group of 32, 2 bits
    assert torch.allclose(moved.view(2, 32), 0.5 * step[:, None].expand(2, 32))
    with tn.judging(torch.zeros(64)):
        assert torch.equal(tn(x), norm(x))  # a judged candidate, not the live v


def test_tuning_moves_the_norms_and_the_block_computes_what_was_judged(tiny_llama_factory) -> None:
    """The kept norm weights are written into the block's own norms, and the block then reproduces the reported
    final loss and the outputs fed to the next block."""
    block, inputs, targets = _setup(tiny_llama_factory)
    spec = LayerSpec(bits=2, group_size=32)
    before = {n: m.weight.clone() for n, m in norm_modules(block, set()).items()}
    with torch.enable_grad():
        options = TuneOptions(iters=20, batch_size=4, show_progress=False, amp=False)
        result = tune_block(block, _layers(block, spec), inputs, targets, options)
    assert result.best_iter != -1 and set(result.norms) == set(before)
    for name, module in norm_modules(block, set()).items():
        assert type(module) is not TunableNorm
        assert not torch.equal(module.weight, before[name]), f"{name} did not move"
    for name, q in result.quantized.items():
        assert torch.equal(block.get_submodule(name).weight, dequantize(q))
    out = run_block(block, inputs, 8)
    assert torch.allclose(out, result.outputs, rtol=1e-5, atol=1e-6)
    relative = ((out - targets).square() / targets.square().mean(-1, keepdim=True)).mean().item()
    assert relative == pytest.approx(result.final_loss, rel=1e-5)


def test_the_norms_lower_the_loss_beyond_the_rounding_alone(tiny_llama_factory) -> None:
    """Same start, seed and steps, with and without the norms: the norms' steps reach a lower whole-set loss."""
    spec = LayerSpec(bits=2, group_size=32)
    finals = {}
    for norms in (False, True):
        block, inputs, targets = _setup(tiny_llama_factory)
        with torch.enable_grad():
            options = TuneOptions(iters=30, batch_size=4, show_progress=False, amp=False, enable_norm_bias_tuning=norms)
            finals[norms] = tune_block(block, _layers(block, spec), inputs, targets, options).final_loss
    assert finals[True] < finals[False]


def test_without_norm_tuning_the_norms_stay(tiny_llama_factory) -> None:
    block, inputs, targets = _setup(tiny_llama_factory)
    before = copy.deepcopy({n: m.weight for n, m in norm_modules(block, set()).items()})
    with torch.enable_grad():
        options = TuneOptions(iters=5, batch_size=4, show_progress=False, amp=False, enable_norm_bias_tuning=False)
        result = tune_block(block, _layers(block, LayerSpec(bits=2, group_size=32)), inputs, targets, options)
    assert result.norms == {}
    for name, module in norm_modules(block, set()).items():
        assert torch.equal(module.weight, before[name])
