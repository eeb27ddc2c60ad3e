"""auto_gptq (GPTQ v1 / v2), auto_awq (AWQ GEMM) and llm_compressor (compressed-tensors pack-quantized) packers,
and the checkpoint-config routing of convert.py."""

from __future__ import annotations

import pytest
import torch

from signround import AutoRoundConfig
from signround.convert import read_checkpoint_config
from signround.packing import get_packer
from signround.packing.awq import AWQ_ORDER, pack_awq, unpack_awq
from signround.packing.registry import format_packer
from signround.quant.int import QuantizedTensor, dequantize, quantize
from signround.schemes import LayerSpec


def _random_qt(spec: LayerSpec, out_features: int = 64, in_features: int = 128, seed: int = 0) -> QuantizedTensor:
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    return quantize(w, spec)


def _assert_same(a: QuantizedTensor, b: QuantizedTensor) -> None:
    assert torch.equal(a.codes.to(torch.uint8), b.codes.to(torch.uint8))
    assert torch.equal(a.scales, b.scales)
    assert torch.equal(a.zeros.to(torch.int32), b.zeros.to(torch.int32))


CASES = [
    (packing, bits, gs, sym)
    for packing in ("gptq", "gptq_v2", "pack-quantized")
    for bits in (2, 3, 4, 8)
    for gs in (32, 128, -1)
    for sym in (True, False)
    if not (packing == "gptq" and not sym)
] + [("awq_gemm", 4, gs, False) for gs in (32, 64, 128, -1)]


@pytest.mark.parametrize(("packing", "bits", "group_size", "sym"), CASES)
def test_unpack_pack_round_trip(packing: str, bits: int, group_size: int, sym: bool) -> None:
    spec = LayerSpec(bits=bits, group_size=group_size, sym=sym)
    packer = get_packer(packing)
    qt = _random_qt(spec)
    tensors = packer.pack(qt)
    layout = packer.tensor_shapes_dtypes(spec, 128, 64)
    assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == layout
    _assert_same(packer.unpack(tensors, spec, 128, 64), qt)


def test_awq_nibble_order_by_hand() -> None:
    values = torch.arange(8, dtype=torch.uint8).reshape(1, 8) + 1  # column c holds c + 1
    word = int(pack_awq(values)[0, 0]) & 0xFFFFFFFF
    nibbles = [(word >> (4 * i)) & 0xF for i in range(8)]
    assert nibbles == [c + 1 for c in AWQ_ORDER] == [1, 3, 5, 7, 2, 4, 6, 8]
    assert torch.equal(unpack_awq(pack_awq(values)), values)


@pytest.mark.parametrize("spec", [LayerSpec(bits=4, sym=True), LayerSpec(bits=3, sym=False)])
def test_awq_refuses_what_it_cannot_hold(spec: LayerSpec) -> None:
    reason = get_packer("awq_gemm").can_hold_spec(spec)
    assert reason is not None and "accepted: bits=4, sym=False" in reason


def test_gptq_v1_refuses_asym_and_resolves_to_v2() -> None:
    asym = LayerSpec(bits=4, group_size=32, sym=False)
    assert "gptq_v2" in get_packer("gptq").can_hold_spec(asym)
    assert format_packer("auto_gptq", asym).name == "gptq_v2"
    assert format_packer("auto_gptq", LayerSpec(sym=True)).name == "gptq"


def test_gptq_v1_stores_zero_minus_one() -> None:
    spec = LayerSpec(bits=4, group_size=32, sym=True)
    tensors = get_packer("gptq").pack(_random_qt(spec))
    assert bool((tensors["qzeros"] == 0x77777777).all())


def test_gptq_act_order_g_idx_is_refused() -> None:
    spec = LayerSpec(bits=4, group_size=32, sym=True)
    packer = get_packer("gptq")
    tensors = packer.pack(_random_qt(spec))
    tensors["g_idx"] = tensors["g_idx"].flip(0)
    with pytest.raises(ValueError, match="act-order"):
        packer.check_values(tensors, spec, 128, 64)
    packer.check_values(packer.pack(_random_qt(spec)), spec, 128, 64)  # i // group_size passes


def test_gptq_config_round_trip_with_overrides() -> None:
    packer = get_packer("gptq")
    default = LayerSpec(bits=4, group_size=128, sym=True)
    overrides = {"model.layers.0.mlp.down_proj": {"bits": 8}, "model.layers.1.self_attn.q_proj": {"bits": 16}}
    cfg = packer.quantization_config(default, overrides, {"block_name_to_quantize": "model.layers"})
    assert cfg["quant_method"] == "gptq" and cfg["checkpoint_format"] == "gptq" and cfg["desc_act"] is False
    fmt = read_checkpoint_config(cfg)
    assert fmt.packer is packer and fmt.default == default
    from signround.schemes import resolve_plan

    names = [("model.layers.0.mlp.down_proj", 128, 64), ("model.layers.1.self_attn.q_proj", 128, 64)]
    names.append(("model.layers.1.mlp.up_proj", 128, 64))
    plan = resolve_plan(names, fmt.default, fmt.overrides)
    assert plan.layers["model.layers.0.mlp.down_proj"].bits == 8
    assert "model.layers.1.self_attn.q_proj" not in plan.layers
    assert plan.layers["model.layers.1.mlp.up_proj"] == default


def test_gptq_desc_act_config_is_refused() -> None:
    with pytest.raises(ValueError, match="desc_act=true"):
        read_checkpoint_config({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True})


@pytest.mark.parametrize(
    ("description", "pattern"),
    [
        ({"quant_method": "bitsandbytes"}, "cannot load quant_method='bitsandbytes'; accepted: \\['auto-round'"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 128, "checkpoint_format": "marlin"}, "'marlin'"),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, "accepted: 'gemm'"),
        (
            {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": False, "sym": False},
            "zero_point=false but sym=False; accepted",
        ),
        ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": "no"}, "accepted: true .asym. or false"),
        ({"quant_method": "awq", "bits": 8, "group_size": 128, "zero_point": False}, "accepted: bits=4 int"),
    ],
)
def test_unloadable_checkpoint_configs_name_the_problem(description, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        read_checkpoint_config(description)


def test_awq_config_round_trip() -> None:
    packer = get_packer("awq_gemm")
    default = LayerSpec(bits=4, group_size=64, sym=False)
    cfg = packer.quantization_config(default, {"model.layers.0.mlp.down_proj": {"bits": 16}}, {})
    assert cfg == {
        "quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": ["model.layers.0.mlp.down_proj"],
    }  # fmt: skip
    fmt = read_checkpoint_config(cfg)
    assert fmt.packer is packer and fmt.default == default
    with pytest.raises(ValueError, match="one spec per model"):
        packer.quantization_config(default, {"model.layers.0.mlp.down_proj": {"group_size": 32}}, {})


# Intel's auto-round 0.16.1 quantization_config for format="auto_awq" with sym=True (stories260K, W4G32, iters=2;
# modules_to_not_convert shortened).  Its qzeros hold 8 in every nibble (0x88888888); its scales are fp16, negative
# where the group's largest magnitude is positive (the full-range symmetric convention).
INTEL_SYM_AWQ_CONFIG = {
    "autoround_version": "0.16.1", "bits": 4, "data_type": "int", "group_size": 32, "iters": 2,
    "modules_to_not_convert": ["model.layers.0.mlp.down_proj", "lm_head"], "provider": "auto-round",
    "quant_method": "awq", "sym": True, "to_quant_block_names": "model.layers", "version": "gemm",
    "zero_point": False,
}  # fmt: skip


@pytest.mark.parametrize("group_size", [32, 128, -1])
def test_awq_zero_point_false_layout_round_trip(group_size: int) -> None:
    """A symmetric layer in the zero_point=false layout: qzeros all 8 (as Intel writes them), unpacked exactly."""
    spec = LayerSpec(bits=4, group_size=group_size, sym=True)
    packer = get_packer("awq_gemm")
    qt = _random_qt(spec)
    tensors = packer.pack(qt)
    assert {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()} == packer.tensor_shapes_dtypes(spec, 128, 64)
    assert bool((tensors["qzeros"] == 0x88888888 - 2**32).all())
    packer.check_values(tensors, spec, 128, 64)
    _assert_same(packer.unpack(tensors, spec, 128, 64), qt)
    assert torch.equal(dequantize(packer.unpack(tensors, spec, 128, 64)), dequantize(qt))


def test_awq_zero_point_false_config_loads_as_symmetric() -> None:
    fmt = read_checkpoint_config(INTEL_SYM_AWQ_CONFIG)
    assert fmt.packer is get_packer("awq_gemm")
    assert fmt.default == LayerSpec(bits=4, group_size=32, sym=True)
    assert fmt.overrides == {".*model\\.layers\\.0\\.mlp\\.down_proj.*": {"bits": 16}, ".*lm_head.*": {"bits": 16}}
    assert fmt.packer.can_load(fmt.default, 64, 64) is None
    config = AutoRoundConfig.from_checkpoint(INTEL_SYM_AWQ_CONFIG)
    assert (config.bits, config.group_size, config.sym) == (4, 32, True)
    assert config.to_dict() == INTEL_SYM_AWQ_CONFIG
    # without a "sym" key zero_point=false still means symmetric (AutoAWQ's and vLLM's reading)
    no_sym = {k: v for k, v in INTEL_SYM_AWQ_CONFIG.items() if k != "sym"}
    assert read_checkpoint_config(no_sym).default.sym is True


def test_awq_zero_point_false_refuses_other_zero_points() -> None:
    spec = LayerSpec(bits=4, group_size=32, sym=True)
    packer = get_packer("awq_gemm")
    tensors = packer.pack(_random_qt(spec))
    tensors["qzeros"] = tensors["qzeros"].clone()
    tensors["qzeros"][0, 0] = 0x77777777
    with pytest.raises(
        ValueError, match=r"zero_point=false \(symmetric\) but qzeros hold values in \[7, 8\]; accepted"
    ):
        packer.check_values(tensors, spec, 128, 64)
    # the same tensors read as zero_point=true (asymmetric) are fine: AWQ stores zero points as-is
    asym = LayerSpec(bits=4, group_size=32, sym=False)
    packer.check_values(tensors, asym, 128, 64)
    assert int(packer.unpack(tensors, asym, 128, 64).zeros.min()) == 7


def test_awq_writes_zero_point_true_only() -> None:
    """Sym AWQ is read, never written: vLLM runs zero_point=false only on its slower GEMM kernel (no Marlin)."""
    packer = get_packer("awq_gemm")
    sym = LayerSpec(bits=4, group_size=32, sym=True)
    assert packer.can_load(sym, 128, 64) is None
    assert "accepted: bits=4, sym=False" in packer.can_hold(sym, 128, 64)
    with pytest.raises(ValueError, match="accepted: bits=4, sym=False"):
        packer.quantization_config(sym, {}, {})


# -- compressed-tensors (a dev dependency): checked with the library itself --------------------------------------------
@pytest.mark.parametrize(("bits", "group_size", "sym"), [(4, 32, True), (4, 64, False), (8, -1, True), (3, 32, False)])
def test_compressed_tensors_decompresses_our_tensors(bits: int, group_size: int, sym: bool) -> None:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    spec = LayerSpec(bits=bits, group_size=group_size, sym=sym)
    packer = get_packer("pack-quantized")
    qt = _random_qt(spec)
    cfg = packer.quantization_config(spec, {}, {})
    scheme = QuantizationConfig.model_validate(cfg).config_groups["group_0"]
    state = {k: v.clone() for k, v in packer.pack(qt).items()}
    state["weight_scale"] = state["weight_scale"].float()
    theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
    torch.testing.assert_close(theirs.float(), dequantize(qt), rtol=0, atol=1e-6)


def test_compressed_tensors_config_mixed_precision_round_trip() -> None:
    packer = get_packer("pack-quantized")
    default = LayerSpec(bits=4, group_size=32, sym=True)
    overrides = {"model.layers.0.mlp.down_proj": {"bits": 8}, "model.layers.1.mlp.up_proj": {"bits": 16}}
    cfg = packer.quantization_config(default, overrides, {})
    assert cfg["quant_method"] == "compressed-tensors" and cfg["format"] == "pack-quantized"
    assert "lm_head" in cfg["ignore"] and "model.layers.1.mlp.up_proj" in cfg["ignore"]
    fmt = read_checkpoint_config(cfg)
    from signround.schemes import resolve_plan

    names = [(n, 128, 64) for n in ("model.layers.0.mlp.down_proj", "model.layers.1.mlp.up_proj", "model.layers.1.x")]
    plan = resolve_plan(names, fmt.default, fmt.overrides)
    assert plan.layers["model.layers.0.mlp.down_proj"].bits == 8
    assert "model.layers.1.mlp.up_proj" not in plan.layers
    assert plan.layers["model.layers.1.x"] == default


# -- config validation before any work ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"format": "auto_awq", "sym": True}, "format 'auto_awq' cannot hold the scheme"),
        ({"format": "auto_awq", "sym": False, "bits": 3}, "accepted: bits=4, sym=False"),
        (
            {"format": "auto_awq", "sym": False, "layer_config": {"model.layers.0.mlp.down_proj": {"bits": 8}}},
            "format 'auto_awq' cannot hold layer_config",
        ),
        (
            {"format": "auto_awq", "sym": False, "layer_config": {"model.layers.0.mlp.down_proj": {"group_size": 32}}},
            "stores one spec per model",
        ),
        ({"format": "auto_round,auto_gguf"}, "unknown format 'auto_gguf'; accepted: auto_round, auto_gptq"),
    ],
)
def test_config_rejects_formats_that_cannot_hold_the_scheme(kwargs, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        AutoRoundConfig(**kwargs)


def test_from_checkpoint_keeps_the_foreign_description() -> None:
    description = {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"}
    config = AutoRoundConfig.from_checkpoint(description)
    assert config.to_dict() == description
    assert (config.bits, config.group_size, config.sym) == (4, 128, False)
