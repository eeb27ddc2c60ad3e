"""triton (our fused dequantize + matmul kernel) against the torch reference.

On a machine with CUDA the kernel runs compiled on the GPU; elsewhere on CPU through Triton's interpreter
(``TRITON_INTERPRET=1``), which executes the kernel body with numpy program by program, so shapes stay small.
Tolerances, as a fraction of the reference output's largest magnitude:

* fp32 activations: 1e-5.  The dequantized weights are bit-identical to the reference's (``(q - z) * s`` is exact
  in fp32); only the summation order differs.
* fp16: 1e-3 (one fp16 ulp of the output).  Weights again bit-identical; both accumulate in fp32, round once.
* bf16: 2e-2.  The reference rounds each scale to bf16 before multiplying (the kernel rounds only the product),
  and the interpreter's fp32 -> bf16 casts truncate where a GPU rounds to nearest (one more ulp, 0.8 %).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton", reason="triton is not installed (pip install 'triton>=3.0')")
if not hasattr(triton, "jit"):  # e.g. a folder named ``triton`` in the working directory
    pytest.skip(f"{triton.__path__} shadows the triton package", allow_module_level=True)

from signround.kernels import candidates, select  # noqa: E402
from signround.kernels.torch import TorchQuantLinear  # noqa: E402
from signround.kernels.triton import (  # noqa: E402
    Tiles,
    TritonQuantLinear,
    default_tiles,
    dequant_matmul,
    load_kernel,
    pack_along_k,
)
from signround.packing import get_packer  # noqa: E402
from signround.quant.int import dequantize, effective_group_size, quantize  # noqa: E402
from signround.schemes import LayerSpec  # noqa: E402
from signround.tuning.rtn import optimized_rtn_params  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 2e-2}
IN, OUT = 256, 96  # OUT is not a multiple of the 64-wide output tile: the edge tile is masked


@pytest.fixture(scope="module", autouse=True)
def _kernel():
    """On CPU, define the kernel under the interpreter for this module only, and forget that kernel afterwards."""
    patch = pytest.MonkeyPatch()
    if DEVICE == "cpu":
        patch.setenv("TRITON_INTERPRET", "1")  # read when load_kernel() defines the kernel
    load_kernel.cache_clear()
    assert load_kernel()[1] == (DEVICE == "cpu")
    yield
    patch.undo()
    load_kernel.cache_clear()


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).abs().max() / expected.float().abs().max())


def _layers(spec: LayerSpec, packing: str, dtype: torch.dtype, in_features: int = IN, out_features: int = OUT):
    gen = torch.Generator().manual_seed(spec.bits * 1000 + spec.group_size + 7 * spec.sym)
    qt = quantize((torch.randn(out_features, in_features, generator=gen) * 0.05).to(DEVICE), spec)
    bias = (torch.randn(out_features, generator=gen) * 0.1).to(DEVICE, dtype)
    ref = TorchQuantLinear.from_quantized(qt, packing, bias, dtype)
    return ref, TritonQuantLinear.from_quantized(qt, packing, bias, dtype)


def _check(ref, fast, x: torch.Tensor) -> float:
    x = x.to(DEVICE)
    with torch.no_grad():
        expected, got = ref(x), fast(x)
    assert got.shape == expected.shape and got.dtype == x.dtype
    err = _rel_err(got, expected)
    assert err <= TOL[x.dtype], f"relative error {err:.2e} > {TOL[x.dtype]:.0e}"
    return err


PACKINGS = ("auto_round:auto_gptq", "auto_round", "gptq", "gptq_v2", "awq_gemm")
CASES = [
    (bits, gs, sym, packing)
    for bits in (2, 4, 8)
    for gs in (32, 128, -1)
    for sym in (True, False)
    for packing in PACKINGS
    if get_packer(packing).can_hold_spec(LayerSpec(bits=bits, group_size=gs, sym=sym)) is None
]


@pytest.mark.parametrize(("bits", "group_size", "sym", "packing"), CASES)
def test_matches_torch_reference_fp32(bits: int, group_size: int, sym: bool, packing: str) -> None:
    ref, fast = _layers(LayerSpec(bits=bits, group_size=group_size, sym=sym), packing, torch.float32)
    _check(ref, fast, torch.randn(5, IN, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("bits", "group_size", "sym"), [(2, 32, False), (4, 128, True), (8, -1, False)])
def test_matches_torch_reference_half(bits: int, group_size: int, sym: bool, dtype: torch.dtype) -> None:
    spec = LayerSpec(bits=bits, group_size=group_size, sym=sym)
    ref, fast = _layers(spec, get_packer("auto_round").resolve(spec).name, dtype)
    _check(ref, fast, torch.randn(5, IN, generator=torch.Generator().manual_seed(2)).to(dtype))


@pytest.mark.parametrize("shape", [(1, IN), (33, IN), (70, IN), (3, 11, IN), (0, IN)])
def test_token_counts_and_leading_dims(shape: tuple[int, ...]) -> None:
    """Decode (1 token), 33 rows (a partly masked 64-row tile), 70 (two row tiles), 3-D input, an empty batch."""
    ref, fast = _layers(LayerSpec(bits=4, group_size=64, sym=False), "auto_round", torch.float32)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(3))
    if x.numel() == 0:
        assert fast(x.to(DEVICE)).shape == (*shape[:-1], OUT)
    else:
        _check(ref, fast, x)


def test_no_bias_and_strided_rows() -> None:
    spec = LayerSpec(bits=4, group_size=32, sym=True)
    qt = quantize((torch.randn(OUT, IN, generator=torch.Generator().manual_seed(4)) * 0.05).to(DEVICE), spec)
    fast = TritonQuantLinear.from_quantized(qt, "gptq", None, torch.float32)
    x = torch.randn(IN, 6, generator=torch.Generator().manual_seed(5)).to(DEVICE).t()  # rows not contiguous
    with torch.no_grad():
        assert _rel_err(fast(x), F.linear(x, dequantize(qt))) <= TOL[torch.float32]


# (in, out, group_size, tiles): shapes that are no tile multiple (in=100 also pads the last packed word), a group
# size that is no power of two, and forced tiles whose BLOCK_K spans several groups (the per-row gather path).
ODD = [
    (100, 50, 20, None),
    (100, 50, -1, None),
    (256, 96, 32, Tiles(16, 32, 64)),
    (96, 40, 32, Tiles(16, 16, 128)),
]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("in_features", "out_features", "group_size", "tiles"), ODD)
def test_kernel_on_odd_shapes_and_both_scale_paths(
    bits: int, in_features: int, out_features: int, group_size: int, tiles: Tiles | None
) -> None:
    """The kernel itself, below the packings (which need multiples of 32)."""
    spec = LayerSpec(bits=bits, group_size=group_size, sym=False)
    gen = torch.Generator().manual_seed(bits + in_features)
    qt = quantize((torch.randn(out_features, in_features, generator=gen) * 0.05).to(DEVICE), spec)
    bias = torch.randn(out_features, generator=gen).to(DEVICE)
    x = torch.randn(7, in_features, generator=gen).to(DEVICE)
    got = dequant_matmul(
        x,
        pack_along_k(qt.codes, bits),
        qt.scales.t().contiguous(),
        qt.zeros.t().to(torch.uint8).contiguous(),
        bias,
        bits,
        effective_group_size(group_size, in_features),
        tiles,
    )
    assert _rel_err(got, F.linear(x, dequantize(qt), bias)) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("in_features", "out_features", "group_size", "tiles"), ODD)
def test_unpacking_each_word_once_gives_the_same_output(
    bits: int, in_features: int, out_features: int, group_size: int, tiles: Tiles | None, dtype: torch.dtype
) -> None:
    """``unpack_once`` (a decode candidate) shifts each loaded word into its codes in registers: the same codes,
    the same dot, so the same output bit for bit, padded last words and both scale paths included."""
    spec = LayerSpec(bits=bits, group_size=group_size, sym=False)
    gen = torch.Generator().manual_seed(bits * 7 + in_features)
    qt = quantize((torch.randn(out_features, in_features, generator=gen) * 0.05).to(DEVICE), spec)
    gs = effective_group_size(group_size, in_features)
    tables = (pack_along_k(qt.codes, bits), qt.scales.t().contiguous(), qt.zeros.t().to(torch.uint8).contiguous())
    base = tiles or default_tiles(3, gs)
    x = torch.randn(3, in_features, generator=gen).to(DEVICE, dtype)
    plain = dequant_matmul(x, *tables, None, bits, gs, base)
    once = dequant_matmul(x, *tables, None, bits, gs, dataclasses.replace(base, unpack_once=True))
    assert torch.equal(plain, once)


@pytest.mark.parametrize("sym", [True, False])
def test_real_model_layer(stories_dir, sym: bool) -> None:
    """stories260K's first q_proj, optimised RTN at W4 g32, fed real token embeddings."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32).eval().to(DEVICE)
    linear = model.model.layers[0].self_attn.q_proj
    spec = LayerSpec(bits=4, group_size=32, sym=sym)
    alpha, beta = optimized_rtn_params(linear.weight.detach(), spec)
    qt = quantize(linear.weight.detach(), spec, alpha=alpha, beta=beta)
    packing = get_packer("auto_round").resolve(spec).name
    ref = TorchQuantLinear.from_quantized(qt, packing, None, torch.float32)
    fast = TritonQuantLinear.from_quantized(qt, packing, None, torch.float32)
    with torch.no_grad():
        x = model.model.embed_tokens(torch.arange(1, 41, device=DEVICE).reshape(2, 20))
    _check(ref, fast, x)


def test_gptq_layout_is_shared_and_saving_writes_the_checkpoint_layout() -> None:
    for packing, sym, shared in (("auto_round", False, True), ("gptq", True, True), ("awq_gemm", False, False)):
        ref, fast = _layers(LayerSpec(bits=4, group_size=32, sym=sym), packing, torch.float16)
        assert (fast.triton_weight is fast.qweight) is shared  # GPTQ words are the kernel's own: no copy
        assert set(fast.state_dict()) == set(ref.state_dict())  # the kernel's buffers are not persistent
        # on a GPU, a layer whose kernel keeps its own copy (AWQ words) holds the checkpoint tensors on the CPU
        assert all(torch.equal(fast.state_dict()[k].cpu(), v.cpu()) for k, v in ref.state_dict().items())


def test_cpu_without_interpreter_is_refused(monkeypatch) -> None:
    spec = LayerSpec(bits=4, group_size=32)
    qt = quantize(torch.randn(OUT, IN) * 0.05, spec)
    fast = TritonQuantLinear.from_quantized(qt, "auto_round", None, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    load_kernel.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1.*'torch' backend"):
            fast(torch.randn(2, IN))
    finally:
        if DEVICE == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        load_kernel.cache_clear()


def test_importing_signround_does_not_import_triton() -> None:
    code = "import sys, signround.kernels; assert 'triton' not in sys.modules, 'triton imported eagerly'"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# -- selection --------------------------------------------------------------------------------------------------
W4 = LayerSpec(bits=4, group_size=128, sym=True)
PACKING = "auto_round:auto_gptq"


def test_selected_on_cuda_when_no_faster_backend_is_usable() -> None:
    ranked = candidates(W4, PACKING, "cuda", torch.float16, 256, 512)
    reasons = {b.name: r for b, r in ranked}
    assert reasons["triton"] is None
    faster = [b.name for b, r in ranked if b.priority > 2 and r is None]
    if faster:
        pytest.skip(f"faster backends are usable here: {faster}")
    assert select(W4, PACKING, "cuda", torch.float16, 256, 512).name == "triton"
    assert select(LayerSpec(bits=2, group_size=-1, sym=False), "gptq_v2", "xpu", torch.bfloat16, 256, 512).name == (
        "triton"
    )


def test_rejections_name_the_reason() -> None:
    def reason(spec: LayerSpec, device: str) -> str | None:
        return {b.name: r for b, r in candidates(spec, PACKING, device, torch.float16, 256, 512)}["triton"]

    assert reason(W4, "cpu") == "device 'cpu' not in ['cuda', 'xpu']"
    assert reason(LayerSpec(bits=3, group_size=128), "cuda") == "bits=3 not in [2, 4, 8]"
    assert select(W4, PACKING, "cpu", torch.float16, 256, 512).name != "triton"
