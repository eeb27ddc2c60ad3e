"""Guards on the Transformers internals the plugin relies on (see DESIGN.md, "The Transformers plugin").

If a Transformers release changes any of them these tests fail loudly instead of checkpoints loading wrongly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from transformers.quantizers import auto

import signround
from signround import hf_quantizer
from signround.config import AutoRoundConfig
from signround.hf_quantizer import SignRoundHfQuantizer, register_with_transformers


def test_auto_round_routes_to_signround() -> None:
    assert auto.AUTO_QUANTIZER_MAPPING["auto-round"] is SignRoundHfQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["auto-round"] is AutoRoundConfig
    assert signround.AutoRoundConfig is AutoRoundConfig and signround.SignRoundHfQuantizer is SignRoundHfQuantizer
    # the lookup transformers does at load time goes through those dicts
    cfg = auto.AutoQuantizationConfig.from_dict(
        {"quant_method": "auto-round", "bits": 4, "group_size": 32, "sym": True}
    )
    assert isinstance(cfg, AutoRoundConfig)
    assert isinstance(auto.AutoHfQuantizer.from_config(cfg, pre_quantized=True), SignRoundHfQuantizer)


def test_transformers_internals_still_exist() -> None:
    from transformers.quantizers import base

    assert hasattr(auto, "get_hf_quantizer")
    assert isinstance(auto.AUTO_QUANTIZER_MAPPING, dict) and isinstance(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, dict)
    for name in ("_process_model_before_weight_loading", "_process_model_after_weight_loading", "is_serializable"):
        assert hasattr(base.HfQuantizer, name), name
    assert SignRoundHfQuantizer.requires_calibration is False
    # our own registration name must still be one transformers does not know, or is the built-in one we replace
    from transformers.quantizers import register_quantization_config, register_quantizer

    assert callable(register_quantizer) and callable(register_quantization_config)


def test_merge_is_wrapped_once() -> None:
    merge = auto.AutoHfQuantizer.merge_quantization_configs
    assert getattr(merge, "_signround", False) is True
    assert merge.__func__.__name__ == "merge_quantization_configs"


def test_register_is_idempotent(monkeypatch) -> None:
    before = (
        auto.AUTO_QUANTIZER_MAPPING["auto-round"],
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING["auto-round"],
        auto.AutoHfQuantizer.__dict__["merge_quantization_configs"].__func__,
    )
    register_with_transformers()
    monkeypatch.setattr(hf_quantizer, "_REGISTERED", False)  # even a second full pass changes nothing
    register_with_transformers()
    after = (
        auto.AUTO_QUANTIZER_MAPPING["auto-round"],
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING["auto-round"],
        auto.AutoHfQuantizer.__dict__["merge_quantization_configs"].__func__,
    )
    assert after == before


def test_register_refuses_to_replace_a_third_party_entry(monkeypatch) -> None:
    class Foreign:
        pass

    Foreign.__module__ = "someone_else.quantizer"
    monkeypatch.setitem(auto.AUTO_QUANTIZER_MAPPING, "auto-round", Foreign)
    monkeypatch.setattr(hf_quantizer, "_REGISTERED", False)
    with pytest.raises(RuntimeError, match=r"someone_else\.quantizer\.Foreign"):
        register_with_transformers()


def _checkpoint_dict(rtn_checkpoint) -> dict:
    return json.loads((rtn_checkpoint / "config.json").read_text())["quantization_config"]


def test_user_backend_overrides_the_checkpoint(rtn_checkpoint) -> None:
    merge = auto.AutoHfQuantizer.merge_quantization_configs
    ckpt = _checkpoint_dict(rtn_checkpoint)
    merged = merge(dict(ckpt, backend="torch"), AutoRoundConfig(backend="auto"))
    assert isinstance(merged, AutoRoundConfig) and merged.backend == "auto"
    merged = merge(dict(ckpt), AutoRoundConfig(backend="torch"))
    assert merged.backend == "torch"
    # everything else comes from the checkpoint, verbatim
    assert (merged.bits, merged.group_size, merged.packing_format) == (4, 32, "auto_round:auto_gptq")
    assert merged.to_dict() == ckpt
    # without a user config the original path builds our config from the checkpoint
    plain = merge(dict(ckpt), None)
    assert isinstance(plain, AutoRoundConfig) and plain.to_dict() == ckpt


def test_user_config_with_unloadable_checkpoint_method_is_refused() -> None:
    merge = auto.AutoHfQuantizer.merge_quantization_configs
    with pytest.raises(ValueError, match=r"quant_method='bitsandbytes'.*accepted: \['auto-round', 'awq', "):
        merge({"quant_method": "bitsandbytes", "load_in_4bit": True}, AutoRoundConfig())


@pytest.mark.parametrize(
    "description",
    [
        {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
        {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False},
    ],
)
def test_user_config_routes_foreign_checkpoints_to_signround(description) -> None:
    merged = auto.AutoHfQuantizer.merge_quantization_configs(description, AutoRoundConfig(backend="torch"))
    assert isinstance(merged, AutoRoundConfig) and merged.backend == "torch"
    assert merged.to_dict() == description  # re-saving writes the checkpoint's own config


def test_from_pretrained_with_user_config_loads_through_signround(rtn_checkpoint) -> None:
    from transformers import AutoModelForCausalLM

    from signround.kernels.torch import TorchQuantLinear

    model = AutoModelForCausalLM.from_pretrained(rtn_checkpoint, quantization_config=AutoRoundConfig(backend="torch"))
    assert isinstance(model.hf_quantizer, SignRoundHfQuantizer)
    assert model.config.quantization_config.backend == "torch"
    assert isinstance(model.model.layers[0].self_attn.q_proj, TorchQuantLinear)


def test_plain_transformers_refuses_our_checkpoint(rtn_checkpoint) -> None:
    """Without ``import signround`` transformers' own auto-round loader runs: it needs Intel's package and fails."""
    code = textwrap.dedent(
        f"""
        import sys
        from transformers import AutoModelForCausalLM
        try:
            AutoModelForCausalLM.from_pretrained({str(rtn_checkpoint)!r})
        except Exception as err:
            print("REFUSED", type(err).__name__, err)
            sys.exit(3)
        assert "signround" not in sys.modules
        print("LOADED")
        """
    )
    try:
        import auto_round  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("Intel's auto-round is installed here: plain transformers can load the checkpoint")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "REFUSED" in proc.stdout and "auto-round" in proc.stdout


def test_quantize_on_load_to_gguf_is_refused_before_any_weight_is_read(stories_dir, shakespeare, monkeypatch) -> None:
    """A .gguf file is not something save_pretrained writes: quantize-on-load with format 'gguf:<type>' fails at
    once, naming the way that does write one, instead of tuning every block and failing at the packing."""
    import torch
    from transformers import AutoModelForCausalLM

    from signround import api

    def never(*args, **kwargs):
        raise AssertionError("tuning started")

    monkeypatch.setattr(api, "quantize_model", never)
    cfg = signround.AutoRoundConfig(format="gguf:q4_k_m", iters=0, dataset=str(shakespeare))
    with pytest.raises(ValueError, match=r"format 'gguf:q4_k_m' writes a llama.cpp .gguf file.*quantize_and_save"):
        AutoModelForCausalLM.from_pretrained(stories_dir, quantization_config=cfg, dtype=torch.float32)
