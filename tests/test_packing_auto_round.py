"""auto_round packing: exact round trips, the bit layout by hand, shape refusals, and the reference's config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import signround
from signround.packing import get_packer, packer_names
from signround.packing.bits import pack_int32, unpack_int32
from signround.quant.int import QuantizedTensor, quantize
from signround.schemes import LayerSpec

BITS = (2, 3, 4, 8)
GROUP_SIZES = (32, 64, 128, -1)
IN, OUT = 256, 64
ZP = "auto_round:auto_gptq"  # zero points stored minus one
AS_IS = "auto_round"  # zero points stored as-is


def _signed(word: int) -> int:
    """An unsigned 32-bit word as the int32 a checkpoint stores."""
    return word - 2**32 if word >= 2**31 else word


def _random_qt(spec: LayerSpec, in_features: int = IN, out_features: int = OUT, seed: int = 0) -> QuantizedTensor:
    gen = torch.Generator().manual_seed(seed)
    return quantize(torch.randn(out_features, in_features, generator=gen), spec)


def _assert_same(got: QuantizedTensor, want: QuantizedTensor) -> None:
    assert got.spec == want.spec
    for name in ("codes", "scales", "zeros"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.dtype == b.dtype, name
        assert torch.equal(a, b), name


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_is_exact(bits: int, group_size: int, sym: bool) -> None:
    spec = LayerSpec(bits=bits, group_size=group_size, sym=sym)
    packer = get_packer("auto_round").resolve(spec)
    assert packer.name == (ZP if sym else AS_IS)
    qt = _random_qt(spec)
    tensors = packer.pack(qt)
    assert {k: (tuple(v.shape), v.dtype) for k, v in tensors.items()} == packer.tensor_shapes_dtypes(spec, IN, OUT)
    _assert_same(packer.unpack(tensors, spec, IN, OUT), qt)


@pytest.mark.parametrize("packing", [AS_IS, ZP])
@pytest.mark.parametrize("bits", BITS)
def test_round_trip_every_code_and_zero_value(bits: int, packing: str) -> None:
    """Codes and zero points over their whole range (zero 0 and 2^b-1 included), negative scales too."""
    spec = LayerSpec(bits=bits, group_size=32, sym=True)
    gen = torch.Generator().manual_seed(bits)
    maxq = 2**bits - 1
    codes = torch.randint(0, maxq + 1, (OUT, IN), generator=gen).to(torch.uint8)
    codes[0, :2] = torch.tensor([0, maxq], dtype=torch.uint8)
    zeros = torch.randint(0, maxq + 1, (OUT, IN // 32), generator=gen).to(torch.int32)
    zeros[0, :2] = torch.tensor([0, maxq], dtype=torch.int32)
    scales = (torch.randn(OUT, IN // 32, generator=gen) * 0.01).to(torch.float16)
    qt = QuantizedTensor(codes=codes, scales=scales, zeros=zeros, spec=spec)
    packer = get_packer(packing)
    _assert_same(packer.unpack(packer.pack(qt), spec, IN, OUT), qt)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_stream_matches_python_integers(bits: int) -> None:
    """Value k of every run of 32 sits at stream bits [k*bits, (k+1)*bits); word i holds stream bits 32i..32i+31."""
    gen = torch.Generator().manual_seed(bits)
    values = torch.randint(0, 2**bits, (64, 3), generator=gen)
    words = pack_int32(values, bits, dim=0)
    assert words.shape == (2 * bits, 3) and words.dtype == torch.int32
    for col in range(3):
        for run in range(2):
            stream = sum(int(values[run * 32 + k, col]) << (k * bits) for k in range(32))
            expected = [_signed((stream >> (32 * i)) & 0xFFFFFFFF) for i in range(bits)]
            assert words[run * bits : (run + 1) * bits, col].tolist() == expected
    assert torch.equal(unpack_int32(words, bits, dim=0), values.to(torch.uint8))


def _layer(bits: int, codes: torch.Tensor, zero: int) -> QuantizedTensor:
    spec = LayerSpec(bits=bits, group_size=32, sym=True)
    out_features, in_features = codes.shape
    groups = in_features // 32
    return QuantizedTensor(
        codes=codes,
        scales=torch.ones(out_features, groups, dtype=torch.float16),
        zeros=torch.full((out_features, groups), zero, dtype=torch.int32),
        spec=spec,
    )


def test_4bit_layout_by_hand() -> None:
    """qweight[row, col] packs inputs 8*row .. 8*row+7 of output col, input 8*row at the lowest nibble."""
    codes = torch.zeros(32, 32, dtype=torch.uint8)
    codes[0, :8] = torch.arange(1, 9, dtype=torch.uint8)  # output 0, inputs 0..7 -> 0x87654321
    codes[1, 8] = 0xF  # output 1, input 8 -> qweight[1, 1] = 0x0000000F
    t = get_packer(ZP).pack(_layer(4, codes, zero=8))
    expected = torch.zeros(4, 32, dtype=torch.int32)
    expected[0, 0] = _signed(0x87654321)
    expected[1, 1] = 0xF
    assert torch.equal(t["qweight"], expected)
    # symmetric zero point 8 is stored minus one: 7 in every nibble
    assert t["qzeros"].shape == (1, 4)
    assert t["qzeros"].eq(0x77777777).all()
    assert t["scales"].shape == (1, 32) and t["scales"].dtype == torch.float16


def test_3bit_values_straddle_words_by_hand() -> None:
    """Input 10 occupies stream bits 30..32 (two bits in word 0, one in word 1); input 21 bits 63..65."""
    codes = torch.zeros(32, 32, dtype=torch.uint8)
    codes[0, 10] = 0b111
    codes[1, 21] = 0b101
    t = get_packer(ZP).pack(_layer(3, codes, zero=4))
    assert t["qweight"][:, 0].tolist() == [_signed(0xC0000000), 0b1, 0]
    assert t["qweight"][:, 1].tolist() == [0, _signed(0x80000000), 0b10]
    # zero 4 stored as 3 for all 32 output columns: the stream 0b011 repeated, cut into three words
    stream = sum(3 << (3 * k) for k in range(32))
    assert t["qzeros"][0].tolist() == [_signed((stream >> (32 * i)) & 0xFFFFFFFF) for i in range(3)]


@pytest.mark.parametrize(("bits", "word"), [(2, 0x55555555), (4, 0x77777777), (8, 0x7F7F7F7F)])
def test_symmetric_zero_points_are_stored_minus_one(bits: int, word: int) -> None:
    spec = LayerSpec(bits=bits, group_size=64, sym=True)
    t = get_packer(ZP).pack(_random_qt(spec))
    assert t["qzeros"].eq(_signed(word)).all()
    as_is = get_packer(AS_IS).pack(_random_qt(spec))
    assert as_is["qzeros"].eq(_signed(word + sum(1 << (bits * k) for k in range(32 // bits)))).all()


@pytest.mark.parametrize(
    ("packing", "spec", "in_features", "out_features", "needle", "layout"),
    [
        (AS_IS, LayerSpec(bits=4), 256, 172, "out_features=172", True),
        (ZP, LayerSpec(bits=3), 100, 64, "in_features=100", True),
        (AS_IS, LayerSpec(bits=4, group_size=48), 256, 64, "group_size=48", True),
        # a write-only refusal: foreign asymmetric layers stored minus one can still be read
        (ZP, LayerSpec(bits=4, sym=False), 256, 64, "sym=False", False),
    ],
)
def test_can_hold_refuses_with_reason(packing, spec, in_features, out_features, needle, layout) -> None:
    packer = get_packer(packing)
    reason = packer.can_hold(spec, in_features, out_features)
    assert reason is not None and needle in reason
    if layout:
        with pytest.raises(ValueError, match=needle):
            packer.tensor_shapes_dtypes(spec, in_features, out_features)
    else:
        assert packer.tensor_shapes_dtypes(spec, in_features, out_features)


def test_can_hold_accepts_and_pack_refuses_asym_for_zero_minus_one() -> None:
    spec = LayerSpec(bits=4, sym=False)
    assert get_packer(AS_IS).can_hold(spec, 256, 64) is None
    assert get_packer(AS_IS).can_hold_spec(spec) is None
    assert "sym=False" in get_packer(ZP).can_hold_spec(spec)
    assert get_packer(ZP).can_load(spec, 256, 64) is None  # foreign checkpoints still load
    assert "out_features=48" in get_packer(ZP).can_load(spec, 256, 48)
    with pytest.raises(ValueError, match="sym=False"):
        get_packer(ZP).pack(_random_qt(spec))


def test_unknown_packing_lists_registered_names() -> None:
    assert {"auto_round", ZP, "auto_round:gptqmodel"} <= set(packer_names())
    with pytest.raises(ValueError, match=r"unknown packing format 'nope'; registered: .*auto_round:auto_gptq"):
        get_packer("nope")
    assert get_packer("auto_round:gptqmodel") is get_packer(AS_IS)


def test_unpack_names_bad_tensor() -> None:
    spec = LayerSpec(bits=4)
    packer = get_packer(ZP)
    tensors = packer.pack(_random_qt(spec))
    with pytest.raises(ValueError, match="'qzeros' is missing"):
        packer.unpack({k: v for k, v in tensors.items() if k != "qzeros"}, spec, IN, OUT)
    with pytest.raises(ValueError, match=r"'scales' is torch\.float32"):
        packer.unpack({**tensors, "scales": tensors["scales"].float()}, spec, IN, OUT)


def test_scales_must_be_float16_representable() -> None:
    spec = LayerSpec(bits=4)
    qt = _random_qt(spec)
    exact = QuantizedTensor(qt.codes, qt.scales.float(), qt.zeros, spec)
    assert torch.equal(get_packer(ZP).pack(exact)["scales"], get_packer(ZP).pack(qt)["scales"])
    lossy = QuantizedTensor(qt.codes, qt.scales.float() + 1e-7, qt.zeros, spec)
    with pytest.raises(ValueError, match="float16"):
        get_packer(ZP).pack(lossy)


def test_quantization_config_is_the_reference_body() -> None:
    default = LayerSpec(bits=4, group_size=128, sym=True)
    overrides = {
        "model.layers.0.mlp.down_proj": {"bits": 8},
        "model.layers.1.self_attn.q_proj": {"bits": 16},
        "lm_head": {},  # quantized outside the blocks: must be listed in full
    }
    extra = {
        "iters": 200,  # reference defaults are dropped ...
        "nsamples": 128,
        "seqlen": 2048,
        "batch_size": 8,
        "lr": 0.005,
        "minmax_lr": 0.005,
        "low_gpu_mem_usage": True,  # ... other values kept
        "scale_dtype": None,
        "autoround_version": "0.16.0",
        "block_name_to_quantize": "model.layers",
    }
    packer = get_packer("auto_round").resolve(default)
    cfg = packer.quantization_config(default, overrides, extra)
    expected = {
        "bits": 4,
        "data_type": "int",
        "group_size": 128,
        "sym": True,
        "low_gpu_mem_usage": True,
        "autoround_version": "0.16.0",
        "block_name_to_quantize": "model.layers",
        "quant_method": "auto-round",
        "packing_format": "auto_round:auto_gptq",
        "extra_config": {
            "model.layers.0.mlp.down_proj": {"bits": 8},
            "model.layers.1.self_attn.q_proj": {"bits": 16, "data_type": "float"},
            "lm_head": {
                "bits": 4,
                "group_size": 128,
                "sym": True,
                "data_type": "int",
                "act_bits": 16,
                "act_group_size": 128,
                "act_sym": True,
                "act_data_type": "float",
                "act_dynamic": True,
            },
        },
    }
    assert cfg == expected
    assert list(cfg) == list(expected)  # the reference's key order
    assert packer.parse_config(json.loads(json.dumps(cfg))) == (default, overrides)


def test_quantization_config_refuses_reserved_extra_keys() -> None:
    with pytest.raises(ValueError, match="extra must not set"):
        get_packer(ZP).quantization_config(LayerSpec(), {}, {"bits": 4})


def test_parse_reference_checkpoint_config() -> None:
    """A config as auto-round 0.14 wrote it (regex extra_config keys, model-free mode)."""
    cfg = {
        "quant_method": "auto-round",
        "packing_format": "auto_round:auto_gptq",
        "bits": 4,
        "group_size": 64,
        "sym": True,
        "data_type": "int",
        "iters": 0,
        "model_free": True,
        "autoround_version": "0.14.2",
        "extra_config": {
            "lm_head": {"bits": 16, "data_type": "float"},
            ".*mlp\\.gate.*": {"bits": 16, "data_type": "float"},
            "model.layers.3.mlp.down_proj": {"bits": 8, "group_size": 128},
        },
    }
    default, overrides = get_packer(ZP).parse_config(cfg)
    assert default == LayerSpec(bits=4, group_size=64, sym=True)
    assert overrides == {
        "lm_head": {"bits": 16},
        ".*mlp\\.gate.*": {"bits": 16},
        "model.layers.3.mlp.down_proj": {"bits": 8, "group_size": 128},
    }
    with pytest.raises(ValueError, match=r"get_packer\('auto_round:auto_gptq'\)"):
        get_packer(AS_IS).parse_config(cfg)
    with pytest.raises(ValueError, match="quant_method='gptq'"):
        get_packer(ZP).parse_config({**cfg, "quant_method": "gptq"})


GOLDEN = json.loads((Path(__file__).parent / "data" / "auto_round_0.16.1_golden.json").read_text())["cases"]


@pytest.mark.parametrize("case", GOLDEN, ids=lambda c: f"w{c['bits']}g{c['group_size']}{'sym' if c['sym'] else 'asym'}")
def test_matches_tensors_packed_by_the_reference(case) -> None:
    """Frozen output of auto-round 0.16.1's own QuantLinear.pack (see the fixture's "source"): we write the same
    tensors and read theirs back exactly."""
    bits, gs, in_features, out_features = case["bits"], case["group_size"], case["in_features"], case["out_features"]
    spec = LayerSpec(bits=bits, group_size=gs, sym=case["sym"])
    groups = 1 if gs == -1 else in_features // gs
    o, i, g = torch.arange(out_features)[:, None], torch.arange(in_features)[None, :], torch.arange(groups)[None, :]
    zeros = torch.full((out_features, groups), 2 ** (bits - 1)) if spec.sym else (o + g * 5) % 2**bits
    sign = torch.where(g % 2 == 0, 1.0, -1.0)
    qt = QuantizedTensor(
        codes=((o * 7 + i * 3) % 2**bits).to(torch.uint8),
        scales=((o + 1) / 64.0 * sign).to(torch.float16),
        zeros=zeros.to(torch.int32),
        spec=spec,
    )
    reference = {
        "qweight": torch.tensor(case["qweight"], dtype=torch.int32),
        "qzeros": torch.tensor(case["qzeros"], dtype=torch.int32),
        "scales": torch.tensor(case["scales_fp16_bits"], dtype=torch.int16).view(torch.float16),
    }
    packer = get_packer("auto_round").resolve(spec)
    assert packer.name == case["packing_format"]
    ours = packer.pack(qt)
    for name, tensor in reference.items():
        assert torch.equal(ours[name], tensor), name
    _assert_same(packer.unpack(reference, spec, in_features, out_features), qt)


def test_bad_override_names_the_layer() -> None:
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.mlp\.up_proj': invalid overrides"):
        get_packer(ZP).quantization_config(LayerSpec(), {"model.layers.0.mlp.up_proj": {"bits": 5}}, {})


@pytest.mark.parametrize(
    ("bits", "lr", "minmax_lr", "expected"),
    [(4, None, None, (5e-3, 5e-3)), (4, 1e-2, None, (1e-2, 1e-2)), (2, None, None, (1e-2, 1e-2))],
)
def test_a_saved_checkpoint_records_the_learning_rates_the_run_used(
    stories_dir, shakespeare, tmp_path, bits, lr, minmax_lr, expected
) -> None:
    """The automatic lr is resolved (0.25 / max(iters, 50) = 5e-3 at iters 3, 0.5 / 50 at 2 bits; not the
    reference's 1/iters) and minmax_lr follows lr: a reader assuming the reference's defaults for missing keys would
    get them wrong."""
    ar = signround.AutoRound(
        str(stories_dir), bits=bits, group_size=32, iters=3, lr=lr, minmax_lr=minmax_lr, nsamples=4, seqlen=32,
        batch_size=2, dataset=str(shakespeare), dtype=torch.float32, show_progress=False,
    )  # fmt: skip
    out = ar.quantize_and_save(tmp_path / "out")
    qc = json.loads((Path(out) / "config.json").read_text())["quantization_config"]
    assert (qc["lr"], qc["minmax_lr"]) == pytest.approx(expected)


def test_a_mixed_width_run_tunes_every_block_at_the_step_it_records(stories_dir, shakespeare, tmp_path) -> None:
    """With one 2-bit layer in block 0 of a 4-bit run, the automatic step is the 2-bit one (0.5 / 50 at iters 3)
    for every block, and the checkpoint records it: the later, all-4-bit blocks tune exactly as at an explicit
    lr=1e-2 and not as at 5e-3 (the 4-bit step a per-block rule would give them)."""

    def tuned(lr: float | None) -> tuple[signround.AutoRound, dict[str, torch.Tensor]]:
        ar = signround.AutoRound(
            str(stories_dir), bits=4, group_size=32, iters=3, lr=lr, nsamples=4, seqlen=32, batch_size=2,
            dataset=str(shakespeare), dtype=torch.float32, show_progress=False,
            layer_config={"model.layers.0.self_attn.o_proj": {"bits": 2}}, low_cpu_mem_usage=False,
        )  # fmt: skip
        ar.quantize()
        return ar, {name: q.codes.clone() for name, q in ar.result.report.quantized.items()}

    automatic, codes = tuned(None)
    automatic.save_quantized(tmp_path / "out")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert (qc["lr"], qc["minmax_lr"]) == pytest.approx((1e-2, 1e-2))
    later = [name for name in codes if not name.startswith("model.layers.0.")]
    assert later, "the test needs blocks after the mixed one"
    same, four_bit = tuned(1e-2)[1], tuned(5e-3)[1]
    assert all(torch.equal(codes[name], same[name]) for name in codes)
    assert any(not torch.equal(codes[name], four_bit[name]) for name in later)
