"""``format="llm_compressor"`` for the floating-point schemes, checked with compressed-tensors itself.

Per scheme: our tensors go through compressed-tensors' own decompressor (the one its config names) and give our
dequantized weights bit for bit; the saved config parses with its ``QuantizationConfig``; stories260K (the tiny
Llama for FP8_BLOCK, whose activation groups of 128 need ``in_features`` multiples of 128) quantized, saved and loaded
back through transformers' compressed-tensors quantizer and through signround.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, CompressedTensorsConfig

import signround
from signround import AutoRoundConfig
from signround.convert import read_checkpoint_config
from signround.kernels.torch_fp import TorchFPQuantLinear
from signround.packing.registry import format_packer
from signround.quant.dispatch import dequantize_weight, quantize_weight
from signround.quant.fp_tensor import FPTensor, calibrated_input_scale, with_input_scale
from signround.schemes import LayerSpec, scheme_fields

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import BaseCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8  # noqa: E402
from compressed_tensors.quantization import QuantizationConfig  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize  # noqa: E402

# scheme -> (compressed-tensors format, stored tensors and dtypes)
LAYOUTS = {
    "MXFP4": ("mxfp4-pack-quantized", {"weight_packed": torch.uint8, "weight_scale": torch.uint8}),
    "MXFP8": ("mxfp8-quantized", {"weight": torch.float8_e4m3fn, "weight_scale": torch.uint8}),
    "NVFP4": (
        "nvfp4-pack-quantized",
        {
            "weight_packed": torch.uint8,
            "weight_scale": torch.float8_e4m3fn,
            "weight_global_scale": torch.float32,
            "input_global_scale": torch.float32,
        },
    ),
    "FPW8A16": ("naive-quantized", {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32}),
    "FP8_STATIC": (
        "float-quantized",
        {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32, "input_scale": torch.float32},
    ),
    "FP8_BLOCK": ("float-quantized", {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32}),
}
BF16_DECOMPRESSORS = ("MXFP4", "MXFP8", "NVFP4")  # compressed-tensors 0.20 returns these weights in bfloat16
OUT, IN = 200, 256  # FP8_BLOCK: a partial last row block


def _spec(name: str) -> LayerSpec:
    return LayerSpec(**scheme_fields(name))


def _scheme(cfg: dict, group: str = "group_0"):
    return QuantizationConfig.model_validate(cfg).config_groups[group]


def _ct_float32(tensors: dict[str, torch.Tensor], scheme) -> torch.Tensor:
    """compressed-tensors' own ``dequantize`` with float32 inputs (its NVFP4 / MX decompressors fix bfloat16)."""
    if "weight_packed" in tensors:
        m, n = tensors["weight_packed"].shape
        x_q = unpack_fp4_from_uint8(tensors["weight_packed"], m, n * 2, dtype=torch.float32)
    else:
        x_q = tensors["weight"]
    scale = tensors["weight_scale"]
    scale = torch.exp2(scale.to(torch.int32) - 127.0) if scale.dtype == torch.uint8 else scale.float()
    gs = tensors.get("weight_global_scale")
    return ct_dequantize(x_q=x_q, scale=scale, args=scheme.weights, dtype=torch.float32, global_scale=gs)


def _check_decompression(tensors: dict[str, torch.Tensor], scheme, qt: FPTensor) -> None:
    ours = dequantize_weight(qt, torch.float32)
    theirs = BaseCompressor.get_value_from_registry(scheme.format).decompress(dict(tensors), scheme)["weight"]
    assert theirs.dtype == (torch.bfloat16 if qt.spec in [_spec(s) for s in BF16_DECOMPRESSORS] else torch.float32)
    assert torch.equal(theirs, ours.to(theirs.dtype))  # their decompressor: ours, rounded once to its dtype
    assert torch.equal(_ct_float32(tensors, scheme), ours)  # their arithmetic in float32: ours bit for bit


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_compressed_tensors_decompresses_our_tensors(name: str) -> None:
    spec = _spec(name)
    packer = format_packer("llm_compressor", spec)
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0))
    qt = with_input_scale(quantize_weight(w, spec), calibrated_input_scale(spec, torch.tensor(3.0)))
    tensors = packer.pack(qt)
    assert {k: v.dtype for k, v in tensors.items()} == LAYOUTS[name][1]
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == packer.tensor_shapes_dtypes(spec, IN, OUT)
    cfg = packer.quantization_config(spec, {}, {})
    assert cfg["format"] == LAYOUTS[name][0] and cfg["quant_method"] == "compressed-tensors"
    _check_decompression(tensors, _scheme(cfg), qt)
    back = packer.unpack(tensors, spec, IN, OUT)
    assert torch.equal(dequantize_weight(back, torch.float32), dequantize_weight(qt, torch.float32))
    assert read_checkpoint_config(cfg).default == spec  # signround reads its own config back


def test_configs_are_compressed_tensors_presets() -> None:
    """Our weights / input_activations are compressed-tensors' own presets where it has one."""
    from compressed_tensors.quantization import preset_name_to_scheme

    for ours, preset in (("MXFP4", "MXFP4"), ("MXFP8", "MXFP8"), ("NVFP4", "NVFP4"), ("FP8_BLOCK", "FP8_BLOCK")):
        spec = _spec(ours)
        mine = _scheme(format_packer("llm_compressor", spec).quantization_config(spec, {}, {}))
        theirs = preset_name_to_scheme(preset, ["Linear"])
        for field in ("weights", "input_activations"):  # as written to config.json
            a, b = getattr(mine, field), getattr(theirs, field)
            assert a.model_dump(mode="json") == b.model_dump(mode="json"), (ours, field)


def test_mixed_specs_name_their_layers_and_ignore_kept_ones() -> None:
    default = _spec("FP8_STATIC")
    packer = format_packer("llm_compressor", default)
    overrides = {"model.layers.0.mlp.down_proj": _spec("FPW8A16").to_dict(), "model.layers.1.mlp.up_proj": {"bits": 16}}
    cfg = packer.quantization_config(default, overrides, {})
    assert cfg["format"] == "mixed-precision"  # float-quantized + naive-quantized groups
    assert _scheme(cfg, "group_1").targets == ["re:^model\\.layers\\.0\\.mlp\\.down_proj$"]
    assert cfg["ignore"] == ["lm_head", "model.layers.1.mlp.up_proj"]


@pytest.mark.parametrize("scheme", ["MXFP4_RCEIL", "MXFP8_RCEIL"])
def test_schemes_compressed_tensors_cannot_express_fail_before_any_work(scheme: str) -> None:
    with pytest.raises(ValueError, match="no compressed-tensors equivalent; accepted fp schemes: MXFP4, MXFP8") as e:
        AutoRoundConfig(scheme=scheme, format="llm_compressor")
    assert "\n" not in str(e.value)


# -- end to end --------------------------------------------------------------------------------------------------------
RUNS = [("MXFP4", 2), ("MXFP8", 0), ("NVFP4", 0), ("NVFP4", 2), ("FPW8A16", 0), ("FP8_STATIC", 2), ("FP8_BLOCK", 0)]
IDS = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module", params=RUNS, ids=[f"{s}-iters{i}" for s, i in RUNS])
def saved(request, stories_dir: Path, tiny_llama_dir: Path, shakespeare: Path, tmp_path_factory):
    """(scheme, the quantized model, its tuned layers, the llm_compressor checkpoint, in-memory logits)."""
    scheme, iters = request.param
    source = tiny_llama_dir if scheme == "FP8_BLOCK" else stories_dir
    out = tmp_path_factory.mktemp(f"ct_{scheme}_{iters}") / "out"
    ar = signround.AutoRound(
        str(source), scheme=scheme, iters=iters, nsamples=4, seqlen=16, batch_size=4, dataset=str(shakespeare),
        dtype=torch.float32, show_progress=False, low_cpu_mem_usage=False,  # in memory: compared with the file
    )  # fmt: skip
    ar.quantize_and_save(out, format="llm_compressor")
    assert set(ar.result.plan.layers.values()) == {_spec(scheme)}
    with torch.no_grad():
        logits = ar.model(IDS).logits
    return scheme, dict(ar.result.report.quantized), out, logits


def test_saved_checkpoint_decompresses_to_our_weights(saved) -> None:
    scheme, quantized, out, _ = saved
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    config = QuantizationConfig.model_validate(cfg)
    assert cfg["format"] == LAYOUTS[scheme][0] and list(config.config_groups) == ["group_0"]
    state = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}
    for name, qt in quantized.items():
        tensors = {k.rpartition(".")[2]: v for k, v in state.items() if k.startswith(name + ".")}
        assert {k: v.dtype for k, v in tensors.items()} == LAYOUTS[scheme][1], name
        _check_decompression(tensors, config.config_groups["group_0"], qt)
    for name in config.ignore:  # kept layers are plain weights
        assert f"{name}.weight_scale" not in state


def test_transformers_compressed_tensors_loader(saved) -> None:
    """transformers' own compressed-tensors quantizer, float32, its default (compressed, decompressed on the first
    forward, activations quantized by compressed-tensors) route."""
    scheme, _, out, logits = saved
    if scheme in BF16_DECOMPRESSORS:
        pytest.skip(
            "compressed-tensors 0.20's NVFP4 / MX decompressors return bfloat16 weights whatever the model dtype "
            "(asserted in _check_decompression), so a float32 model fails in F.linear (float vs bfloat16); a bf16 load "
            "runs, but there the MX / NV activation rounding moves the tiny model's logits from the float32 reference as "
            "far as signround's own bf16 load does, so no tolerance would test anything. The loaded weights are "
            "checked through transformers' dequantize route (test_transformers_dequantize_route_holds_our_weights)."
        )
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    with torch.no_grad():
        again = loaded(IDS).logits
    # FP8: float32 scales and weights, per-tensor / per-128 fp8 activation rounding as ours: identical logits.
    assert torch.equal(again, logits)


def test_transformers_dequantize_route_holds_our_weights(saved) -> None:
    scheme, quantized, out, _ = saved
    loaded = AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True)
    )
    for name, qt in quantized.items():
        weight = loaded.get_submodule(name).weight
        ours = dequantize_weight(qt, torch.float32)
        if scheme in BF16_DECOMPRESSORS:
            ours = ours.to(torch.bfloat16).float()  # their decompressor's bfloat16 (exact for MX)
        assert weight.dtype == torch.float32 and torch.equal(weight, ours), name


def test_signround_loads_its_llm_compressor_checkpoint(saved) -> None:
    _, quantized, out, logits = saved
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, quantization_config=AutoRoundConfig())
    assert len([m for m in loaded.modules() if isinstance(m, TorchFPQuantLinear)]) == len(quantized)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, logits)
