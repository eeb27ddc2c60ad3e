"""auto_round packing of the floating-point schemes, and stories260K end to end: quantize (RTN and SignRound),
save in the auto_round format, load back through transformers, same logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import signround
from signround.convert import read_checkpoint_config
from signround.kernels.torch_fp import TorchFPQuantLinear
from signround.packing import get_packer
from signround.quant.dispatch import dequantize_weight, quantize_weight
from signround.quant.fp_tensor import FPTensor, calibrated_input_scale, needs_input_scale, with_input_scale
from signround.schemes import LayerSpec, scheme_fields

IN, OUT = 160, 48
# scheme -> (packing_format, stored tensors and their dtypes); the reference's names (export_to_nvfp_mx, export_to_fp8)
LAYOUTS = {
    "MXFP4": ("auto_round:llm_compressor", {"weight_packed": torch.uint8, "weight_scale": torch.uint8}),
    "MXFP8": ("auto_round:llm_compressor", {"weight": torch.float8_e4m3fn, "weight_scale": torch.uint8}),
    "NVFP4": (
        "auto_round:llm_compressor",
        {
            "weight_packed": torch.uint8,
            "weight_scale": torch.float8_e4m3fn,
            "weight_global_scale": torch.float32,
            "input_global_scale": torch.float32,
        },
    ),
    "FPW8A16": ("auto_round:fp8", {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32}),
    "FP8_STATIC": (
        "auto_round:fp8_static",
        {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32, "input_scale": torch.float32},
    ),
    "FP8_BLOCK": ("auto_round:fp8_static", {"weight": torch.float8_e4m3fn, "weight_scale_inv": torch.float32}),
}


def _spec(name: str) -> LayerSpec:
    return LayerSpec(**scheme_fields(name))


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp8 tensors compared by their bytes (torch.equal has no float8 kernel on CPU)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _layer(name: str) -> FPTensor:
    spec = _spec(name)
    w = torch.randn(OUT, IN, generator=torch.Generator().manual_seed(0))
    return with_input_scale(quantize_weight(w, spec), calibrated_input_scale(spec, torch.tensor(3.0)))


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pack_unpack_is_exact_with_the_references_tensors(name: str) -> None:
    spec = _spec(name)
    packing, dtypes = LAYOUTS[name]
    packer = get_packer("auto_round").resolve(spec)
    assert packer.name == packing
    qt = _layer(name)
    tensors = packer.pack(qt)
    assert {k: v.dtype for k, v in tensors.items()} == dtypes
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == packer.tensor_shapes_dtypes(spec, IN, OUT)
    back = packer.unpack(tensors, spec, IN, OUT)
    assert back.spec == spec
    for field in ("codes", "scales", "global_scale"):
        a, b = getattr(back.q, field), getattr(qt.q, field)
        assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(_bits(a), _bits(b))), field
    assert (back.input_scale is None) == (qt.input_scale is None)
    assert torch.equal(dequantize_weight(back, torch.float32), dequantize_weight(qt, torch.float32))


def test_fp4_bytes_by_hand() -> None:
    """Element 2i in the low nibble, 2i+1 in the high one; per-32 E8M0 bytes as they are."""
    qt = _layer("MXFP4")
    tensors = get_packer("auto_round:llm_compressor").pack(qt)
    codes = qt.q.codes
    assert int(tensors["weight_packed"][0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)
    assert torch.equal(tensors["weight_scale"], qt.q.scales)


def test_static_activations_without_calibration_are_refused() -> None:
    qt = quantize_weight(torch.randn(OUT, IN), _spec("FP8_STATIC"))
    with pytest.raises(ValueError, match="calibrated input scale"):
        get_packer("auto_round:fp8_static").pack(qt)


def test_packers_refuse_what_they_do_not_hold() -> None:
    assert "not stored" in get_packer("auto_round:llm_compressor").can_hold(_spec("FP8_BLOCK"), IN, OUT)
    assert "not a multiple" in get_packer("auto_round:llm_compressor").can_hold(_spec("MXFP4"), 172, OUT)
    assert get_packer("auto_round:fp8_static").can_hold(_spec("FP8_BLOCK"), 172, 200) is None  # partial blocks
    assert "not stored" in get_packer("auto_round:auto_gptq").can_hold(_spec("MXFP4"), IN, OUT)


def test_the_references_fpw8a16_config_without_packing_format_reads_as_fp8() -> None:
    cfg = {"quant_method": "auto-round", "bits": 8, "group_size": 0, "sym": True, "data_type": "fp", "act_bits": 16}
    checkpoint = read_checkpoint_config(cfg)
    assert checkpoint.packer.name == "auto_round:fp8" and checkpoint.default == _spec("FPW8A16")


# -- stories260K end to end ------------------------------------------------------------------------------------------
# RTN and SignRound per family (MX, NV, FP8), a few seconds each: 5 blocks, 4 x 16 tokens.  FPW8A16 shares
# FP8_STATIC's tensors and loader (its layout and config are checked above).
RUNS = [("MXFP4", 2), ("MXFP8", 0), ("NVFP4", 0), ("NVFP4", 2), ("FP8_STATIC", 2), ("FP8_BLOCK", 0)]


@pytest.mark.parametrize(("scheme", "iters"), RUNS)
def test_quantize_save_and_load_back(scheme: str, iters: int, stories_dir: Path, shakespeare: Path, tmp_path) -> None:
    out = tmp_path / "out"
    ar = signround.AutoRound(
        str(stories_dir), scheme=scheme, iters=iters, nsamples=4, seqlen=16, batch_size=4, dataset=str(shakespeare),
        dtype=torch.float32, show_progress=False, low_cpu_mem_usage=False,  # in memory: compared with the file
    )  # fmt: skip
    ar.quantize_and_save(out, format="auto_round")
    report, plan = ar.result.report, ar.result.plan
    spec = _spec(scheme)
    assert set(plan.layers.values()) == {spec}
    if iters:  # the kept parameters are never worse than the start on the whole calibration set
        assert all(final <= start for start, final in report.block_losses), report.block_losses
    if needs_input_scale(spec):  # FP8_STATIC's input_scale, NVFP4's input_global_scale: calibrated
        assert all(q.input_scale is not None and bool(q.input_scale > 0) for q in report.quantized.values())

    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["packing_format"] == LAYOUTS[scheme][0]
    assert (cfg["data_type"], cfg["bits"], cfg["act_bits"]) == (spec.data_type, spec.bits, spec.act_bits)

    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        in_memory = ar.model(ids).logits
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    layers = [m for m in loaded.modules() if isinstance(m, TorchFPQuantLinear)]
    assert len(layers) == len(plan.layers)
    with torch.no_grad():
        again = loaded(ids).logits
    # Both models run TorchFPQuantLinear on the same stored codes and scales in float32 in this process, with the
    # same activation quantization: bit-identical, not merely close.
    assert torch.equal(in_memory, again)
