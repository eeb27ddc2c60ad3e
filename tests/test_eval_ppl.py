"""Perplexity / KL protocol against the reference numbers of shared/data/README.md (stories260K, CPU)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from signround.eval import mean_kl_divergence, perplexity, tokenize_file, windows

SHARED = Path(__file__).resolve().parents[2] / "shared"
STORIES = SHARED / "models" / "stories260K"
WIKITEXT = SHARED / "data" / "wikitext2_test.txt"

pytestmark = pytest.mark.skipif(
    not (STORIES / "model.safetensors").is_file() or not WIKITEXT.is_file(), reason="shared/ test assets not found"
)


@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(STORIES)
    return model, tokenizer


@pytest.fixture(scope="module")
def wiki_ids(stories):
    return tokenize_file(stories[1], WIKITEXT)


def test_tokenize_file_whole_text_once(stories, wiki_ids):
    _, tokenizer = stories
    assert wiki_ids.dtype == torch.long and wiki_ids.dim() == 1
    assert wiki_ids[0].item() == tokenizer.bos_token_id
    assert (wiki_ids == tokenizer.bos_token_id).sum().item() == 1  # BOS only at the very start


@pytest.mark.parametrize(("seqlen", "expected"), [(512, 131.01), (256, 100.89)])
def test_stories260k_wikitext_reference(stories, wiki_ids, seqlen, expected):
    model, _ = stories
    assert perplexity(model, token_ids=wiki_ids, seqlen=seqlen, max_windows=40) == pytest.approx(expected, abs=0.006)


def test_path_text_and_ids_agree(stories, wiki_ids):
    model, tokenizer = stories
    from_ids = perplexity(model, token_ids=wiki_ids, seqlen=128, max_windows=4)
    from_path = perplexity(model, tokenizer, WIKITEXT, seqlen=128, max_windows=4)
    from_str_path = perplexity(model, tokenizer, str(WIKITEXT), seqlen=128, max_windows=4)
    from_text = perplexity(model, tokenizer, WIKITEXT.read_text(encoding="utf-8"), seqlen=128, max_windows=4)
    from_windows = perplexity(model, token_ids=windows(wiki_ids, 128, 4), seqlen=999, max_windows=None)
    assert from_path == from_str_path == from_text == pytest.approx(from_ids, rel=1e-12)
    assert from_windows == pytest.approx(from_ids, rel=1e-12)


def test_batch_size_does_not_change_result(stories, wiki_ids):
    model, _ = stories
    a = perplexity(model, token_ids=wiki_ids, seqlen=256, max_windows=7, batch_size=1)
    b = perplexity(model, token_ids=wiki_ids, seqlen=256, max_windows=7, batch_size=3)
    assert a == pytest.approx(b, rel=1e-5)


def test_windows_non_overlapping_and_tail_dropped():
    ids = torch.arange(10)
    w = windows(ids, 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows(ids, 3, max_windows=2).tolist() == [[0, 1, 2], [3, 4, 5]]
    with pytest.raises(ValueError, match="not enough"):
        windows(ids, 11)
    with pytest.raises(ValueError):
        perplexity(torch.nn.Identity())  # neither ids nor text


def test_kl_self_is_zero_and_perturbed_positive(stories, wiki_ids):
    model, _ = stories
    assert mean_kl_divergence(model, model, wiki_ids, seqlen=256, max_windows=4) == pytest.approx(0.0, abs=1e-7)

    perturbed = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in perturbed.named_parameters():
            if name.endswith("proj.weight"):
                p.add_(0.05 * p.abs().mean() * torch.randn(p.shape, generator=g))
    kl = mean_kl_divergence(perturbed, model, wiki_ids, seqlen=256, max_windows=4, batch_size=3)
    assert kl > 1e-4
    # Same windows, chunked differently: the same number.
    assert mean_kl_divergence(perturbed, model, windows(wiki_ids, 256, 4), batch_size=1) == pytest.approx(kl, rel=1e-5)
