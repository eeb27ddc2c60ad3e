"""Model card and upload of a saved quantized model to the Hugging Face Hub (through huggingface_hub).

The folder is always written completely on disk first (atomically, by the API); the upload then sends that
folder as one commit, so a failed upload changes nothing locally and leaves no partial commit on the Hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi, ModelCard, ModelCardData

__all__ = ["model_card", "push_folder"]


def model_card(
    base_model: str | None,
    quantization_config: dict[str, Any],
    format_name: str,
    tuning: dict[str, Any],
    metrics: dict[str, float] | None = None,
) -> ModelCard:
    """A model card saying what was quantized, how, into which format, and what it measured."""
    data = ModelCardData(
        base_model=base_model if base_model and not os.path.isabs(base_model) else None,
        library_name="transformers",
        tags=["signround", "auto-round", "quantized", f"{quantization_config.get('bits', '?')}-bit", format_name],
    )
    rows = "\n".join(f"| {key} | {value} |" for key, value in tuning.items() if value is not None)
    measured = "\n".join(f"| {key} | {value:.4g} |" for key, value in (metrics or {}).items()) or "| (none) | |"
    content = f"""---
{data.to_yaml()}
---

# {Path(base_model).name if base_model else "model"} — {format_name}

Weight-only quantization with [signround](https://pypi.org/project/signround/) (SignRound / AutoRound
algorithm), exported in the `{format_name}` format.

## Quantization

| setting | value |
|---|---|
{rows}

`quantization_config`:

```json
{json.dumps(quantization_config, indent=2)}
```

## Measured

| metric | value |
|---|---|
{measured}

## Use

```python
import signround  # registers the loader
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("<this repo>", quantization_config=signround.AutoRoundConfig())
```
"""
    return ModelCard(content)


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload quantized model (signround)",
) -> str:
    """Create ``repo_id`` if needed and upload every file of ``folder`` in one commit; returns the commit URL."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{str(folder)!r} is not a saved model (no config.json); save it before pushing")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo.repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
