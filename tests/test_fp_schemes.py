"""The floating-point schemes (MXFP4 / MXFP8, NVFP4, FPW8A16, FP8_STATIC, FP8_BLOCK): presets, validation, the
spec -> format mapping, activation quantization and the tunable layer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from signround import AutoRoundConfig
from signround.quant import fp
from signround.quant.dispatch import dequantize_weight, from_tensors, is_fp, quantize_weight, to_tensors
from signround.quant.fp_tensor import calibrated_input_scale, quantize_input
from signround.schemes import LayerSpec, act_quant_of, fp_format_of, resolve_plan, scheme_fields
from signround.tuning.fp_linear import FPTunableLinear

# The reference's (auto-round 0.16 schemes.py) definitions; act_sym is always True there and not a LayerSpec field.
REFERENCE = {
    "MXFP4": (4, 32, "mx_fp", 4, "mx_fp", 32, True),
    "MXFP4_RCEIL": (4, 32, "mx_fp", 4, "mx_fp_rceil", 32, True),
    "MXFP8": (8, 32, "mx_fp", 8, "mx_fp", 32, True),
    "MXFP8_RCEIL": (8, 32, "mx_fp", 8, "mx_fp_rceil", 32, True),
    "NVFP4": (4, 16, "nv_fp", 4, "nv_fp4_with_static_gs", 16, True),
    "FPW8A16": (8, 0, "fp", 16, "float", 128, True),
    "FP8_STATIC": (8, -1, "fp", 8, "fp", 0, False),
    "FP8_BLOCK": (8, (128, 128), "fp", 8, "fp", 128, True),
}
FORMAT = {
    "MXFP4": ("mxfp4", "mxfp4"),
    "MXFP4_RCEIL": ("mxfp4", "mxfp4_rceil"),  # weights keep the OCP rule, activations round the scale up
    "MXFP8": ("mxfp8", "mxfp8"),
    "MXFP8_RCEIL": ("mxfp8", "mxfp8_rceil"),
    "NVFP4": ("nvfp4", "nvfp4"),
    "FPW8A16": ("fp8_tensor", None),
    "FP8_STATIC": ("fp8", "fp8_tensor"),
    "FP8_BLOCK": ("fp8_block", "fp8_act128"),
}


def _spec(name: str) -> LayerSpec:
    return LayerSpec(**scheme_fields(name))


@pytest.mark.parametrize("name", list(REFERENCE))
def test_presets_are_the_references(name: str) -> None:
    spec = _spec(name)
    bits, group, dtype, act_bits, act_dtype, act_group, dynamic = REFERENCE[name]
    assert (spec.bits, spec.group_size, spec.data_type, spec.sym) == (bits, group, dtype, True)
    if act_bits < 16:
        assert (spec.act_bits, spec.act_data_type, spec.act_group_size, spec.act_dynamic) == (
            act_bits, act_dtype, act_group, dynamic,
        )  # fmt: skip
    else:
        assert spec.act_bits == 16
    weight, act = FORMAT[name]
    assert fp_format_of(spec) == weight and is_fp(spec)
    assert (act_quant_of(spec).format if act_quant_of(spec) else None) == act


@pytest.mark.parametrize("name", list(REFERENCE))
def test_spec_round_trips_through_json_and_stays_hashable(name: str) -> None:
    spec = _spec(name)
    again = LayerSpec(**json.loads(json.dumps(spec.to_dict())))
    assert again == spec and hash(again) == hash(spec)


@pytest.mark.parametrize(
    ("fields", "says"),
    [
        ({"data_type": "mx_fp", "bits": 4, "group_size": 16}, "('mx_fp', 4, 32)"),
        ({"data_type": "nv_fp", "bits": 4, "group_size": 16, "sym": False}, "sym=True"),
        ({"data_type": "fp", "bits": 4, "group_size": -1}, "('fp', 8, -1)"),
        ({"data_type": "int", "bits": 4, "act_bits": 8}, "floating-point weights only"),
        ({**scheme_fields("MXFP4"), "act_group_size": 16}, "mx_fp: bits=4 group_size=32"),
        ({"data_type": "e2m1"}, "accepted"),
    ],
)
def test_bad_specs_name_what_is_accepted(fields: dict, says: str) -> None:
    with pytest.raises(ValueError, match="not supported") as err:
        LayerSpec(**fields)
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"scheme": "MXFP4", "format": "gguf:q4_k_m"}, "llama.cpp"),
        ({"scheme": "NVFP4", "format": "auto_gptq"}, "not stored by packing 'gptq'"),
        ({"scheme": "FP8_STATIC", "format": "auto_awq"}, "AWQ"),
        ({"scheme": "W4A16", "act_bits": 8}, "floating-point weights only"),
        ({"scheme": "FP8_BLOCK", "group_size": 64}, "('fp', 8, (128, 128))"),
    ],
)
def test_config_refuses_bad_combinations_early(kwargs: dict, says: str) -> None:
    with pytest.raises(ValueError) as err:
        AutoRoundConfig(dataset=["unused"], **kwargs)
    assert says in str(err.value)


def test_config_takes_the_scheme_and_its_activation_fields() -> None:
    config = AutoRoundConfig(scheme="fp8_static", dataset=["unused"])
    assert config.default_spec() == _spec("FP8_STATIC")
    assert config.to_dict()["act_dynamic"] is False
    config = AutoRoundConfig(scheme="MXFP4", act_bits=8, dataset=["unused"])  # MX weights, MXFP8 activations
    assert act_quant_of(config.default_spec()).format == "mxfp8"


def test_plan_keeps_layers_whose_inputs_do_not_split_into_blocks() -> None:
    candidates = [("a", 172, 64), ("b", 64, 172)]
    plan = resolve_plan(candidates, _spec("NVFP4"))
    assert list(plan.layers) == ["b"] and "group_size=16" in plan.skipped[0].reason
    plan = resolve_plan(candidates, _spec("FP8_BLOCK"))  # partial 128x128 blocks are fine
    assert list(plan.layers) == ["a", "b"]


@pytest.mark.parametrize("name", list(REFERENCE))
def test_dispatch_quantizes_as_the_format_and_round_trips(name: str) -> None:
    spec = _spec(name)
    w = torch.randn(48, 160, generator=torch.Generator().manual_seed(1))
    q = quantize_weight(w, spec)
    assert torch.equal(dequantize_weight(q, torch.float32), fp.fake_quant(w, fp_format_of(spec)))
    tensors, description = to_tensors(q)
    again = from_tensors(tensors, json.loads(json.dumps(description)))
    assert again.spec == spec and torch.equal(
        dequantize_weight(again, torch.float32), dequantize_weight(q, torch.float32)
    )


def test_activation_quantization() -> None:
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(2))
    assert quantize_input(x, _spec("FPW8A16"), None) is x
    mx = quantize_input(x, _spec("MXFP4"), None)
    assert torch.equal(mx, fp.fake_quant(x.reshape(15, 64), "mxfp4").reshape(x.shape))  # per token, per 32
    # static FP8: one calibrated scale amax / 448, never the input's own
    scale = calibrated_input_scale(_spec("FP8_STATIC"), torch.tensor(10.0))
    assert torch.equal(scale, torch.tensor([10.0 / 448]))
    q = quantize_input(x, _spec("FP8_STATIC"), scale)
    assert torch.equal(q, fp.round_to_grid(x / scale, fp.E4M3) * scale)
    # NVFP4: the calibrated global scale 448 * 6 / amax
    gs = calibrated_input_scale(_spec("NVFP4"), torch.tensor(12.0))
    assert torch.allclose(gs, torch.tensor([448 * 6 / 12.0]))
    nv = quantize_input(x, _spec("NVFP4"), gs)
    assert torch.equal(nv, fp.fake_quant(x.reshape(15, 64), "nvfp4", global_scale=gs).reshape(x.shape))
    assert calibrated_input_scale(_spec("MXFP4"), torch.tensor(1.0)) is None  # dynamic: nothing to calibrate
    # gradients pass straight through to the input (tuning trains the layers upstream)
    xg = x.clone().requires_grad_(True)
    quantize_input(xg, _spec("MXFP8"), None).sum().backward()
    assert torch.equal(xg.grad, torch.ones_like(x))


@pytest.mark.parametrize("name", ["MXFP4", "NVFP4", "FP8_BLOCK", "FP8_STATIC"])
def test_tunable_layer_starts_at_rtn_and_trains_v_alpha_beta(name: str) -> None:
    spec = _spec(name)
    gen = torch.Generator().manual_seed(3)
    linear = nn.Linear(64, 32, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(32, 64, generator=gen))
    x = torch.randn(4, 64, generator=gen, requires_grad=True)
    scale = calibrated_input_scale(spec, x.detach().abs().amax())
    tl = FPTunableLinear(linear, spec, scale)
    out = tl(x)
    start = tl.start()
    want = F.linear(quantize_input(x.detach(), spec, scale), dequantize_weight(start, torch.float32), linear.bias)
    assert torch.equal(out.detach(), want.detach())
    assert torch.equal(tl.last.quantized().q.codes, start.q.codes)
    out.square().sum().backward()
    assert bool(tl.v.grad.abs().sum() > 0) and bool(x.grad.abs().sum() > 0)
    # each block's scale follows the larger of its two ends, so alpha or beta (not always both) gets a gradient
    assert bool((tl.alpha.grad.abs() + tl.beta.grad.abs()).gt(0).all())
    with tl.judging(start):
        assert torch.equal(tl(x.detach()), want.detach())
