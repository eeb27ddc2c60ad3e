"""The torch QuantLinear against the dequantized reference, meta construction, and load-time checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_pairs import graph_replay_and_eager
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


# -- the per-forward path reads no stored value on the host ---------------------------------------------------------
# Every packing with a spec it holds (awq_gemm: 4-bit asym only; gptq v1 / pack-quantized: both symmetries).
PACKINGS = [
    ("auto_round", LayerSpec(bits=4, group_size=32, sym=False)),
    ("auto_round:auto_gptq", LayerSpec(bits=4, group_size=32, sym=True)),
    ("auto_round:gptqmodel", LayerSpec(bits=4, group_size=32, sym=True)),
    ("awq_gemm", LayerSpec(bits=4, group_size=32, sym=False)),
    ("gptq", LayerSpec(bits=4, group_size=32, sym=True)),
    ("gptq_v2", LayerSpec(bits=3, group_size=32, sym=False)),
    ("pack-quantized", LayerSpec(bits=4, group_size=32, sym=True)),
    ("pack-quantized", LayerSpec(bits=8, group_size=-1, sym=False)),
]
# ops that hand a tensor's value to Python: each one waits for the GPU and breaks a CUDA graph capture
HOST_READS = {"aten._local_scalar_dense", "aten.equal", "aten.is_nonzero", "aten.item"}


class _RecordOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.devices: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(str(func.overloadpacket))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.devices.add(t.device.type)
        return out


def _packed_layer(packing: str, spec: LayerSpec) -> TorchQuantLinear:
    qt = quantize(torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1)) * 0.02, spec)
    layer = TorchQuantLinear.from_quantized(qt, packing, None, torch.float32)
    layer.check_loaded("x")
    return layer


@pytest.mark.parametrize(("packing", "spec"), PACKINGS, ids=[f"{p}-w{s.bits}g{s.group_size}" for p, s in PACKINGS])
def test_forward_reads_no_stored_value_on_the_host(packing: str, spec: LayerSpec) -> None:
    """The torch backend unpacks on every forward: a host read there (g_idx compared on the CPU, ``int()`` of a
    stored shape) cost the GPU a synchronisation per layer per token and made the layer uncapturable."""
    layer = _packed_layer(packing, spec)
    with torch.no_grad(), _RecordOps() as record:
        layer(torch.randn(2, IN))
    assert record.ops and not HOST_READS & set(record.ops), sorted(HOST_READS & set(record.ops))
    # on the meta device every tensor the forward makes must be on meta: a factory call without a device would
    # make a host tensor (copied to the GPU each call there)
    meta = TorchQuantLinear(IN, OUT, spec, packing, False, torch.float32, device="meta")
    with torch.no_grad(), _RecordOps() as record:
        out = meta(torch.empty(2, IN, device="meta"))
    assert out.shape == (2, OUT) and record.devices == {"meta"}, record.devices


def test_check_loaded_reads_stored_values_through_the_packer() -> None:
    spec = LayerSpec(bits=4, group_size=32, sym=True)
    layer = _packed_layer("gptq", spec)
    layer.g_idx.copy_(layer.g_idx.flip(0))  # as a desc_act checkpoint stores it
    layer(torch.randn(1, IN))  # the forward does not look
    with pytest.raises(ValueError, match=r"layer 'model\.layers\.0\.mlp\.up_proj'.*act-order"):
        layer.check_loaded("model.layers.0.mlp.up_proj")
    other = _packed_layer("pack-quantized", spec)
    other.weight_shape.copy_(torch.tensor([IN, OUT]))
    with pytest.raises(ValueError, match=r"weight_shape \[128, 96\] does not match the layer \(96, 128\)"):
        other.check_loaded("x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("packing", "spec"), PACKINGS, ids=[f"{p}-w{s.bits}g{s.group_size}" for p, s in PACKINGS])
def test_cuda_graph_replay_equals_eager(packing: str, spec: LayerSpec) -> None:
    qt = quantize(torch.randn(OUT, IN, generator=torch.Generator().manual_seed(1)).cuda() * 0.02, spec)
    layer = TorchQuantLinear.from_quantized(qt, packing, None, torch.float16)
    x = torch.randn(3, IN, device="cuda", dtype=torch.float16)
    replayed, eager = graph_replay_and_eager(layer, x)
    torch.testing.assert_close(replayed, eager, rtol=0, atol=0)
