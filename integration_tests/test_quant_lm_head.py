"""quant_lm_head on a model whose lm_head is tied to the embedding (most small models, SmolLM2 included): the head
is quantized on its own weight, the embedding keeps its full-precision table, and the checkpoint reloads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import signround
from signround import AutoRoundConfig
from signround.kernels.base import QuantLinear
from signround.streaming import output_digests


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory, tiny_llama_dir):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    model.config.tie_word_embeddings = True
    tied = LlamaForCausalLM(model.config)
    tied.load_state_dict(model.state_dict(), strict=False)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    out = tmp_path_factory.mktemp("tied")
    tied.save_pretrained(out)
    for f in tiny_llama_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, out / f.name)
    return out


def _logits(model) -> torch.Tensor:
    ids = torch.randint(3, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("disable_opt_rtn", [True, False], ids=["rtn", "opt-rtn"])
def test_quantized_tied_head_keeps_the_embedding_and_reloads(
    tied_dir, tmp_path, shakespeare, disable_opt_rtn: bool
) -> None:
    """In memory and with the head offloaded to disk (low_cpu_mem_usage, where the head and the table are read
    as separate tensors: the tie is the config's word) alike."""
    original = AutoModelForCausalLM.from_pretrained(tied_dir).model.embed_tokens.weight.detach().clone()
    outs = {}
    for low in (False, True):
        ar = signround.AutoRound(
            str(tied_dir), bits=4, group_size=32, iters=0, disable_opt_rtn=disable_opt_rtn, quant_lm_head=True,
            backend="torch", dataset=f"{shakespeare}:concat=True", nsamples=4, seqlen=64, show_progress=False,
            low_cpu_mem_usage=low,
        )  # fmt: skip
        outs[low] = out = ar.quantize_and_save(tmp_path / f"q-{low}", format="auto_round")
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
        reloaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=AutoRoundConfig(backend="torch"))
        assert isinstance(reloaded.lm_head, QuantLinear)
        assert torch.equal(reloaded.model.embed_tokens.weight, original)  # not quantized through the tie
        if not low:
            assert torch.equal(_logits(reloaded), _logits(ar.model))
    assert output_digests(outs[True]) == output_digests(outs[False])


def test_checkpoint_that_still_says_tied_loads(tied_dir, tmp_path) -> None:
    """A checkpoint with a quantized head whose config kept tie_word_embeddings=True (another tool's output)."""
    ar = signround.AutoRound(
        str(tied_dir), bits=4, group_size=32, iters=0, disable_opt_rtn=True, quant_lm_head=True, show_progress=False
    )
    out = ar.quantize_and_save(tmp_path / "q", format="auto_round")
    cfg = json.loads((out / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(cfg))
    reloaded = AutoModelForCausalLM.from_pretrained(out, quantization_config=AutoRoundConfig(backend="torch"))
    assert isinstance(reloaded.lm_head, QuantLinear) and reloaded.config.tie_word_embeddings is False
    assert torch.isfinite(_logits(reloaded)).all()
