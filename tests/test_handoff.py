"""An auto-round checkpoint of a scheme signround cannot run: Intel's loader when installed, else a named error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM
from transformers.quantizers.auto import AutoHfQuantizer
from transformers.quantizers.quantizer_auto_round import AutoRoundQuantizer
from transformers.utils.quantization_config import AutoRoundConfig as TransformersAutoRoundConfig

import signround
from signround import handoff
from signround.hf_quantizer import SignRoundHfQuantizer

# The reference's integer-activation scheme (W4A8): signround has no kernel for integer activations.
W4A8 = {
    "quant_method": "auto-round", "bits": 4, "group_size": 128, "sym": True, "data_type": "int", "act_bits": 8,
    "act_data_type": "int", "act_dynamic": True, "packing_format": "auto_round:auto_gptq",
}  # fmt: skip


def test_without_intel_s_package_loading_fails_in_one_line_naming_the_scheme(monkeypatch) -> None:
    monkeypatch.setattr(handoff, "intel_loader_available", lambda: False)
    with pytest.raises(ValueError, match=r"scheme \(.*act_bits=8 act_data_type='int'.*pip install auto-round") as e:
        AutoHfQuantizer.from_config(dict(W4A8))
    assert "\n" not in str(e.value)


def test_with_intel_s_package_the_checkpoint_goes_to_transformers_own_loader(monkeypatch) -> None:
    monkeypatch.setattr(handoff, "intel_loader_available", lambda: True)
    quantizer = AutoHfQuantizer.from_config(dict(W4A8))
    assert type(quantizer) is AutoRoundQuantizer
    assert type(quantizer.quantization_config) is TransformersAutoRoundConfig
    assert quantizer.quantization_config.bits == 4
    # a scheme signround runs stays with signround
    ours = AutoHfQuantizer.from_config({**W4A8, "act_bits": 16})
    assert type(ours) is SignRoundHfQuantizer and isinstance(ours.quantization_config, signround.AutoRoundConfig)


def test_from_pretrained_of_such_a_checkpoint_names_the_scheme(monkeypatch, tiny_llama_dir: Path, tmp_path) -> None:
    monkeypatch.setattr(handoff, "intel_loader_available", lambda: False)
    ckpt = tmp_path / "w4a8"
    shutil.copytree(tiny_llama_dir, ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "quantization_config": W4A8}))
    with pytest.raises(ValueError, match="is not one signround runs"):
        AutoModelForCausalLM.from_pretrained(ckpt)
