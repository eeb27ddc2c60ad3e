"""Proves the ``marlin`` / ``exllamav2`` bridge against GPTQModel's own code, on CPU, inside the gptqmodel venv.

    PYTHONPATH=src .venv-interop/bin/python integration_tests/gptqmodel_kernel_worker.py OUT.json

GPTQModel's Marlin and ExLlamaV2 layers need CUDA, but before their ``post_init`` they hold the same GPTQ tensors
as its pure-torch ``TorchLinear`` (v2 zero points, which that layer reads too), and that one runs on CPU.  So:

1. ``limits``: our descriptors equal the class attributes of GPTQModel's ``MarlinLinear`` / ``ExllamaV2Linear``
   (bits, group sizes, symmetry, dtypes, divisibility, zero-point format), and our Marlin tile rule equals
   ``gptqmodel.utils.marlin.marlin_is_tile_aligned``.
2. ``v1_to_v2``: our v1 ``gptq`` tensors, converted by GPTQModel's own v1 -> v2 function, equal the tensors we hand
   it (``gptqmodel_tensors``).
3. ``conversion``: ``build_gptq_layer(TorchLinear, ...)`` dequantizes to exactly our dequantized weight (fp16).
4. ``wrapper``: our bridge class around ``TorchLinear`` (same code path as the CUDA backends, other kernel) matches
   our ``torch`` backend in fp16 and bf16, and saves only our checkpoint buffers.

Bits 4 and 8, symmetric and asymmetric, group sizes 32 / 128 / -1.  Writes ``{"ok": bool, "failures": [...],
"max_rel_err": {...}}`` to OUT.json and exits 1 on any failure.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")  # TorchLinear.post_init torch.compiles its dequantize
os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

import torch
from gptqmodel.nn_modules.qlinear.exllamav2 import ExllamaV2Linear
from gptqmodel.nn_modules.qlinear.marlin import MarlinLinear
from gptqmodel.nn_modules.qlinear.torch import TorchLinear
from gptqmodel.utils.marlin import marlin_is_tile_aligned
from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module

from signround.kernels import get_backend
from signround.kernels.gptqmodel_bridge import GptqModelQuantLinear, build_gptq_layer, gptqmodel_tensors
from signround.kernels.marlin import tile_aligned
from signround.kernels.torch import TorchQuantLinear
from signround.packing import get_packer
from signround.quant.int import dequantize, quantize
from signround.schemes import LayerSpec

CASES = [(bits, gs, sym) for bits in (4, 8) for gs in (32, 128, -1) for sym in (True, False)]
IN, OUT = 512, 256


class GptqModelTorchQuantLinear(GptqModelQuantLinear):
    """The bridge around GPTQModel's CPU kernel: what MarlinQuantLinear does, with TorchLinear's post_init."""

    backend_name = "gptqmodel_torch"

    def _build_kernel(self, qt):
        self.compute_dtype = self.dtype
        layer = build_gptq_layer(TorchLinear, qt, self.dtype)
        layer.post_init()
        return layer


def check_limits(fail) -> None:
    marlin, exl = get_backend("marlin"), get_backend("exllamav2")
    for ours, theirs in ((marlin, MarlinLinear), (exl, ExllamaV2Linear)):
        name = theirs.__name__
        pairs = {
            "bits": (set(ours.bits), set(theirs.SUPPORTS_BITS)),
            "group_sizes": (set(ours.group_sizes), set(theirs.SUPPORTS_GROUP_SIZE)),
            "sym": (set(ours.sym), set(theirs.SUPPORTS_SYM)),
            "dtypes": (set(ours.dtypes), set(theirs.SUPPORTS_DTYPES)),
            "pack_dtypes": ({torch.int32}, set(theirs.SUPPORTS_PACK_DTYPES)),
        }
        for field, (a, b) in pairs.items():
            if a != b:
                fail(f"limits: {ours.name}.{field} = {sorted(map(str, a))}, GPTQModel {name}: {sorted(map(str, b))}")
        for theirs_div, ours_mult, what in (
            (theirs.SUPPORTS_IN_FEATURES_DIVISIBLE_BY, ours.in_features_multiple, "in"),
            (theirs.SUPPORTS_OUT_FEATURES_DIVISIBLE_BY, ours.out_features_multiple, "out"),
        ):
            if any(ours_mult % d for d in theirs_div):
                fail(f"limits: {ours.name} {what}_features multiple {ours_mult} is not a multiple of {theirs_div}")
    if set(MarlinLinear.TYPE_MAP) != {(4, True), (8, True)} or MarlinLinear.REQUIRES_FORMAT_V2:
        fail(f"limits: MarlinLinear TYPE_MAP {set(MarlinLinear.TYPE_MAP)}, v2={MarlinLinear.REQUIRES_FORMAT_V2}")
    if not (ExllamaV2Linear.REQUIRES_FORMAT_V2 and TorchLinear.REQUIRES_FORMAT_V2):
        fail("limits: ExllamaV2Linear / TorchLinear no longer read v2 zero points")
    for n in range(64, 1025, 64):
        for k in range(64, 1025, 64):
            if tile_aligned(k, n) != marlin_is_tile_aligned(n, k):
                fail(f"limits: tile_aligned(in={k}, out={n}) differs from GPTQModel")


def main(out_path: str) -> int:
    failures: list[str] = []
    errors: dict[str, float] = {}
    check_limits(failures.append)
    for bits, gs, sym in CASES:
        spec = LayerSpec(bits=bits, group_size=gs, sym=sym)
        tag = f"b{bits}_g{gs}_{'sym' if sym else 'asym'}"
        g = torch.Generator().manual_seed(bits * 100 + gs + sym)
        qt = quantize(torch.randn(OUT, IN, generator=g) * 0.05, spec)
        ours = gptqmodel_tensors(qt)

        if sym:  # v1 -> v2 through GPTQModel's own conversion (asymmetric v1 is refused by our packer)
            layer = build_gptq_layer(TorchLinear, qt, torch.float16)
            layer.qzeros.data.copy_(get_packer("gptq").pack(qt)["qzeros"])
            convert_gptq_v1_to_v2_format_module(layer, bits=bits, pack_dtype=torch.int32)
            if not torch.equal(layer.qzeros, ours["qzeros"]):
                failures.append(f"v1_to_v2 {tag}: GPTQModel's v1->v2 qzeros differ from gptqmodel_tensors")

        layer = build_gptq_layer(TorchLinear, qt, torch.float16)
        theirs_w = layer.dequantize_weight().t()
        if not torch.equal(theirs_w, dequantize(qt, torch.float16)):
            diff = float((theirs_w.float() - dequantize(qt)).abs().max())
            failures.append(f"conversion {tag}: TorchLinear dequantizes differently (max abs diff {diff:.3g})")

        bias = torch.randn(OUT, generator=g) * 0.1
        for dtype in (torch.float16, torch.bfloat16):
            packing = "gptq" if sym else "gptq_v2"
            ref = TorchQuantLinear.from_quantized(qt, packing, bias.to(dtype), dtype)
            bridged = GptqModelTorchQuantLinear.from_quantized(qt, packing, bias.to(dtype), dtype)
            x = torch.randn(3, 5, IN, generator=g).to(dtype)
            with torch.no_grad():
                expected, got = ref(x).float(), bridged(x).float()
            err = float((got - expected).abs().max() / expected.abs().max())
            errors[f"{tag}_{str(dtype).removeprefix('torch.')}"] = err
            if err > (1e-2 if dtype == torch.float16 else 3e-2):
                failures.append(f"wrapper {tag} {dtype}: rel err {err:.3g}")
            if set(bridged.state_dict()) != set(ref.state_dict()) or list(bridged.children()):
                failures.append(f"wrapper {tag}: state_dict {sorted(bridged.state_dict())} / children leak")

    report = {"ok": not failures, "failures": failures, "max_rel_err": errors}
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report, indent=1))
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
