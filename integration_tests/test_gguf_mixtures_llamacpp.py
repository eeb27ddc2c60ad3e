"""Our per-tensor GGUF type plan (signround.quant.gguf_mixtures) against llama.cpp 0.3.36 itself.

Two checks, both through ``llamacpp_worker.py`` (llama.cpp lives in its own venv, ``.venv-llama``: llama-cpp-python
0.3.36 and gguf-py 0.19):

* real files: Hugging Face models are converted to f16 GGUF with llama.cpp's ``convert_hf_to_gguf.py`` (from the
  llama-cpp-python 0.3.36 sdist, run in this venv, which has torch and transformers), quantized with
  ``llama_cpp.llama_model_quantize`` to every file type, and read back with gguf-py: every tensor's type must be the
  one :func:`plan_types` gives, every tensor's size the one :func:`tensor_nbytes` gives, the tensor data section the
  sum of those (32-byte aligned), and ``general.file_type`` our ``Mixture.file_type``.  Models: stories260K (64-wide
  rows: every K type falls back, the 172-wide MLP rows fit no block -> f16), SmolLM2-135M (576-wide rows fall back,
  1536-wide ffn_down rows keep K types; when ``signround fetch-model smollm2-135m`` has been run) and two tiny random
  Llamas with 256-wide rows so that the K rules themselves are exercised (8 layers, untied output, 2 query heads per
  KV head; 16 layers, tied, 4 query heads per KV head);
* llama.cpp's type chooser on mock models (the hooks of its own ``tests/test-quant-type-selection.cpp``): full-size
  tensor lists of Llama-7B / Llama-3-8B / Llama-3-70B, Mixtral-8x7B, Qwen2-MoE, Falcon-7B, Phi-3-mini, a hybrid
  with attention in every 4th block and a model with odd row sizes and never-quantized tensors, every file type.

Without ``.venv-llama`` or the sdist everything here skips and says what to install.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from signround.quant.gguf_mixtures import MIXTURES, ModelFacts, plan_types, tensor_nbytes

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("llamacpp_worker.py")
LLAMA_PY = ROOT / ".venv-llama" / "bin" / "python"
SDIST = "llama_cpp_python-0.3.36"
WHEELS = [ROOT / ".venv-llama" / "src", ROOT.parent / "wheels"]  # `make venv-llama` keeps the sdist in the first
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT: llama_model_quantize pads every tensor's data to it

needs_llama = pytest.mark.skipif(
    not LLAMA_PY.exists(),
    reason="llama.cpp venv missing: .venv-llama/bin/python with llama-cpp-python 0.3.36 and gguf 0.19 "
    "(`make venv-llama` builds it)",
)
pytestmark = needs_llama


def _worker(python: Path, *args: str, timeout: int = 600) -> None:
    done = subprocess.run([str(python), str(WORKER), *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"llamacpp_worker {args[0]} failed:\n{done.stderr[-4000:]}"


def _batch(python: Path, command: str, jobs: list[dict[str, Any]], tmp: Path) -> list[Any]:
    (tmp / f"{command}-jobs.json").write_text(json.dumps(jobs))
    _worker(python, command, str(tmp / f"{command}-jobs.json"), str(tmp / f"{command}-results.json"))
    return json.loads((tmp / f"{command}-results.json").read_text())


@pytest.fixture(scope="session")
def llama_cpp_dir(tmp_path_factory) -> Path:
    """llama.cpp's source tree from the llama-cpp-python 0.3.36 sdist: ``$SIGNROUND_LLAMA_CPP_DIR``, an unpacked
    ``<wheels>/llama_cpp_python-0.3.36``, or the converter's files unpacked from ``<wheels>/...tar.gz``."""
    if os.environ.get("SIGNROUND_LLAMA_CPP_DIR"):
        found = Path(os.environ["SIGNROUND_LLAMA_CPP_DIR"])
        if (found / "convert_hf_to_gguf.py").is_file():
            return found
    for wheels in WHEELS:
        found = wheels / SDIST / "vendor" / "llama.cpp"
        if (found / "convert_hf_to_gguf.py").is_file():
            return found
    for wheels in WHEELS:
        tarball = wheels / f"{SDIST}.tar.gz"
        if tarball.is_file():
            out = tmp_path_factory.mktemp("llama_cpp_sdist")
            prefix = f"{SDIST}/vendor/llama.cpp/"
            wanted = (prefix + "convert_hf_to_gguf.py", prefix + "conversion/", prefix + "gguf-py/")
            with tarfile.open(tarball) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(wanted) and (m.isfile() or m.isdir())]
                tar.extractall(out, members=members, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
            return out / prefix
    pytest.skip(
        f"llama.cpp sdist missing (needed for convert_hf_to_gguf.py): no {SDIST}/ or {SDIST}.tar.gz under "
        f"{' or '.join(map(str, WHEELS))}; get it with `pip download llama-cpp-python==0.3.36 --no-deps "
        "--no-binary :all: -d .venv-llama/src` (and unpack it there; `make venv-llama` does both)"
    )


def _facts(hf_dir: Path) -> ModelFacts:
    cfg = json.loads((hf_dir / "config.json").read_text())
    return ModelFacts(
        n_layer=cfg["num_hidden_layers"],
        n_head=cfg["num_attention_heads"],
        n_head_kv=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        tied_output=bool(cfg.get("tie_word_embeddings", False)),
        arch="llama",
    )


def _tiny_llama(out: Path, tokenizer_dir: Path, **shape: Any) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, **shape)
    LlamaForCausalLM(config).save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_dir / name, out / name)
    return out


MODELS = ["stories260k", "tiny256", "tiny256-gqa4-tied", pytest.param("smollm2-135m", marks=pytest.mark.slow)]
IMATRIX_RUNS = [("tiny256-gqa4-tied", "q4_0"), ("tiny256-gqa4-tied", "q5_0")]  # the imatrix-only ffn_down guard


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory, stories_dir: Path) -> dict[str, Path]:
    """The Hugging Face directories to convert (SmolLM2 only if already fetched: no network here)."""
    from signround.fetch import cached_model_path

    tmp = tmp_path_factory.mktemp("gguf_mixture_models")
    models = {
        "stories260k": stories_dir,
        "tiny256": _tiny_llama(
            tmp / "tiny256",
            stories_dir,
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
        "tiny256-gqa4-tied": _tiny_llama(
            tmp / "tiny256-gqa4-tied",
            stories_dir,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=16,
            num_attention_heads=8,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    }
    smollm2 = cached_model_path("smollm2-135m")
    if smollm2 is not None:
        models["smollm2-135m"] = smollm2
    return models


@pytest.fixture(scope="session")
def quantized(tmp_path_factory, llama_cpp_dir: Path, hf_models: dict[str, Path]) -> dict[tuple[str, str, bool], Any]:
    """Every model converted to f16 GGUF once, then quantized to every file type: ``(model, mixture, imatrix)`` ->
    the worker's record (source and result tensors, sizes, ``general.file_type``)."""
    tmp = tmp_path_factory.mktemp("gguf_mixtures_llamacpp")
    sources = {name: tmp / f"{name}-f16.gguf" for name in hf_models}
    pairs = [str(p) for name in hf_models for p in (hf_models[name], sources[name])]
    _worker(Path(sys.executable), "convert", str(llama_cpp_dir), "f16", *pairs)
    runs = [(model, name, name == "q2_k_s") for model in hf_models for name in MIXTURES]  # q2_k_s needs an imatrix
    runs += [(model, name, True) for model, name in IMATRIX_RUNS if model in hf_models]
    jobs = [
        {"src": str(sources[model]), "out": str(tmp / f"{model}-{name}{'-imatrix' * imatrix}.gguf"), "ftype": name}
        | {"imatrix": imatrix, "remove": True, "both_readers": model != "smollm2-135m"}
        for model, name, imatrix in runs
    ]
    return dict(zip(runs, _batch(LLAMA_PY, "quantize", jobs, tmp), strict=True))


def _check_file(model: str, name: str, imatrix: bool, record: dict[str, Any], facts: ModelFacts) -> None:
    assert record["ok"], record.get("error")
    source, result = record["source"]["tensors"], record["result"]
    shapes = {t: v["ne"] for t, v in source.items()}
    plan = plan_types(name, shapes, facts, source_types={t: v["type"] for t, v in source.items()}, imatrix=imatrix)
    theirs = {t: v["type"] for t, v in result["tensors"].items()}
    assert set(theirs) == set(plan)
    wrong = {t: (plan[t], theirs[t]) for t in plan if plan[t] != theirs[t]}
    assert not wrong, f"{model} {name}: (ours, llama.cpp) differ for {len(wrong)}/{len(plan)} tensors: {wrong}"
    sizes = {t: tensor_nbytes(plan[t], shapes[t]) for t in plan}
    assert {t: v["nbytes"] for t, v in result["tensors"].items()} == sizes
    planned = sum(sizes.values())
    data = result["file_size"] - result["data_offset"]
    assert data == sum(-(-n // ALIGNMENT) * ALIGNMENT for n in sizes.values())  # only alignment padding besides
    assert abs(data - planned) <= 0.01 * planned
    assert result["file_type"] == MIXTURES[name].file_type
    counts = ", ".join(f"{t} {n}" for t, n in sorted(Counter(plan.values()).items()))
    print(
        f"{model:18} {name:6}{' +imatrix' * imatrix}: {len(plan)}/{len(plan)} tensor types agree ({counts}); "
        f"planned tensor bytes {planned} vs llama.cpp data {data} ({data / planned - 1:+.3%}), file {result['file_size']}"
    )


@pytest.mark.parametrize("name", list(MIXTURES))
@pytest.mark.parametrize("model", MODELS)
def test_types_match_llama_model_quantize(model: str, name: str, quantized, hf_models: dict[str, Path]) -> None:
    if model not in hf_models:
        pytest.skip(f"{model} not available: run `signround fetch-model {model}` (needs PyPI) to test on it")
    _check_file(model, name, name == "q2_k_s", quantized[(model, name, name == "q2_k_s")], _facts(hf_models[model]))


@pytest.mark.parametrize(("model", "name"), IMATRIX_RUNS)
def test_imatrix_types_match_llama_model_quantize(model: str, name: str, quantized, hf_models) -> None:
    _check_file(model, name, True, quantized[(model, name, True)], _facts(hf_models[model]))


# --- llama.cpp's chooser on mock models -------------------------------------------------------------------------


def _blocks(n_layer: int, per_block: dict[str, list[int]], skip: frozenset[int] = frozenset()) -> dict[str, list[int]]:
    return {f"blk.{i}.{t}": ne for i in range(n_layer) if i not in skip for t, ne in per_block.items()}


def _llama_like(
    n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, vocab: int, tied: bool = False, **extra: Any
) -> dict[str, Any]:
    kv = n_embd // n_head * n_head_kv
    attn = {
        "attn_norm.weight": [n_embd],
        "attn_q.weight": [n_embd, n_embd],
        "attn_k.weight": [n_embd, kv],
        "attn_v.weight": [n_embd, kv],
        "attn_output.weight": [n_embd, n_embd],
    }
    ffn = {
        "ffn_norm.weight": [n_embd],
        "ffn_gate.weight": [n_embd, n_ff],
        "ffn_up.weight": [n_embd, n_ff],
        "ffn_down.weight": [n_ff, n_embd],
    }
    if extra.get("n_expert"):
        e = extra["n_expert"]
        ffn = {"ffn_norm.weight": [n_embd], "ffn_gate_inp.weight": [n_embd, e]}
        ffn |= {f"ffn_{k}_exps.weight": [n_embd, n_ff, e] for k in ("gate", "up")}
        ffn["ffn_down_exps.weight"] = [n_ff, n_embd, e]
    tensors = {"token_embd.weight": [n_embd, vocab], "output_norm.weight": [n_embd]}
    if not tied:
        tensors["output.weight"] = [n_embd, vocab]
    tensors |= _blocks(n_layer, attn, skip=frozenset(extra.get("no_attention", ()))) | _blocks(n_layer, ffn)
    desc = {"architecture": extra.get("arch", "llama"), "n_embd": n_embd, "n_ff": n_ff, "n_layer": n_layer}
    desc |= {"n_head": n_head, "n_head_kv": n_head_kv, "n_expert": extra.get("n_expert", 0)}
    desc |= {"n_embd_head_k": n_embd // n_head, "n_embd_head_v": n_embd // n_head}
    return {"desc": desc, "tensors": tensors}


def _qwen2moe() -> dict[str, Any]:
    m = _llama_like(24, 2048, 1408, 16, 16, 151936, n_expert=60, arch="qwen2moe")  # 1408-wide expert rows: fallback
    m["tensors"] |= _blocks(
        24,
        {
            "attn_q.bias": [2048],
            "ffn_gate_inp_shexp.weight": [2048],
            "ffn_gate_shexp.weight": [2048, 5632],
            "ffn_up_shexp.weight": [2048, 5632],
            "ffn_down_shexp.weight": [5632, 2048],
        },
    )
    return m


def _fused(arch: str, n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, vocab: int) -> dict:
    """Falcon / Phi-3 style: one attn_qkv, no ffn_gate (Phi-3's ffn_up holds gate and up)."""
    qkv = n_embd + 2 * (n_embd // n_head) * n_head_kv
    up = 2 * n_ff if arch == "phi3" else n_ff
    per_block = {
        "attn_norm.weight": [n_embd],
        "attn_norm.bias": [n_embd],
        "attn_qkv.weight": [n_embd, qkv],
        "attn_output.weight": [n_embd, n_embd],
        "ffn_up.weight": [n_embd, up],
        "ffn_down.weight": [n_ff, n_embd],
    }
    tensors = {"token_embd.weight": [n_embd, vocab], "output_norm.weight": [n_embd], "output.weight": [n_embd, vocab]}
    desc = {"architecture": arch, "n_embd": n_embd, "n_ff": n_ff, "n_layer": n_layer, "n_head": n_head}
    desc |= {
        "n_head_kv": n_head_kv,
        "n_expert": 0,
        "n_embd_head_k": n_embd // n_head,
        "n_embd_head_v": n_embd // n_head,
    }
    return {"desc": desc, "tensors": tensors | _blocks(n_layer, per_block)}


def _odd() -> dict[str, Any]:
    """100-wide rows (no block fits: f16), tied, plus tensors llama.cpp never quantizes."""
    m = _llama_like(6, 100, 512, 4, 4, 512, tied=True)
    m["tensors"] |= {
        "position_embd.weight": [100, 512],
        "token_types.weight": [100, 2],
        "blk.0.ssm_conv1d.weight": [4, 256],
        "blk.1.time_mix_w1.weight": [100, 160],
        "blk.2.ffn_gate_inp_shexp.weight": [512, 1],
        "blk.3.attn_rel_b.weight": [32, 32],
        "rope_freqs": [64, 2],
    }
    return m


MOCKS: dict[str, Any] = {
    "llama-7b": lambda: _llama_like(32, 4096, 11008, 32, 32, 32000),
    "llama3-8b": lambda: _llama_like(32, 4096, 14336, 32, 8, 128256),
    "llama3-70b": lambda: _llama_like(80, 8192, 28672, 64, 8, 128256),
    "mixtral-8x7b": lambda: _llama_like(32, 4096, 14336, 32, 8, 32000, n_expert=8),
    "qwen2moe": _qwen2moe,
    "falcon-7b": lambda: _fused("falcon", 32, 4544, 18176, 71, 1, 65024),
    "phi3-mini": lambda: _fused("phi3", 32, 3072, 8192, 32, 32, 32064),
    "hybrid-attn-every-4th": lambda: _llama_like(16, 256, 512, 4, 4, 512, no_attention={0, 1, 2, 4, 5, 6, 8, 9}),
    "odd-rows-tied": _odd,
}


@pytest.fixture(scope="session")
def chooser_types(tmp_path_factory) -> dict[str, dict[str, dict[str, str]]]:
    """llama.cpp's types for every mock model and file type, in one worker run (no weights: well under a second)."""
    jobs = [MOCKS[name]() | {"ftypes": list(MIXTURES)} for name in MOCKS]
    results = _batch(LLAMA_PY, "types", jobs, tmp_path_factory.mktemp("gguf_chooser"))
    return dict(zip(MOCKS, results, strict=True))


@pytest.mark.parametrize("mock", list(MOCKS))
def test_types_match_llama_chooser(mock: str, chooser_types) -> None:
    m = MOCKS[mock]()
    d = m["desc"]
    facts = ModelFacts(d["n_layer"], d["n_head"], d["n_head_kv"], d["n_expert"], arch=d["architecture"])
    summary = []
    for name in MIXTURES:
        ours = plan_types(name, m["tensors"], facts)
        theirs = chooser_types[mock][name]
        wrong = {t: (ours[t], theirs[t]) for t in ours if ours[t] != theirs[t]}
        assert not wrong, f"{mock} {name}: (ours, llama.cpp) differ for {len(wrong)}/{len(ours)} tensors: {wrong}"
        summary.append(f"{name} {len(ours)}/{len(ours)}")
    print(f"{mock}: agree on {', '.join(summary)}")
