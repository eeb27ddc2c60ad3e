"""Sibling fusion (kernels/siblings.py): q/k/v and gate/up share one torch_int4 kernel call, bit-exactly."""

from __future__ import annotations

import pytest
import torch

import signround
import signround.kernels.siblings as siblings
from signround.kernels.torch import TorchQuantLinear
from signround.kernels.torch_int4 import TorchInt4QuantLinear, _FusedSiblings, kernel_available
from signround.layers import quant_linears
from signround.quant.int import quantize
from signround.schemes import LayerSpec

pytestmark = pytest.mark.skipif(kernel_available() is not None, reason=str(kernel_available()))

IN = 128


def _members(sizes, bits=(4, 4, 4), sym=True, bias=False, cls=TorchInt4QuantLinear):
    """Layers of ``sizes`` output rows over the same input, and an identical unfused set to compare against."""
    g = torch.Generator().manual_seed(sum(sizes))
    pairs = []
    for out_features, b in zip(sizes, bits, strict=False):
        qt = quantize(torch.randn(out_features, IN, generator=g) * 0.05, LayerSpec(bits=b, group_size=32, sym=sym))
        bias_t = torch.randn(out_features, generator=g) if bias else None
        pairs.append((cls.from_quantized(qt, "auto_round", bias_t, torch.float32),
                      cls.from_quantized(qt, "auto_round", bias_t, torch.float32)))  # fmt: skip
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _bytes(layers) -> int:
    return sum(b.numel() * b.element_size() for m in layers for n, b in m.named_buffers() if n != "bias")


@pytest.mark.parametrize(
    ("sizes", "bits", "sym", "bias"),
    [
        ((128, 64, 64), (4, 4, 4), True, False),  # q/k/v with grouped kv heads
        ((192, 192), (4, 4), False, True),  # gate/up, asymmetric, with bias
        ((64, 128, 96), (4, 3, 2), True, False),  # mixed bits, the last member ends in a partial block
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_fused_members_equal_their_own_calls_bit_exactly(sizes, bits, sym, bias, dtype, rows) -> None:
    fused, alone = _members(sizes, bits, sym, bias)
    before = _bytes(fused)
    assert TorchInt4QuantLinear.fuse_siblings(fused)
    assert all(m._siblings is fused[0]._siblings for m in fused)
    # one copy: the members' buffers are views of the group's tensors, and no byte is added
    assert _bytes(fused) == before
    storage = fused[0]._siblings.weight.untyped_storage().data_ptr()
    assert all(m.int4_weight.untyped_storage().data_ptr() == storage for m in fused)
    x = torch.randn(rows, 3, IN, dtype=dtype, generator=torch.Generator().manual_seed(7))
    with torch.inference_mode():
        for f, a in zip(fused, alone, strict=True):
            got, expected = f(x), a(x)
            assert got.shape == expected.shape and got.dtype == dtype and got.is_contiguous()
            assert torch.equal(got, expected)
    # saving reads the codes back through the views: the checkpoint tensors are unchanged
    for f, a in zip(fused, alone, strict=True):
        sd_f, sd_a = f.state_dict(), a.state_dict()
        assert sd_f.keys() == sd_a.keys() and all(torch.equal(sd_f[k], sd_a[k]) for k in sd_a)


def test_only_whole_64_row_blocks_before_the_last_member_fuse() -> None:
    fused, _ = _members((96, 64))
    assert not TorchInt4QuantLinear.fuse_siblings(fused)
    assert all(m._siblings is None for m in fused)


def test_other_backends_and_mixed_sets_decline() -> None:
    ref, _ = _members((64, 64), cls=TorchQuantLinear)
    assert not TorchQuantLinear.fuse_siblings(ref)
    int4, _ = _members((64, 64))
    assert not TorchInt4QuantLinear.fuse_siblings([int4[0], ref[1]])


def test_a_member_called_with_another_input_gets_its_own_rows_and_the_group_gives_up() -> None:
    fused, alone = _members((64, 64))
    assert TorchInt4QuantLinear.fuse_siblings(fused)
    group = fused[0]._siblings
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for step in range(_FusedSiblings.MAX_MISSES + 2):  # cross-attention style: different inputs per member
            x, c = torch.randn(1, IN, generator=g), torch.randn(1, IN, generator=g)
            assert torch.equal(fused[0](x), alone[0](x)), step
            assert torch.equal(fused[1](c), alone[1](c)), step
            assert torch.equal(fused[0](x), alone[0](x)), step  # the same member twice: a fresh product
    assert not group.enabled
    assert all(m._siblings is None and m.scales_offsets.is_contiguous() for m in fused)
    with torch.inference_mode():
        x = torch.randn(2, IN, generator=g)
        assert all(torch.equal(f(x), a(x)) for f, a in zip(fused, alone, strict=True))


def _fusable_llama():
    """A random Llama whose k/v (64 rows) and gate/up fill whole 64-row blocks."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@torch.inference_mode()
def _greedy_logits(model, prompt: torch.Tensor, steps: int = 4) -> torch.Tensor:
    out = model(prompt, use_cache=True)
    cache, token, logits = out.cache, out.logits[:, -1:].argmax(-1), [out.logits[:, -1]]
    for _ in range(steps):
        out = model(token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        logits.append(out.logits[:, -1])
    return torch.cat(logits)


def _fused_count(model) -> int:
    return sum(1 for m in quant_linears(model).values() if getattr(m, "_siblings", None) is not None)


def test_loaded_and_in_memory_models_fuse_and_equal_unfused(tmp_path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    ar = signround.AutoRound(_fusable_llama(), None, bits=4, group_size=32, iters=0, disable_opt_rtn=True,
                             show_progress=False)  # fmt: skip
    ckpt = ar.quantize_and_save(tmp_path / "q", format="auto_round")
    assert _fused_count(ar.model) == 2 * 5  # in memory after packing: q/k/v + gate/up per block
    fused = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    assert _fused_count(fused) == 2 * 5
    monkeypatch.setattr(siblings, "SIBLING_SETS", ())
    alone = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    assert _fused_count(alone) == 0
    prompt = torch.arange(1, 201).view(1, -1)  # 200 rows: the dense path first, then one-row decode steps
    assert torch.equal(_greedy_logits(fused, prompt), _greedy_logits(alone, prompt))
    batch = torch.arange(1, 25).view(3, 8)
    assert torch.equal(_greedy_logits(fused, batch), _greedy_logits(alone, batch))
    fused.save_pretrained(tmp_path / "again")
    sd_f, sd_a = fused.state_dict(), alone.state_dict()
    assert sd_f.keys() == sd_a.keys() and all(torch.equal(sd_f[k], sd_a[k]) for k in sd_a)
