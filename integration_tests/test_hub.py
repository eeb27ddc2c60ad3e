"""push_to_hub, with the Hub replaced at huggingface_hub's API boundary (HfApi): no network here."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoModelForCausalLM

import signround
from signround import AutoRoundConfig
from signround.layers import quant_linears


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


class FakeHub:
    """Records create_repo calls and copies what each upload would send into ``self.root / repo_id``."""

    def __init__(self, root: Path, fail: bool = False):
        self.root, self.fail, self.repos = root, fail, []

    def install(self, monkeypatch) -> FakeHub:
        hub = self

        def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
            hub.repos.append((repo_id, private))
            return SimpleNamespace(repo_id=repo_id)

        def upload_folder(self, *, repo_id, folder_path, commit_message=None, **kwargs):
            if hub.fail:
                raise ConnectionError("hub unreachable")
            shutil.copytree(folder_path, hub.root / repo_id)
            return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/1")

        def create_commit(self, repo_id, operations, **kwargs):  # transformers' own push_to_hub path
            for op in operations:
                dest = hub.root / repo_id / op.path_in_repo
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(op.path_or_fileobj, dest)
            return SimpleNamespace(commit_url=f"https://hub.invalid/{repo_id}/commit/1")

        def load_card(cls, repo_id, *args, **kwargs):  # a new repo has no card yet
            raise EntryNotFoundError(f"{repo_id} has no README.md")

        monkeypatch.setattr(ModelCard, "load", classmethod(load_card))
        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
        monkeypatch.setattr(HfApi, "create_commit", create_commit)
        return self


def test_api_push_uploads_a_folder_that_loads_back(tmp_path, stories_dir, shakespeare, monkeypatch) -> None:
    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    ar = signround.AutoRound(
        str(stories_dir), group_size=32, iters=2, nsamples=4, seqlen=32, dataset=f"{shakespeare}:concat=True",
        show_progress=False,
    )  # fmt: skip
    out = ar.quantize_and_save(tmp_path / "out", format="auto_round", push_to_hub="me/stories-w4")
    assert hub.repos == [("me/stories-w4", None)]
    uploaded = hub.root / "me/stories-w4"
    assert sorted(p.name for p in uploaded.iterdir()) == sorted(p.name for p in out.iterdir())
    names = {p.name for p in uploaded.iterdir()}
    assert {"config.json", "tokenizer.json", "README.md", "quantization_config.json"} <= names
    # low_cpu_mem_usage (the default) streamed each block to its own shard: an index and numbered files
    assert "model.safetensors.index.json" in names and {n for n in names if n.endswith(".safetensors")}
    card = (uploaded / "README.md").read_text()
    assert "auto_round" in card and "W4A16" in card and "| group_size | 32 |" in card and "| iters | 2 |" in card
    reloaded = AutoModelForCausalLM.from_pretrained(uploaded)
    assert torch.equal(_logits(reloaded), _logits(AutoModelForCausalLM.from_pretrained(out)))


def test_failed_upload_keeps_the_complete_local_output(tmp_path, stories_dir, monkeypatch) -> None:
    FakeHub(tmp_path / "hub", fail=True).install(monkeypatch)
    ar = signround.AutoRound(str(stories_dir), group_size=32, iters=0, disable_opt_rtn=True, show_progress=False)
    with pytest.raises(ConnectionError, match="hub unreachable"):
        ar.quantize_and_save(tmp_path / "out", push_to_hub="me/repo")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dir left behind
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert torch.equal(_logits(reloaded), _logits(ar.model))


def test_model_push_to_hub_after_quantize_on_load(tmp_path, tiny_llama_dir, shakespeare, monkeypatch) -> None:
    hub = FakeHub(tmp_path / "hub").install(monkeypatch)
    cfg = AutoRoundConfig(group_size=32, dataset=f"{shakespeare}:concat=True", iters=2, nsamples=4, seqlen=32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    model.push_to_hub("me/tiny-w4")
    reloaded = AutoModelForCausalLM.from_pretrained(hub.root / "me/tiny-w4")
    assert len(quant_linears(reloaded)) == 14
    assert torch.equal(_logits(reloaded), _logits(model))
