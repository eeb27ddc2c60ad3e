"""The architecture coverage matrix: every family tunes, saves, reloads with equal logits, and has >= 95 % of its
decoder-block weight elements quantized — counted from the saved safetensors, not from the plan."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_families import DENSE, MOE, OTHER, VLM, make_causal_lm, make_vlm, starve_experts

import signround
from signround import AutoRound
from signround.models.families import ROUTER_LEAF_NAMES

IDS = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(1))
BLOCK = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.\d+\.")
NONTEXT = ("vision", "visual", "audio")


def _tune(model, stories_dir: Path, shakespeare: Path, **kwargs) -> AutoRound:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stories_dir)
    options = dict(bits=4, group_size=32, iters=2, nsamples=4, seqlen=32, batch_size=2, dataset=str(shakespeare))
    ar = AutoRound(model, tokenizer, show_progress=False, **{**options, **kwargs})
    ar.quantize()
    return ar


def quantized_share(out: Path) -> tuple[float, list[str]]:
    """Share of decoder-block Linear weight elements stored quantized, and the 16-bit block weights left."""
    quantized, kept, kept_names = 0, 0, []
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (a safetensors handle is not iterable)
                if not BLOCK.search(name) or any(t in name for t in NONTEXT):
                    continue
                layer, _, tensor = name.rpartition(".")
                shape = f.get_slice(name).get_shape()
                if tensor == "scales":  # [in / group, out] per layer
                    quantized += shape[0] * shape[1] * 32
                elif tensor == "weight" and len(shape) >= 2 and layer.rpartition(".")[2] not in ROUTER_LEAF_NAMES:
                    kept += int(torch.Size(shape).numel())
                    kept_names.append(name)
    return quantized / max(quantized + kept, 1), kept_names


FAMILIES = sorted(DENSE) + sorted(MOE) + sorted(OTHER)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_tunes_saves_reloads_and_is_quantized(family, tmp_path, stories_dir, shakespeare):
    from transformers import AutoModelForCausalLM

    ar = _tune(make_causal_lm(family), stories_dir, shakespeare)
    out = ar.save_quantized(tmp_path / family)
    with torch.no_grad():
        in_memory = ar.model(IDS).logits
    share, kept = quantized_share(out)
    assert share >= 0.95, f"{family}: only {share:.1%} of block weights quantized; 16-bit: {kept[:6]}"
    reloaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=signround.AutoRoundConfig())
    with torch.no_grad():
        logits = reloaded(IDS).logits
    torch.testing.assert_close(logits, in_memory, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(VLM))
def test_vlm_text_decoder_tunes_saves_reloads(family, tmp_path, stories_dir, shakespeare):
    """Text-only calibration of a vision-language model; its legacy on-disk names reload through transformers'
    renaming (``language_model.model.layers`` -> ``model.language_model.layers``)."""
    from transformers import AutoModelForImageTextToText

    ar = _tune(make_vlm(family), stories_dir, shakespeare)
    out = ar.save_quantized(tmp_path / family)
    with torch.no_grad():
        in_memory = ar.model(input_ids=IDS).logits
    share, kept = quantized_share(out)
    assert share >= 0.95, f"{family}: only {share:.1%} of block weights quantized; 16-bit: {kept[:6]}"
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=IDS).logits, in_memory, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", ["auto_gptq", "auto_awq", "llm_compressor"])
@pytest.mark.parametrize("family", ["mixtral", "gpt2", "gpt_oss"])
def test_moe_and_conv1d_in_every_format(family, fmt, tmp_path, stories_dir, shakespeare):
    from transformers import AutoModelForCausalLM

    ar = _tune(make_causal_lm(family), stories_dir, shakespeare, sym=fmt != "auto_awq", iters=0)
    out = ar.save_quantized(tmp_path / fmt, format=fmt)
    with torch.no_grad():
        in_memory = ar.model(IDS).logits
    reloaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=signround.AutoRoundConfig())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, in_memory, rtol=1e-4, atol=1e-4)
    names = set()
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            names.update(f.keys())
    if family == "mixtral":  # per-expert tensors under the original checkpoint's names
        assert any(n.startswith("model.layers.1.block_sparse_moe.experts.3.w2.") for n in names)
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) for n in names)


def test_starved_experts_are_quantized_and_reported(tmp_path, stories_dir, shakespeare, caplog):
    """A router that never picks experts 0 and 2: they are quantized anyway (from statistics of every token), the
    run names them, and tuning never runs them (time grows with routed tokens, not experts x tokens)."""
    import logging

    from signround.models import unfuse_experts

    model = make_causal_lm("mixtral")
    assert starve_experts(model, (0, 2)) == 2
    unfuse_experts(model)
    rows: dict[str, int] = {}
    for name, module in model.named_modules():
        if re.search(r"experts\.\d+$", name):
            module.register_forward_hook(
                lambda _m, args, _o, name=name: rows.__setitem__(name, rows.get(name, 0) + args[0].shape[0])
            )
    with caplog.at_level(logging.INFO, logger="signround"):
        ar = _tune(model, stories_dir, shakespeare, iters=4)
    report = ar.result.report
    starved = sorted(f"model.layers.{i}.mlp.experts.{e}" for i in range(2) for e in (0, 2))
    assert sorted(report.experts_without_tokens) == starved
    assert report.experts_on_data == 4
    assert "4 of 8 tuned on routed calibration tokens; 4 got none" in caplog.text
    tokens = 4 * 32
    for name in starved:  # the observation pass of the fp stream only: every token once
        assert rows[name] == tokens, (name, rows[name])
    routed = [n for n in rows if n not in starved]
    assert all(rows[n] > tokens for n in routed)  # the 4 iterations ran them again and again
    for name in starved:
        for proj in ("w1", "w2", "w3"):
            assert f"{name}.{proj}" in {**report.quantized, **report.packed}  # (packed per block: low_cpu_mem_usage)
    out = ar.save_quantized(tmp_path / "starved")
    assert quantized_share(out)[0] == 1.0


def test_a_plan_that_quantizes_nothing_is_an_error(stories_dir, shakespeare):
    model = make_causal_lm("llama")
    with pytest.raises(ValueError, match="no layer of LlamaForCausalLM can be quantized"):
        _tune(model, stories_dir, shakespeare, layer_config={r".*": 16})


def test_moe_quantize_on_load_saves_and_reloads(tmp_path, stories_dir, shakespeare):
    """``from_pretrained(fp_dir, quantization_config=...)`` of an MoE model quantizes its experts while loading,
    and ``save_pretrained`` writes what reloads with the same logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp_dir, out = tmp_path / "fp", tmp_path / "q"
    make_causal_lm("qwen3_moe").save_pretrained(fp_dir)
    AutoTokenizer.from_pretrained(stories_dir).save_pretrained(fp_dir)
    config = signround.AutoRoundConfig(
        bits=4, group_size=32, iters=2, nsamples=4, seqlen=32, batch_size=2, dataset=str(shakespeare)
    )
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=config)
    assert type(model.model.layers[0].mlp.experts[3].down_proj).__name__.endswith("QuantLinear")
    with torch.no_grad():
        in_memory = model(IDS).logits
    model.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded.model.layers[0].mlp.experts[3].down_proj).__name__.endswith("QuantLinear")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, in_memory, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def qwen3_moe_checkpoint(tmp_path_factory, stories_dir, shakespeare) -> Path:
    ar = _tune(make_causal_lm("qwen3_moe"), stories_dir, shakespeare, iters=0)
    return ar.save_quantized(tmp_path_factory.mktemp("moe") / "q")


def _edited_copy(src: Path, dst: Path, drop: str | None = None, add: str | None = None) -> Path:
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    if drop is not None:
        del tensors[drop]
    if add is not None:
        tensors[add] = torch.zeros(4, 4)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"drop": "model.layers.0.mlp.experts.1.up_proj.scales"}, r"up_proj'.*\['scales'\] are missing"),
        ({"add": "model.layers.0.mlp.experts.9.down_proj.qweight"}, "no Linear for: model.layers.0.mlp.experts.9"),
        ({"add": "model.layers.1.mlp.experts.0.extra.weight"}, "no module of Qwen3MoeForCausalLM takes"),
    ],
)
def test_a_tensor_no_module_takes_or_a_module_without_its_tensors_is_an_error(
    qwen3_moe_checkpoint, tmp_path, edit, message
):
    from transformers import AutoModelForCausalLM

    broken = _edited_copy(qwen3_moe_checkpoint, tmp_path / "broken", **edit)
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(broken)


def test_experts_kept_in_16_bit_are_named_as_on_disk_and_reload(tmp_path, stories_dir, shakespeare):
    """``ignore_layers`` keeps expert 0 of every layer: its per-expert weights are saved in 16 bit, the config names
    them under both spellings (transformers 5's ``mlp`` and the checkpoint's ``block_sparse_moe``), and the model
    reloads with expert 0 as plain Linear layers next to quantized ones."""
    import json

    from transformers import AutoModelForCausalLM

    ar = _tune(make_causal_lm("mixtral"), stories_dir, shakespeare, ignore_layers="experts.0.")
    out = ar.save_quantized(tmp_path / "q")
    extra = json.loads((out / "config.json").read_text())["quantization_config"]["extra_config"]
    for name in ("model.layers.1.mlp.experts.0.w2", "model.layers.1.block_sparse_moe.experts.0.w2"):
        assert extra[name]["bits"] == 16, sorted(extra)
    with torch.no_grad():
        in_memory = ar.model(IDS).logits
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    experts = reloaded.model.layers[1].mlp.experts
    assert type(experts[0].w2) is torch.nn.Linear and type(experts[1].w2).__name__.endswith("QuantLinear")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(IDS).logits, in_memory, rtol=1e-4, atol=1e-4)
