"""Shared fixtures: the shared model / data files, a tiny random Llama, and a saved RTN checkpoint.

Everything here is small on purpose (the suite runs on 2 cores next to a benchmark).  ``integration_tests/`` picks
these fixtures up through ``integration_tests/conftest.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from tiny_families import make_tiny_llama

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.is_dir():
    SHARED = Path("/work/shared")
STORIES_DIR = SHARED / "models" / "stories260K"
DATA_DIR = SHARED / "data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """The 260K-parameter Llama (hidden 64, 5 blocks, 172-wide MLPs) with its tokenizer."""
    return _require(STORIES_DIR)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return _require(DATA_DIR)


@pytest.fixture(scope="session")
def shakespeare(data_dir: Path) -> Path:
    return _require(data_dir / "tinyshakespeare.txt")


@pytest.fixture(scope="session")
def wikitext(data_dir: Path) -> Path:
    return _require(data_dir / "wikitext2_test.txt")


@pytest.fixture
def tiny_llama():
    """A fresh in-memory tiny Llama (see :func:`make_tiny_llama`)."""
    return make_tiny_llama()


@pytest.fixture
def tiny_llama_factory():
    """:func:`make_tiny_llama` itself, for tests that need another seed or weight scale."""
    return make_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, stories_dir: Path) -> Path:
    """The tiny Llama saved with ``save_pretrained`` next to the stories260K tokenizer files."""
    out = tmp_path_factory.mktemp("tiny_llama")
    make_tiny_llama().save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copy(stories_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def stories_q_proj(stories_dir: Path):
    """A trained layer and the input the model feeds it: stories260K's first q_proj weight ``[64, 64]`` and its
    normalised embeddings of 48 random tokens ``[1, 48, 64]`` (real weight statistics and input scale)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    layer = model.model.layers[0]
    ids = torch.randint(3, 512, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        x = layer.input_layernorm(model.model.embed_tokens(ids))
    return layer.self_attn.q_proj.weight.detach().clone(), x


@pytest.fixture(scope="session")
def rtn_checkpoint(tmp_path_factory, stories_dir: Path) -> Path:
    """stories260K, plain RTN W4 g32 sym (no calibration), saved in the auto_round format. Do not modify it."""
    import signround

    out = tmp_path_factory.mktemp("rtn_ckpt") / "model"
    ar = signround.AutoRound(
        str(stories_dir), scheme="W4A16", group_size=32, iters=0, disable_opt_rtn=True, show_progress=False
    )
    ar.quantize_and_save(out, format="auto_round")
    return out


@pytest.fixture(scope="session")
def cpu_int4_backend() -> str:
    """The backend a 4-bit layer gets on this CPU by default: our compiled native kernel, or torch's own int4
    kernel where no C compiler is present (selection logic: tests/test_kernel_matrix.py)."""
    from signround.kernels.native import kernel_problem

    return "native" if kernel_problem() is None else "torch_int4"
