"""Layer names as a checkpoint on disk spells them.

Transformers 5 renames some checkpoint keys while loading (Mixtral's ``block_sparse_moe`` -> ``mlp``, the legacy
``language_model.model.`` prefix of vision-language models) and renames them back when saving.  The tensors we
save go through that renaming; names we write into the quantization config must say the same, so loaders that
match them against on-disk names (vLLM) find them, as do those matching in-memory names (transformers 5).
"""

from __future__ import annotations

from torch import nn


def checkpoint_name(model: nn.Module, name: str) -> str:
    """The on-disk spelling of the in-memory layer ``name`` (unchanged when transformers renames nothing)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightRenaming, apply_renamings
    except ImportError:  # pragma: no cover - transformers < 5
        return name
    conversions = getattr(model, "_weight_conversions", None)
    if conversions is None:
        try:
            conversions = [
                c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)
            ]
        except Exception:  # a model transformers cannot map: its names are its checkpoint's
            return name
    renamings = [c.reverse_transform() for c in conversions[::-1] if isinstance(c, WeightRenaming)]
    key = f"{name}.weight"
    return apply_renamings(key, renamings).removesuffix(".weight")
