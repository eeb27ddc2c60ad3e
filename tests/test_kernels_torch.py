"""The torch QuantLinear against the dequantized reference, meta construction, and load-time checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from signround.kernels.torch import TorchQuantLinear
from signround.packing import get_packer
from signround.quant.int import dequantize, quantize
from signround.schemes import LayerSpec

IN, OUT = 128, 96
CASES = [
    (2, 32, True),
    (2, 64, False),
    (3, 32, False),
    (3, -1, True),
    (4, 128, True),
    (4, 32, False),
    (8, -1, False),
    (8, 64, True),
]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _layer(spec: LayerSpec, dtype: torch.dtype, bias: bool = True, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    qt = quantize((torch.randn(OUT, IN, generator=gen) * 0.02).to(device), spec)
    b = torch.randn(OUT, generator=gen).to(device=device, dtype=dtype) if bias else None
    packing = get_packer("auto_round").resolve(spec).name
    return TorchQuantLinear.from_quantized(qt, packing, b, dtype), qt, b


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("bits", "group_size", "sym"), CASES)
def test_forward_equals_dequantized_reference(bits, group_size, sym, dtype, device) -> None:
    spec = LayerSpec(bits=bits, group_size=group_size, sym=sym)
    layer, qt, bias = _layer(spec, dtype, device=device)
    x = torch.randn(2, 3, IN, device=device).to(dtype)
    expected = F.linear(x, dequantize(qt, dtype), bias)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (2, 3, OUT)
    # the very same weight values; the matmul may sum in another order (the layer's weight is [in, out]-major)
    assert torch.equal(dequantize(layer.quantized_tensor(), dtype), dequantize(qt, dtype))
    torch.testing.assert_close(out, expected)


def test_without_bias_and_not_an_nn_linear() -> None:
    spec = LayerSpec(bits=4, group_size=32)
    layer, qt, _ = _layer(spec, torch.float32, bias=False)
    assert layer.bias is None and not isinstance(layer, nn.Linear)
    x = torch.randn(5, IN)
    torch.testing.assert_close(layer(x), x @ dequantize(qt).t(), rtol=1e-5, atol=1e-6)  # summation order only
    assert list(layer.state_dict()) == ["qweight", "qzeros", "scales"]


def test_buffers_carry_checkpoint_names_shapes_dtypes() -> None:
    spec = LayerSpec(bits=3, group_size=32, sym=True)
    layer, qt, _ = _layer(spec, torch.bfloat16)
    state = layer.state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == {
        "qweight": ((IN // 32 * 3, OUT), torch.int32),
        "qzeros": ((IN // 32, OUT // 32 * 3), torch.int32),
        "scales": ((IN // 32, OUT), torch.float16),
        "bias": ((OUT,), torch.bfloat16),
    }
    back = layer.quantized_tensor()
    assert torch.equal(back.codes, qt.codes) and torch.equal(back.zeros, qt.zeros)
    assert torch.equal(back.scales, qt.scales)


def test_meta_construction_then_load() -> None:
    spec = LayerSpec(bits=4, group_size=64, sym=False)
    source, _, _ = _layer(spec, torch.float32)
    meta = TorchQuantLinear(IN, OUT, spec, "auto_round", True, torch.float32, device="meta")
    assert all(t.device.type == "meta" for t in meta.state_dict().values())
    meta.load_state_dict(source.state_dict(), assign=True)
    meta.check_loaded("model.layers.0.mlp.up_proj")
    meta.post_init()
    x = torch.randn(4, IN)
    torch.testing.assert_close(meta(x), source(x), rtol=0, atol=0)


def _loaded(seed: int = 0) -> TorchQuantLinear:
    layer, _, _ = _layer(LayerSpec(bits=4, group_size=32), torch.float32, seed=seed)
    layer.check_loaded("ok")
    return layer


@pytest.mark.parametrize(
    ("corrupt", "needle"),
    [
        (lambda m: setattr(m, "qweight", torch.empty(m.qweight.shape, dtype=torch.int32, device="meta")), "meta"),
        (lambda m: setattr(m, "scales", m.scales.float()), "'scales' has dtype torch.float32"),
        (lambda m: setattr(m, "qzeros", torch.zeros(1, 1, dtype=torch.int32)), "'qzeros' has shape (1, 1)"),
        (lambda m: m.scales.view(-1)[3].fill_(float("nan")), "'scales' holds non-finite"),
        (lambda m: m.bias.view(-1)[0].fill_(float("inf")), "'bias' holds non-finite"),
    ],
)
def test_check_loaded_names_layer_and_buffer(corrupt, needle) -> None:
    layer = _loaded()
    corrupt(layer)
    with pytest.raises(ValueError, match=r"model\.layers\.7\.self_attn\.o_proj") as err:
        layer.check_loaded("model.layers.7.self_attn.o_proj")
    assert needle in str(err.value)


def test_constructor_refuses_a_shape_the_packing_cannot_hold() -> None:
    with pytest.raises(ValueError, match="out_features=100"):
        TorchQuantLinear(IN, 100, LayerSpec(bits=4), "auto_round", False, torch.float32, device="meta")
