"""Intel's auto-round 0.16.1 symmetric ``auto_awq`` output loads through signround with Intel's own predictions.

For ``sym=True`` (its default W4A16) Intel writes ``quant_method: "awq"`` with ``zero_point: false`` and
``sym: true``, and still stores ``qzeros``, every nibble 8, with fp16 scales.  Intel's venv cannot load AWQ itself
(transformers' AWQ path needs gptqmodel), so its predictions come from its ``auto_round`` export of the same
quantization read by its own loader: one worker batch quantizes stories260K twice (W4G32 sym, iters 2; the run is
deterministic), once per format.  That both exports hold the same quantization is checked, not assumed: every
layer of the AWQ output unpacks to exactly the codes, scales and zero points of the auto_round output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_interop import REF_PY, _logits, needs_autoround  # same directory
from test_interop_moe import _batch, _same_predictions, _their_logits
from transformers import AutoModelForCausalLM

from signround import AutoRoundConfig
from signround.convert import read_checkpoint_config
from signround.layers import quant_linears
from signround.schemes import LayerSpec

QUANTIZED_LAYERS = 5 * 4  # stories260K: 5 blocks x 4 attention projections (its 172-wide MLPs stay 16 bit)


@pytest.fixture(scope="module")
def intel_made(tmp_path_factory, stories_dir: Path) -> tuple[dict[str, str | None], Path]:
    """Intel's auto_round output with its loader's logits, and its sym auto_awq output, of the same quantization."""
    tmp = tmp_path_factory.mktemp("intel_awq_sym")
    jobs = [
        ["autoround-make", str(stories_dir), str(tmp / "auto_round"), "--logits", str(tmp / "auto_round.safetensors")],
        ["autoround-make", str(stories_dir), str(tmp / "awq"), "--format", "auto_awq"],
    ]
    return _batch(REF_PY, jobs, tmp), tmp


def _unpacked_layers(ckpt: Path, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[torch.Tensor, ...]]:
    """``layer -> (codes, scales, zeros)`` for every ``layer -> (in_features, out_features)``, unpacked (and its
    stored values checked) by our packer for the checkpoint's format."""
    fmt = read_checkpoint_config(json.loads((ckpt / "config.json").read_text())["quantization_config"])
    tensors = load_file(str(ckpt / "model.safetensors"))
    layers = {}
    for name, (in_features, out_features) in shapes.items():
        own = {t: tensors[f"{name}.{t}"] for t in fmt.packer.tensor_names}
        fmt.packer.check_values(own, fmt.default, in_features, out_features)
        qt = fmt.packer.unpack(own, fmt.default, in_features, out_features)
        layers[name] = (qt.codes.to(torch.uint8), qt.scales, qt.zeros.to(torch.int32))
    return layers


@needs_autoround
def test_intel_sym_auto_awq_checkpoint_loads_in_ours(intel_made) -> None:
    results, tmp = intel_made
    theirs = _their_logits(results, tmp / "auto_round", tmp / "auto_round.safetensors")
    assert results[str(tmp / "awq")] is None, results[str(tmp / "awq")]
    ckpt = tmp / "awq"

    # what Intel writes: zero_point false (sym true), qzeros present with every nibble 8, fp16 scales
    cfg = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert (cfg["quant_method"], cfg["zero_point"], cfg["sym"], cfg["version"]) == ("awq", False, True, "gemm")
    tensors = load_file(str(ckpt / "model.safetensors"))
    qzeros = [t for k, t in tensors.items() if k.endswith(".qzeros")]
    assert len(qzeros) == QUANTIZED_LAYERS
    assert all(bool((z == 0x88888888 - 2**32).all()) for z in qzeros)
    assert all(t.dtype == torch.float16 for k, t in tensors.items() if k.endswith(".scales"))

    # the same quantization as Intel's auto_round export, layer by layer, exactly
    # AWQ qweight: [in, out / 8]
    shapes = {
        k.removesuffix(".qweight"): (t.shape[0], t.shape[1] * 8) for k, t in tensors.items() if k.endswith("qweight")
    }
    awq, auto_round = _unpacked_layers(ckpt, shapes), _unpacked_layers(tmp / "auto_round", shapes)
    for name, (codes, scales, zeros) in awq.items():
        ref_codes, ref_scales, ref_zeros = auto_round[name]
        assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales), name
        assert torch.equal(zeros, ref_zeros), name

    model = AutoModelForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, quantization_config=AutoRoundConfig(backend="torch")
    )
    layers = quant_linears(model)
    assert len(layers) == QUANTIZED_LAYERS
    assert {(layer.packer_name, layer.spec) for layer in layers.values()} == {
        ("awq_gemm", LayerSpec(bits=4, group_size=32, sym=True))
    }
    # Intel's CPU kernel runs in fp16 whatever dtype is asked for
    _same_predictions(_logits(model), theirs, rel=3e-3)
