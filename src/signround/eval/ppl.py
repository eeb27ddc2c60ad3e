"""Perplexity and KL divergence of causal LMs on fixed token windows.

The protocol is the one behind the reference numbers in ``shared/data/README.md`` (and the usual
GPTQ / AutoRound WikiText-2 figure): the whole file is tokenized *once* with the tokenizer's defaults
(so BOS appears only at the very start, if the tokenizer adds one), cut into non-overlapping windows
``ids[i*L:(i+1)*L]`` (an incomplete tail is dropped), the first ``max_windows`` are kept, and every window
is scored with ``labels = inputs``: ``L - 1`` predicted tokens per window, ``ppl = exp(mean token NLL)``.
Tokenizing per window instead, or sliding with overlap, gives different numbers, which is why this is
spelled out in one place and every benchmark calls it.

Logits of a 49k vocabulary are large (``512 x 49152`` float32 = 100 MB per window), so batches are sized
from a memory budget and the log-softmax is taken in float32 over chunks of positions.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

# Budget for one batch of float32 logits (per model); the batch size is derived from it when not given.
_LOGITS_BUDGET_BYTES = 512 * 1024 * 1024
# Positions per log-softmax chunk: bounds the float32 temporaries to about 4 x chunk x vocab x 4 bytes.
_POSITION_CHUNK = 256


def tokenize_file(tokenizer, path: str | os.PathLike) -> torch.Tensor:
    """Token ids of a whole UTF-8 text file, tokenized once with the tokenizer's defaults.

    One call over the whole text (not per line or per window) so special tokens such as BOS appear only
    where the tokenizer puts them for a single document; returns a 1-D LongTensor.
    """
    text = Path(path).read_text(encoding="utf-8")
    return _tokenize_text(tokenizer, text)


def _tokenize_text(tokenizer, text: str) -> torch.Tensor:
    # verbose=False: the "sequence longer than model_max_length" warning is expected here (we window later).
    ids = tokenizer(text, verbose=False)["input_ids"]
    return torch.as_tensor(ids, dtype=torch.long).reshape(-1)


def windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``ids[i*L:(i+1)*L]`` of a 1-D id stream, first ``max_windows`` only: ``[n, L]``.

    The incomplete tail is dropped so every window scores the same number of tokens and the mean over
    windows equals the mean over tokens.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2 to predict at least one token, got {seqlen}")
    ids = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise ValueError(f"only {ids.numel()} tokens: not enough for one window of {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen).clone()


def _as_windows(
    token_ids: torch.Tensor | None,
    tokenizer,
    text_or_path: str | os.PathLike | None,
    seqlen: int,
    max_windows: int | None,
) -> torch.Tensor:
    """Windows from whichever input was given: 2-D ids are windows already, 1-D ids a stream, else text."""
    if token_ids is not None:
        t = torch.as_tensor(token_ids, dtype=torch.long)
        if t.dim() == 2:
            return t[:max_windows] if max_windows is not None else t
        return windows(t, seqlen, max_windows)
    if text_or_path is None or tokenizer is None:
        raise ValueError("pass token_ids, or a tokenizer together with text_or_path")
    if isinstance(text_or_path, os.PathLike) or _looks_like_path(text_or_path):
        ids = tokenize_file(tokenizer, text_or_path)
    else:
        ids = _tokenize_text(tokenizer, text_or_path)
    return windows(ids, seqlen, max_windows)


def _looks_like_path(s: str) -> bool:
    # A str is a path only if it names an existing file; long or multi-line strings are always text.
    return len(s) < 4096 and "\n" not in s and os.path.isfile(s)


def _input_device(model) -> torch.device:
    """Where input ids must go: the embedding's device (right for accelerate-dispatched models too)."""
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device


def _vocab_size(model) -> int:
    try:
        return int(model.get_output_embeddings().weight.shape[0])
    except (AttributeError, NotImplementedError):
        return int(model.config.vocab_size)


def _auto_batch_size(model, seqlen: int) -> int:
    return max(1, _LOGITS_BUDGET_BYTES // (seqlen * _vocab_size(model) * 4))


def _logits(model, batch: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=batch.to(_input_device(model)), use_cache=False)
    return out.logits


@torch.inference_mode()
def perplexity(
    model,
    tokenizer=None,
    text_or_path: str | os.PathLike | None = None,
    token_ids: torch.Tensor | None = None,
    seqlen: int = 512,
    max_windows: int | None = 40,
    batch_size: int | None = None,
) -> float:
    """Perplexity ``exp(mean token NLL)`` over the first ``max_windows`` non-overlapping windows.

    Input is either ``token_ids`` (a 1-D stream, or ``[n, L]`` windows used as they are) or a tokenizer with
    ``text_or_path`` (a path, or the text itself). ``batch_size=None`` sizes batches so one batch of float32
    logits stays near 512 MB. Runs on whatever device the model is on; the NLL is accumulated in float64.
    """
    wins = _as_windows(token_ids, tokenizer, text_or_path, seqlen, max_windows)
    bs = batch_size or _auto_batch_size(model, wins.shape[1])
    total_nll = 0.0
    total_tokens = 0
    for start in range(0, wins.shape[0], bs):
        batch = wins[start : start + bs]
        logits = _logits(model, batch)
        targets = batch[:, 1:].to(logits.device)
        for p in range(0, targets.shape[1], _POSITION_CHUNK):
            chunk = logits[:, p : min(p + _POSITION_CHUNK, targets.shape[1])].float()
            tgt = targets[:, p : p + chunk.shape[1]]
            nll = F.cross_entropy(chunk.reshape(-1, chunk.shape[-1]), tgt.reshape(-1), reduction="sum")
            total_nll += float(nll.double())
            total_tokens += tgt.numel()
        del logits
    return math.exp(total_nll / total_tokens)


@torch.inference_mode()
def mean_kl_divergence(
    model_q,
    model_ref,
    token_ids: torch.Tensor,
    seqlen: int = 512,
    max_windows: int | None = 40,
    batch_size: int | None = None,
) -> float:
    """Mean over token positions of ``KL(p_ref || p_q)`` between the two models' next-token distributions.

    A finer signal than perplexity for "how far did quantization move the model": it compares whole
    distributions at every position, so it is 0 exactly when the outputs agree. ``token_ids`` as in
    :func:`perplexity` (1-D stream or ``[n, L]`` windows); every position of every window counts (``L`` per
    window). Computed in float32 with log-softmax, in chunks of positions so memory stays bounded.
    """
    wins = _as_windows(token_ids, None, None, seqlen, max_windows)
    bs = batch_size or _auto_batch_size(model_ref, wins.shape[1])
    total_kl = 0.0
    total_positions = 0
    for start in range(0, wins.shape[0], bs):
        batch = wins[start : start + bs]
        logits_ref = _logits(model_ref, batch)
        logits_q = _logits(model_q, batch)
        if logits_q.shape != logits_ref.shape:
            raise ValueError(
                f"logit shapes differ: quantized {tuple(logits_q.shape)} vs reference {tuple(logits_ref.shape)}"
            )
        for p in range(0, batch.shape[1], _POSITION_CHUNK):
            lr = F.log_softmax(logits_ref[:, p : p + _POSITION_CHUNK].float(), dim=-1)
            lq = F.log_softmax(logits_q[:, p : p + _POSITION_CHUNK].to(lr.device).float(), dim=-1)
            kl = (lr.exp() * (lr - lq)).sum(dim=-1)  # [b, chunk]
            total_kl += float(kl.double().sum())
            total_positions += kl.numel()
        del logits_ref, logits_q
    return total_kl / total_positions
