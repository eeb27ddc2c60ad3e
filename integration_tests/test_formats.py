"""Every export format, end to end: one tuning run -> several formats -> each loads back with identical logits."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import signround
from signround import AutoRoundConfig
from signround.layers import quant_linears

SYM_FORMATS = ["auto_round", "auto_gptq", "llm_compressor"]
ASYM_FORMATS = ["auto_round", "auto_gptq", "auto_awq", "llm_compressor"]
QUANT_METHODS = {
    "auto_round": "auto-round",
    "auto_gptq": "gptq",
    "auto_awq": "awq",
    "llm_compressor": "compressed-tensors",
}


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    ("bits", "group_size", "sym", "formats"),
    [
        (4, 32, True, SYM_FORMATS),
        (4, 64, False, ASYM_FORMATS),
        (3, 32, True, ["auto_gptq", "llm_compressor"]),
        (2, -1, False, ["auto_gptq", "llm_compressor"]),
        (8, 32, True, ["auto_gptq", "llm_compressor"]),
    ],
)
def test_multi_format_export_loads_back_identically(tmp_path, tiny_llama_dir, bits, group_size, sym, formats) -> None:
    ar = signround.AutoRound(
        str(tiny_llama_dir), bits=bits, group_size=group_size, sym=sym, iters=0, disable_opt_rtn=True,
        show_progress=False,
    )  # fmt: skip
    ar.quantize()
    expected = _logits(ar.model)  # the tuned model in memory (dequantized Linear weights)
    out = ar.save_quantized(tmp_path / "out", format=",".join(formats))
    assert sorted(p.name for p in out.iterdir()) == sorted(formats)  # one sub-directory per format
    for fmt in formats:
        qc = json.loads((out / fmt / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == QUANT_METHODS[fmt], fmt
        # the torch backend is the exact reference (the CPU default for 4-bit, torch_int4, computes in bf16)
        reloaded = AutoModelForCausalLM.from_pretrained(out / fmt, quantization_config=AutoRoundConfig(backend="torch"))
        assert len(quant_linears(reloaded)) == 14, fmt
        assert torch.equal(_logits(reloaded), expected), fmt


def test_gptq_checkpoint_config_keys(tmp_path, tiny_llama_dir) -> None:
    ar = signround.AutoRound(str(tiny_llama_dir), iters=0, disable_opt_rtn=True, group_size=32, show_progress=False)
    out = ar.quantize_and_save(tmp_path / "g", format="auto_gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("bits", "group_size", "sym", "desc_act", "checkpoint_format")} == {
        "bits": 4, "group_size": 32, "sym": True, "desc_act": False, "checkpoint_format": "gptq",
    }  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        g_idx = f.get_tensor("model.layers.0.self_attn.q_proj.g_idx")
        qzeros = f.get_tensor("model.layers.0.self_attn.q_proj.qzeros")
    assert torch.equal(g_idx, torch.arange(g_idx.numel(), dtype=torch.int32) // 32)
    # v1 stores the symmetric zero point 8 minus one: every nibble 7
    assert bool((qzeros == 0x77777777).all())


def test_format_that_cannot_hold_the_scheme_fails_before_tuning(tmp_path, tiny_llama_dir, monkeypatch) -> None:
    from signround.tuning import engine

    monkeypatch.setattr(engine, "run", lambda *a, **k: pytest.fail("tuning must not start"))
    ar = signround.AutoRound(str(tiny_llama_dir), iters=5, sym=True, show_progress=False)
    with pytest.raises(ValueError, match=r"format 'auto_awq' cannot hold the scheme.*sym=False"):
        ar.quantize_and_save(tmp_path / "x", format="auto_round,auto_awq")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("source", "targets"), [("auto_awq", ["auto_gptq", "auto_round"]), ("auto_gptq", ["llm_compressor"])]
)
def test_loaded_checkpoint_resaves_in_other_formats_without_tuning(tmp_path, tiny_llama_dir, source, targets) -> None:
    ar = signround.AutoRound(
        str(tiny_llama_dir), bits=4, group_size=32, sym=False, iters=0, disable_opt_rtn=True, show_progress=False
    )
    src = ar.quantize_and_save(tmp_path / "src", format=source)
    loaded = AutoModelForCausalLM.from_pretrained(src, quantization_config=AutoRoundConfig())
    expected = _logits(loaded)
    out = signround.AutoRound.from_quantized(src).save_quantized(tmp_path / "out", format=",".join(targets))
    for fmt in targets:
        target = out / fmt if len(targets) > 1 else out
        again = AutoModelForCausalLM.from_pretrained(target, quantization_config=AutoRoundConfig())
        assert len(quant_linears(again)) == 14, fmt
        assert torch.equal(_logits(again), expected), fmt


# -- broken foreign checkpoints: an error naming the layer and the reason, never silently wrong logits --------------
def _export(tmp_path, tiny_llama_dir, fmt: str, sym: bool):
    ar = signround.AutoRound(
        str(tiny_llama_dir), bits=4, group_size=32, sym=sym, iters=0, disable_opt_rtn=True, show_progress=False
    )
    return ar.quantize_and_save(tmp_path / fmt, format=fmt)


def _edit(path, edit) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


LAYER = "model.layers.1.mlp.up_proj"


@pytest.mark.parametrize(
    ("fmt", "sym", "tensor"),
    [("auto_gptq", True, "g_idx"), ("auto_awq", False, "qzeros"), ("llm_compressor", False, "weight_zero_point")],
)
def test_missing_tensor_in_foreign_format_names_the_layer(tmp_path, tiny_llama_dir, fmt, sym, tensor) -> None:
    path = _export(tmp_path, tiny_llama_dir, fmt, sym)
    _edit(path, lambda t: t.pop(f"{LAYER}.{tensor}"))
    with pytest.raises(ValueError, match=rf"layer '{LAYER}'.*{tensor}.*missing"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=AutoRoundConfig())


def test_act_order_gptq_checkpoint_is_refused(tmp_path, tiny_llama_dir) -> None:
    path = _export(tmp_path, tiny_llama_dir, "auto_gptq", True)

    def permute(tensors):
        tensors[f"{LAYER}.g_idx"] = tensors[f"{LAYER}.g_idx"].flip(0).contiguous()

    _edit(path, permute)
    with pytest.raises(ValueError, match="act-order"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=AutoRoundConfig())


def test_weight_shape_mismatch_is_refused(tmp_path, tiny_llama_dir) -> None:
    path = _export(tmp_path, tiny_llama_dir, "llm_compressor", True)

    def reshape(tensors):
        tensors[f"{LAYER}.weight_shape"] = torch.tensor([64, 64], dtype=torch.int64)

    _edit(path, reshape)
    with pytest.raises(ValueError, match=r"weight_shape \[64, 64\] does not match"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=AutoRoundConfig())
