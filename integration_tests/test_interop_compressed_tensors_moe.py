"""Foreign compressed-tensors MoE checkpoints (W4A16 ``pack-quantized``) load through signround with their own
loaders' predictions: tiny Qwen3-MoE and Mixtral (2 blocks, 4 experts, top-2), symmetric and asymmetric.

The foreign side runs in a subprocess (this file run as a script) that never imports signround:

* **Producer** — what llm-compressor (main, 2026) does for a W4A16 ``QuantizationModifier`` run, through
  compressed-tensors' own API: the fp model is loaded in bf16 with ``from_pretrained``; its fused experts are
  linearized into per-expert ``gate_proj`` / ``up_proj`` / ``down_proj`` Linear layers (llm-compressor's
  ``modeling/moe/linear_experts.py``: ``ExpertMLPWithGate`` takes rows ``[:F]`` / ``[F:]`` of ``gate_up_proj``);
  ``apply_quantization_config`` attaches the scheme (targets ``Linear``, ignore ``lm_head`` and the routers);
  weight scales / zero points come from compressed-tensors' min-max ``compute_dynamic_scales_and_zp`` (what
  llm-compressor's memoryless min-max weight observer computes; weight-only RTN needs no calibration data);
  ``ModelCompressor.from_pretrained_model(...).compress_model`` packs, ``save_pretrained`` writes and
  ``update_config`` writes the ``quantization_config`` (llm-compressor's ``save_pretrained_wrapper``).
  Expert names on disk: Qwen3-MoE ``model.layers.{i}.mlp.experts.{e}.gate_proj.weight_packed`` (its 2-D load
  mapping keeps them); Mixtral ``model.layers.{i}.block_sparse_moe.experts.{e}.gate_proj.weight_packed``:
  llm-compressor has no 2-D mapping for Mixtral (``conversion_mappings.ARCH_TO_2D_MAPPINGS``), so it linearizes
  after loading into ``gate_proj`` / ``up_proj`` / ``down_proj`` (not the original ``w1`` / ``w3`` / ``w2``), and
  transformers' save reverts Mixtral's ``block_sparse_moe`` -> ``mlp`` renaming.
* **transformers' own loader** (``CompressedTensorsHfQuantizer`` with ``CompressedTensorsConfig(dequantize=True)``,
  i.e. ``run_compressed=False``; transformers 5.24.0, compressed-tensors 0.20.1) loads the symmetric Qwen3-MoE
  checkpoint: its dequantize op runs before Qwen3-MoE's per-expert merge.  It cannot load the others: Mixtral's
  merge rule reads ``experts.*.w1`` / ``w3`` / ``w2``, so llm-compressor's ``gate_proj`` tensors are UNEXPECTED
  and the fused experts MISSING (left random); asymmetric experts fail in its ``CompressedTensorsDequantize``
  (its per-expert module carries no ``weight_zero_point``: "Asymmetric quant requires zero-point values").
* **compressed-tensors' own decompression** is the reference for every checkpoint: each packed layer through
  ``PackedQuantizationCompressor.decompress``, the experts stacked into the fp model's fused ``gate_up_proj`` /
  ``down_proj``, the rest loaded as stored.  The scales go in as float32 (as ``tests/test_packing_formats.py``
  does), so the reference is the exact dequantized model; decompressing with the checkpoint's bf16 scales would
  round every weight to bf16, which is what transformers' loader does (hence its looser tolerance below).

signround loads each checkpoint with ``AutoRoundConfig(backend="torch")`` (the exact dequantize-then-matmul
backend): no missing / unexpected / mismatched tensor, every packed layer a QuantLinear (experts per expert, none
left as a random Linear), each layer's dequantized weight equal to compressed-tensors' decompression, and logits
as the references'.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_families import make_causal_lm

# (family, symmetric); each model: 2 blocks x (4 attention projections + 4 experts x 3 Linear layers)
CASES = [("qwen3_moe", True), ("qwen3_moe", False), ("mixtral", True), ("mixtral", False)]
QUANTIZED_LAYERS = 2 * (4 + 4 * 3)
GROUP_SIZE = 32
# where llm-compressor's checkpoint puts each family's experts (in memory both are ``mlp``)
MOE_ON_DISK = {"qwen3_moe": "mlp", "mixtral": "block_sparse_moe"}
# transformers' own loader reads these (see the module docstring for why not the others)
NATIVE_CASES = [("qwen3_moe", True)]


def _name(family: str, sym: bool) -> str:
    return f"{family}-{'sym' if sym else 'asym'}"


IDS = [_name(*case) for case in CASES]


def _ids() -> torch.Tensor:
    return torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))


def _read_scheme(ckpt: Path):
    """The checkpoint's single config group (targets ``Linear``) and the compressor of its format."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(json.loads((ckpt / "config.json").read_text())["quantization_config"])
    (scheme,) = qc.config_groups.values()
    return scheme, BaseCompressor.get_value_from_registry(scheme.format or qc.format)


def decompressed_layers(ckpt: Path) -> dict[str, torch.Tensor]:
    """On-disk layer name -> its weight as compressed-tensors decompresses it (scales as float32: exact)."""
    scheme, compressor = _read_scheme(ckpt)
    stored = load_file(str(ckpt / "model.safetensors"))
    layers = {k.removesuffix(".weight_packed") for k in stored if k.endswith(".weight_packed")}
    out = {}
    for layer in sorted(layers):
        state = {k.rpartition(".")[2]: v for k, v in stored.items() if k.rpartition(".")[0] == layer}
        state["weight_scale"] = state["weight_scale"].float()
        out[layer] = compressor.decompress(state, scheme)["weight"]
    return out


# -- the foreign side: run as a script in a subprocess that never imports signround ----------------------------------
def _linearize_experts(model) -> int:
    """Fused experts -> a ModuleList of per-expert gate_proj / up_proj / down_proj Linear layers holding the same
    weights, as llm-compressor's linearization does (``ExpertMLPWithGate.copy_from_experts_module``)."""
    from torch import nn

    done = 0
    for name, module in list(model.named_modules()):
        if not isinstance(getattr(module, "gate_up_proj", None), nn.Parameter):
            continue
        assert module.has_gate and module.is_concatenated and not module.is_transposed and not module.has_bias
        num_experts, two_f, _ = module.gate_up_proj.shape
        f = two_f // 2
        experts = nn.ModuleList()
        for e in range(num_experts):
            expert = nn.Module()
            for proj, weight in (
                ("gate_proj", module.gate_up_proj[e, :f]),
                ("up_proj", module.gate_up_proj[e, f:]),
                ("down_proj", module.down_proj[e]),
            ):
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
                linear.weight.data.copy_(weight)
                expert.add_module(proj, linear)
            experts.append(expert)
        model.set_submodule(name, experts)
        done += 1
    return done


def write_llm_compressor_checkpoint(fp_dir: Path, out: Path, sym: bool) -> None:
    """W4A16 (int4, group 32) ``pack-quantized`` checkpoint of ``fp_dir`` as llm-compressor writes it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp, is_module_quantized
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.bfloat16)
    assert _linearize_experts(model) == 2
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=sym, strategy="group", group_size=GROUP_SIZE)
    config = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head", "re:.*mlp.gate$"],
    )
    apply_quantization_config(model, config, show_progress=False)
    quantized = [m for m in model.modules() if is_module_quantized(m)]
    assert len(quantized) == QUANTIZED_LAYERS, len(quantized)
    with torch.no_grad():
        for module in quantized:
            scale, zero_point = compute_dynamic_scales_and_zp(module.weight, module.quantization_scheme.weights, module)
            module.weight_scale.copy_(scale)
            module.weight_zero_point.copy_(zero_point)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(str(out))


def native_logits(ckpt: Path) -> tuple[torch.Tensor | None, str]:
    """transformers' own compressed-tensors loader (dequantize on load): logits and "clean", or None and what
    went wrong (an exception, or tensors it left unused / params it left random)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            ckpt, dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True),
            output_loading_info=True,
        )  # fmt: skip
    except Exception as err:
        return None, f"{type(err).__name__}: {str(err)[:200]}"
    problems = {k: len(v) for k, v in info.items() if v}
    if problems:
        return None, f"loads with {problems} (e.g. {sorted(info['missing_keys'])[:1]} random)"
    with torch.no_grad():
        return model(_ids()).logits.float(), "clean"


def decompressed_logits(ckpt: Path, fp_dir: Path, family: str) -> torch.Tensor:
    """The fp model with every weight from the checkpoint, each packed layer decompressed by compressed-tensors and
    the per-expert weights stacked into the fused experts (``gate_up_proj[e] = [gate; up]``)."""
    from transformers import AutoModelForCausalLM

    stored = load_file(str(ckpt / "model.safetensors"))
    layers = decompressed_layers(ckpt)
    weights = {k: v for k, v in stored.items() if k.rpartition(".")[0] not in layers}
    weights.update({f"{layer}.weight": w for layer, w in layers.items()})
    moe = MOE_ON_DISK[family]
    weights = {k.replace(f".{moe}.", ".mlp."): v for k, v in weights.items()}  # transformers' Mixtral renaming
    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
    fused = set()
    with torch.no_grad():
        for i, block in enumerate(model.model.layers):
            experts, prefix = block.mlp.experts, f"model.layers.{i}.mlp.experts"
            n = experts.down_proj.shape[0]
            gate_up = [
                torch.cat([weights.pop(f"{prefix}.{e}.{p}.weight") for p in ("gate_proj", "up_proj")]) for e in range(n)
            ]
            down = [weights.pop(f"{prefix}.{e}.down_proj.weight") for e in range(n)]
            experts.gate_up_proj.copy_(torch.stack(gate_up))
            experts.down_proj.copy_(torch.stack(down))
            fused |= {f"{prefix}.gate_up_proj", f"{prefix}.down_proj"}
        missing, unexpected = model.load_state_dict(weights, strict=False)
    assert set(missing) == fused and not unexpected, (sorted(set(missing) - fused), unexpected)
    with torch.no_grad():
        return model(_ids()).logits.float()


def foreign_main(out: Path) -> None:
    """Every case's checkpoint (``out/<case>``) and references (``out/logits.safetensors``, ``out/native.json``)."""
    logits, native = {}, {}
    for family, sym in CASES:
        name = _name(family, sym)
        fp_dir, ckpt = out / f"{name}-fp", out / name
        make_causal_lm(family).save_pretrained(fp_dir)
        write_llm_compressor_checkpoint(fp_dir, ckpt, sym)
        logits[f"decompressed/{name}"] = decompressed_logits(ckpt, fp_dir, family)
        theirs, native[name] = native_logits(ckpt)
        if theirs is not None:
            logits[f"native/{name}"] = theirs
    assert "signround" not in sys.modules, "the foreign side must not import signround"
    save_file({k: v.contiguous() for k, v in logits.items()}, str(out / "logits.safetensors"))
    (out / "native.json").write_text(json.dumps(native, indent=1))


# -- the tests ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """The foreign checkpoints and their references, made in a subprocess that never imports signround."""
    out = tmp_path_factory.mktemp("ct_moe")
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(out)], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"the compressed-tensors side failed:\n{done.stderr[-4000:]}"
    native = json.loads((out / "native.json").read_text())
    print(f"compressed-tensors side: {time.perf_counter() - start:.1f} s; transformers' own loader: {native}")
    return out, load_file(str(out / "logits.safetensors")), native


@pytest.fixture(scope="module")
def ours(foreign) -> dict[str, tuple[torch.nn.Module, dict, torch.Tensor]]:
    """Each checkpoint loaded through signround: (model, loading info, logits)."""
    from transformers import AutoModelForCausalLM

    import signround

    out, _, _ = foreign
    loaded = {}
    for family, sym in CASES:
        name = _name(family, sym)
        model, info = AutoModelForCausalLM.from_pretrained(
            out / name, dtype=torch.float32, quantization_config=signround.AutoRoundConfig(backend="torch"),
            output_loading_info=True,
        )  # fmt: skip
        with torch.no_grad():
            loaded[name] = (model, info, model(_ids()).logits.float())
    return loaded


@pytest.mark.parametrize(("family", "sym"), CASES, ids=IDS)
def test_checkpoint_is_laid_out_as_llm_compressor_writes_it(family, sym, foreign) -> None:
    out, _, _ = foreign
    ckpt = out / _name(family, sym)
    qc = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["quantization_status"]) == (
        "compressed-tensors", "pack-quantized", "compressed",
    )  # fmt: skip
    assert "lm_head" in qc["ignore"]
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    moe = MOE_ON_DISK[family]
    expert = f"model.layers.1.{moe}.experts.3.down_proj"
    suffixes = ("weight_packed", "weight_scale", "weight_shape") + (() if sym else ("weight_zero_point",))
    assert {n.rpartition(".")[2] for n in names if n.startswith(expert + ".")} == set(suffixes)
    assert {n.rpartition(".")[2] for n in names if n.startswith("model.layers.0.self_attn.q_proj.")} == set(suffixes)
    assert f"model.layers.0.{moe}.gate.weight" in names and "lm_head.weight" in names  # routers and head kept
    assert sum(n.endswith(".weight_packed") for n in names) == QUANTIZED_LAYERS
    assert not any(n.endswith(("gate_up_proj", "experts.down_proj")) or ".w1." in n for n in names)


@pytest.mark.parametrize(("family", "sym"), CASES, ids=IDS)
def test_experts_load_as_quantized_layers_with_compressed_tensors_weights(family, sym, foreign, ours) -> None:
    from signround.kernels.base import QuantLinear
    from signround.layers import quant_linears
    from signround.models import linear_experts
    from signround.quant.int import dequantize

    out, _, _ = foreign
    model, info, _ = ours[_name(family, sym)]
    assert not any(info.values()), {k: v for k, v in info.items() if v}  # no MISSING / UNEXPECTED / MISMATCHED
    layers = quant_linears(model)
    theirs = decompressed_layers(out / _name(family, sym))
    in_memory = {name.replace(f".{MOE_ON_DISK[family]}.", ".mlp."): name for name in theirs}
    assert set(layers) == set(in_memory)  # every packed layer, experts per expert, nothing else
    experts = linear_experts(model)
    assert sorted(experts) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    for module in experts.values():
        assert all(isinstance(m, QuantLinear) for e in module for m in e.children())
    assert not any(isinstance(m, torch.nn.Linear) and ".experts." in n for n, m in model.named_modules())
    for name, layer in layers.items():
        ours_w = dequantize(layer.quantized_tensor(), torch.float32)
        torch.testing.assert_close(ours_w, theirs[in_memory[name]], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(("family", "sym"), CASES, ids=IDS)
def test_logits_match_compressed_tensors_decompression(family, sym, foreign, ours) -> None:
    from test_interop_moe import _same_predictions

    name = _name(family, sym)
    _, references, _ = foreign
    # the same dequantized weights on both sides: only the matmul summation order differs
    _same_predictions(ours[name][2], references[f"decompressed/{name}"], rel=1e-5)


@pytest.mark.parametrize(("family", "sym"), NATIVE_CASES, ids=[_name(*case) for case in NATIVE_CASES])
def test_logits_match_transformers_own_loader(family, sym, foreign, ours) -> None:
    from test_interop_moe import _same_predictions

    name = _name(family, sym)
    _, references, native = foreign
    assert native[name] == "clean", f"transformers' own loader: {native[name]}"
    # transformers' loader rounds each dequantized weight to the checkpoint's bf16 (ours keeps (q - z) * s exact)
    _same_predictions(ours[name][2], references[f"native/{name}"], rel=5e-3)


if __name__ == "__main__":
    foreign_main(Path(sys.argv[1]))
