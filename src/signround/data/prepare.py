"""Turn calibration items into fixed-length token tensors: tokenise, apply chat templates, filter, trim, concat, mix.

Rules (the reference tool's, so calibration matches what its users expect):

* without ``concat`` each document is tokenized on its own with the tokenizer's defaults and
  ``truncation=True, max_length=seqlen``; documents shorter than ``seqlen`` are dropped (never padded: padding
  changes the activation statistics the tuning fits), longer ones are cut to ``seqlen``;
* with ``concat`` all documents are joined (plain texts separated by a blank line) into one token stream that is
  cut into consecutive ``seqlen`` chunks; each chunk gets the special tokens the tokenizer adds to a single text
  (e.g. BOS), so every sample starts like a real prompt. The incomplete tail is not used;
* each source is shuffled with ``seed`` before drawing, so the same seed gives the same tensor; when several sources
  are mixed, one with ``num=`` gives that many samples, the others share the rest of ``nsamples`` evenly (a source
  that runs short leaves its share to the larger ones), and the mixture is shuffled again.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .sources import Item, Messages, TokenIds, items_from_memory, load_items
from .spec import DatasetSpec, parse_dataset_spec

__all__ = ["CalibrationSet", "chunk_token_ids", "load_calibration"]

logger = logging.getLogger(__name__)

_BATCH = 256  # documents tokenized per call; lets a large source stop as soon as it has enough samples


@dataclass
class CalibrationSet:
    """Calibration samples ready for the tuning engine.

    :param input_ids: LongTensor ``[n, seqlen]``.
    :param attention_mask: LongTensor ``[n, seqlen]``; all ones unless pre-tokenized input brought its own padding.
    :param dropped: documents dropped for having fewer than ``seqlen`` tokens (among those examined).
    :param sources: for each row, the name of the dataset it came from.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    dropped: int = 0
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class _Pool:
    """The usable samples of one source, in drawing order, with counts for log lines and error messages."""

    name: str
    samples: list[TokenIds]
    dropped: int = 0
    examined: int = 0
    longest: int = 0
    concat_tokens: int | None = None


def chunk_token_ids(ids: torch.Tensor, seqlen: int, n: int | None = None) -> torch.Tensor:
    """Cut a 1-D token stream into consecutive non-overlapping ``seqlen`` chunks: the first ``n`` (all if ``None``).

    This is the perplexity / benchmark layout (whole text tokenized once, windows ``ids[i*L:(i+1)*L]``).
    Returns a LongTensor ``[n, seqlen]``; raises ``ValueError`` when the stream holds fewer than ``n`` chunks.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D token stream, got shape {tuple(ids.shape)}")
    if seqlen <= 0:
        raise ValueError(f"seqlen must be positive, got {seqlen}")
    available = ids.numel() // seqlen
    n = available if n is None else n
    if n <= 0 or n > available:
        raise ValueError(f"cannot cut {n} chunks of {seqlen} tokens from {ids.numel()} tokens ({available} available)")
    return ids[: n * seqlen].reshape(n, seqlen).to(torch.int64)


# ---------------------------------------------------------------------------------------------------- tokenising


def _special_affixes(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after a single text by default (e.g. ``[bos]``, ``[]``)."""
    with_special = tokenizer("a", verbose=False)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False, verbose=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            return with_special[:start], with_special[start + len(plain) :]
    return [], []


def _render(item: str | Messages, spec: DatasetSpec, tokenizer: Any) -> str:
    """Render a conversation (or a text wrapped as a user turn) with the tokenizer's chat template."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f'dataset {spec.name!r} needs a chat template (apply_chat_template or "messages" samples) but the '
            "tokenizer has none; set tokenizer.chat_template or pass plain texts"
        )
    turns = list(item.turns) if isinstance(item, Messages) else [{"role": "user", "content": item}]
    if spec.system_prompt and turns[0].get("role") != "system":
        try:
            return _apply_template([{"role": "system", "content": spec.system_prompt}, *turns], tokenizer)
        except Exception as err:  # jinja raises TemplateError for templates that refuse a system role
            logger.warning("chat template of %s rejected the system prompt (%s); rendering without it", spec.name, err)
    return _apply_template(turns, tokenizer)


def _apply_template(turns: list[dict[str, Any]], tokenizer: Any) -> str:
    generation_prompt = turns[-1].get("role") != "assistant"
    return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)


def _to_texts(items: Sequence[Item], spec: DatasetSpec, tokenizer: Any) -> list[tuple[str, bool]]:
    """(text, templated) pairs; templated texts already contain their special tokens."""
    if tokenizer is None:
        raise ValueError(f"dataset {spec.name!r} holds text; a tokenizer is needed to tokenize it")
    out = []
    for item in items:
        templated = isinstance(item, Messages) or spec.apply_chat_template
        out.append((_render(item, spec, tokenizer) if templated else item, templated))
    return out


def _tokenize(items: Sequence[Item], spec: DatasetSpec, tokenizer: Any, max_length: int | None) -> list[TokenIds]:
    """Tokenize items in order, cut to ``max_length`` if given (concat passes ``None``).

    Plain texts get the tokenizer's default special tokens when cut (each is a sample), none when not (they become
    part of a stream); rendered templates never get extra ones (they carry their own, a second BOS would be wrong).
    """
    texts = [(i, item) for i, item in enumerate(items) if not isinstance(item, TokenIds)]
    out: list[TokenIds | None] = [item if isinstance(item, TokenIds) else None for item in items]
    rendered = _to_texts([item for _, item in texts], spec, tokenizer) if texts else []
    for templated in (False, True):
        group = [(i, text) for (i, _), (text, t) in zip(texts, rendered, strict=True) if t == templated]
        if not group:
            continue
        kwargs = {"truncation": True, "max_length": max_length} if max_length else {}
        special = max_length is not None and not templated
        encoded = tokenizer([text for _, text in group], add_special_tokens=special, verbose=False, **kwargs)
        for (i, _), ids in zip(group, encoded["input_ids"], strict=True):
            out[i] = TokenIds(torch.tensor(ids, dtype=torch.int64))
    return [t for t in out if t is not None]


# ---------------------------------------------------------------------------------------------------- per source


def _pool_documents(items: list[Item], spec: DatasetSpec, tokenizer: Any, seqlen: int, need: int, seed: int) -> _Pool:
    """Shuffled documents, each cut to ``seqlen``; short ones dropped. Stops once ``need`` samples are found."""
    order = list(items)
    random.Random(seed).shuffle(order)
    pool = _Pool(spec.name, [])
    for start in range(0, len(order), _BATCH):
        for sample in _tokenize(order[start : start + _BATCH], spec, tokenizer, seqlen):
            pool.examined += 1
            pool.longest = max(pool.longest, sample.ids.numel())
            if sample.ids.numel() < seqlen:
                pool.dropped += 1
                continue
            mask = None if sample.mask is None else sample.mask[:seqlen]
            pool.samples.append(TokenIds(sample.ids[:seqlen], mask))
        if len(pool.samples) >= need:
            break
    return pool


def _pool_concat(items: list[Item], spec: DatasetSpec, tokenizer: Any, seqlen: int, seed: int) -> _Pool:
    """All documents joined in order into token streams cut into consecutive ``seqlen`` chunks, then shuffled."""
    plain = [f"{item}\n\n" for item in items if isinstance(item, str) and not spec.apply_chat_template]
    raw = [item for item in items if not (isinstance(item, str) and not spec.apply_chat_template)]
    prefix, suffix = _special_affixes(tokenizer) if plain else ([], [])
    chunks: list[torch.Tensor] = []
    total = 0
    for docs, head, tail in ((plain, prefix, suffix), (raw, [], [])):
        if not docs:
            continue
        stream = torch.cat([t.ids for t in _tokenize(docs, spec, tokenizer, None)])
        body = seqlen - len(head) - len(tail)
        if body <= 0:
            raise ValueError(f"seqlen={seqlen} leaves no room for text after the special tokens {head + tail}")
        total += stream.numel()
        if stream.numel() >= body:
            cut = chunk_token_ids(stream, body)
            chunks += [
                torch.cat([torch.tensor(head, dtype=torch.int64), c, torch.tensor(tail, dtype=torch.int64)])
                for c in cut
            ]
    random.Random(seed).shuffle(chunks)
    logger.info("%s: concat gave %d chunks of %d tokens from %d tokens", spec.name, len(chunks), seqlen, total)
    return _Pool(spec.name, [TokenIds(c) for c in chunks], examined=len(items), concat_tokens=total)


def _pool(items: list[Item], spec: DatasetSpec, tokenizer: Any, seqlen: int, need: int, seed: int) -> _Pool:
    pool = (
        _pool_concat(items, spec, tokenizer, seqlen, seed)
        if spec.concat
        else _pool_documents(items, spec, tokenizer, seqlen, need, seed)
    )
    if pool.dropped:
        logger.info(
            "%s: dropped %d of %d documents shorter than seqlen=%d (concat=True keeps them)",
            spec.name,
            pool.dropped,
            pool.examined,
            seqlen,
        )
    return pool


# ---------------------------------------------------------------------------------------------------- mixing


def _quotas(pools: list[_Pool], specs: list[DatasetSpec], nsamples: int) -> list[int]:
    """Samples to take from each pool: ``num`` where given, an even share of the rest otherwise (smallest first, so
    a source that runs short leaves its share to the larger ones)."""
    quotas = [min(s.num, len(p.samples)) if s.num else 0 for p, s in zip(pools, specs, strict=True)]
    rest = max(nsamples - sum(quotas), 0)
    free = sorted((i for i, s in enumerate(specs) if not s.num), key=lambda i: len(pools[i].samples))
    for k, i in enumerate(free):
        quotas[i] = min(rest // (len(free) - k), len(pools[i].samples))
        rest -= quotas[i]
    return quotas


def _no_samples_error(pools: list[_Pool], seqlen: int) -> ValueError:
    details = []
    for p in pools:
        if p.concat_tokens is not None:
            details.append(f"{p.name!r}: {p.concat_tokens} tokens in all, fewer than one chunk")
        else:
            details.append(f"{p.name!r}: 0 of {p.examined} documents reach it (longest {p.longest} tokens)")
    return ValueError(
        f"found 0 calibration samples of seqlen={seqlen} tokens ({'; '.join(details)}); join short documents with "
        f"concat=True (e.g. dataset='{pools[0].name}:concat=True'), use a smaller seqlen, or give more text"
    )


def _check_count(pools: list[_Pool], specs: list[DatasetSpec], got: int, nsamples: int, seqlen: int) -> None:
    if got == 0:
        raise _no_samples_error(pools, seqlen)
    for p, s in zip(pools, specs, strict=True):
        if not p.samples:
            logger.warning("%s gave no sample of seqlen=%d tokens; it is left out of the mix", p.name, seqlen)
        elif s.num and len(p.samples) < s.num:
            logger.warning(
                "%s: num=%d requested but only %d samples of seqlen=%d found", p.name, s.num, len(p.samples), seqlen
            )
    target = nsamples if any(not s.num for s in specs) else min(nsamples, sum(s.num or 0 for s in specs))
    if got < target:
        found = ", ".join(f"{p.name}: {len(p.samples)}" for p in pools)
        logger.warning(
            "only %d calibration samples of seqlen=%d found (nsamples=%d requested; %s); proceeding with fewer. "
            "concat=True or a smaller seqlen gives more",
            got,
            seqlen,
            nsamples,
            found,
        )


def _resolve(dataset: Any) -> list[tuple[DatasetSpec, list[Item] | None]]:
    """Specs with their in-memory items (``None``: read by :func:`load_items` after all specs are parsed)."""
    if isinstance(dataset, os.PathLike):
        dataset = os.fspath(dataset)
    if isinstance(dataset, str):
        return [(spec, None) for spec in parse_dataset_spec(dataset)]
    if isinstance(dataset, DatasetSpec):
        return [(dataset, None)]
    if isinstance(dataset, Sequence) and dataset and all(isinstance(d, DatasetSpec) for d in dataset):
        return [(d, None) for d in dataset]
    name = "<tensor>" if isinstance(dataset, torch.Tensor) else "<list>"
    return [(DatasetSpec(name=name), items_from_memory(dataset))]


def load_calibration(dataset: Any, tokenizer: Any, seqlen: int, nsamples: int, seed: int = 42) -> CalibrationSet:
    """Build the calibration set: ``nsamples`` rows of exactly ``seqlen`` tokens.

    :param dataset: a spec string (``"./a.jsonl:num=64,./b.txt:concat=True"``, see :mod:`signround.data.spec`), a
        path, :class:`DatasetSpec` objects, a list of strings / token-id lists / dicts with ``input_ids``, or a
        LongTensor ``[n, L]``.
    :param tokenizer: a Transformers tokenizer (may be ``None`` for pre-tokenized data).
    :returns: a :class:`CalibrationSet`; fewer rows than ``nsamples`` (with a warning) when the data runs short.
    :raises ValueError: malformed spec, empty data, or no sample reaching ``seqlen``.
    """
    if not isinstance(seqlen, int) or seqlen <= 0:
        raise ValueError(f"seqlen must be a positive integer, got {seqlen!r}")
    if not isinstance(nsamples, int) or nsamples <= 0:
        raise ValueError(f"nsamples must be a positive integer, got {nsamples!r}")
    resolved = _resolve(dataset)  # parses every entry first: a bad spec fails before any file is read
    specs = [spec for spec, _ in resolved]
    loaded = [load_items(spec) if items is None else items for spec, items in resolved]  # all files before tokenizing
    pools = [
        _pool(items, spec, tokenizer, seqlen, spec.num or nsamples, seed)
        for spec, items in zip(specs, loaded, strict=True)
    ]
    quotas = _quotas(pools, specs, nsamples)
    drawn = [(p.name, s) for p, q in zip(pools, quotas, strict=True) for s in p.samples[:q]]
    if len(pools) > 1:
        random.Random(seed).shuffle(drawn)
        logger.info("calibration mix: %s", {p.name: q for p, q in zip(pools, quotas, strict=True)})
    drawn = drawn[:nsamples]
    _check_count(pools, specs, len(drawn), nsamples, seqlen)
    ids = torch.stack([s.ids for _, s in drawn])
    mask = torch.stack([torch.ones(seqlen, dtype=torch.int64) if s.mask is None else s.mask for _, s in drawn])
    return CalibrationSet(ids, mask, dropped=sum(p.dropped for p in pools), sources=[name for name, _ in drawn])
