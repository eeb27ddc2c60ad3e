"""Read calibration documents from local files, in-memory objects or the Hugging Face Hub.

Every source yields a list of *items*, each one of:

* ``str``: a text document, tokenized later by :mod:`signround.data.prepare`;
* :class:`Messages`: a conversation (``[{"role": ..., "content": ...}, ...]``), rendered with the chat template;
* :class:`TokenIds`: an already tokenized sample, used as given.

Local files are dispatched on their suffix through :data:`LOADERS` (``@register_loader(".ext")`` adds one).
Choices, and why:

* ``.txt``: one document per paragraph (blank-line separated); a file without any blank line is read as one
  document per line, the reference tool's layout. A whole book such as tinyshakespeare.txt has short paragraphs,
  so it is most useful with ``concat=True``.
* ``.json``: a list (or a dict, whose values are taken) of items; ``.jsonl``: one item per line. An item is a
  string, an object with ``"text"``, ``"messages"`` or ``"input_ids"``, an object with a single string field, or a
  list of token ids.
* hub names go through the optional ``datasets`` package, imported only then. This machine class often has no
  network, so that path checks the offline switches and probes the endpoint for a few seconds first and fails with an
  error that says how to pass a local file instead of hanging in retries.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from .spec import DatasetSpec

__all__ = [
    "LOADERS",
    "HubUnavailableError",
    "Item",
    "Messages",
    "TokenIds",
    "items_from_memory",
    "load_items",
    "register_loader",
]

logger = logging.getLogger(__name__)

_HUB_PROBE_TIMEOUT_S = 3.0
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
# owner/name or a bare name, as on the Hub (no leading ./, /, ~ and at most one slash)
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TEXT_FIELDS = ("text", "content", "code")


@dataclass(frozen=True)
class Messages:
    """A conversation; rendered with ``tokenizer.apply_chat_template`` before tokenization."""

    turns: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class TokenIds:
    """A pre-tokenized sample: ``ids`` 1-D int64, ``mask`` 1-D int64 of the same length or ``None`` (all ones)."""

    ids: torch.Tensor
    mask: torch.Tensor | None = None


Item = str | Messages | TokenIds


class HubUnavailableError(ConnectionError):
    """A hub dataset was named but the hub cannot be used here; the message says how to pass a local file."""


def _local_hint(name: str) -> str:
    return (
        f"pass a local file instead, e.g. dataset='./calib.jsonl' (one JSON object per line with a \"text\" field), "
        f"a .json list of strings, a .txt file (add :concat=True for a whole book), or a Python list of strings; "
        f"or run where the Hub is reachable once so that {name!r} is cached, then set HF_DATASETS_OFFLINE=1"
    )


# ---------------------------------------------------------------------------------------------------- items


def _token_ids(value: Any, mask: Any, where: str) -> TokenIds:
    ids = torch.as_tensor(value)
    if ids.dim() == 2 and ids.shape[0] == 1:  # tokenizer(..., return_tensors="pt") gives [1, L]
        ids = ids[0]
    if ids.dim() != 1 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"{where}: input_ids must be a 1-D sequence of integers, got shape {tuple(ids.shape)}")
    mask_t = None
    if mask is not None:
        mask_t = torch.as_tensor(mask).reshape(-1).to(torch.int64)
        if mask_t.shape != ids.shape:
            raise ValueError(f"{where}: attention_mask shape {tuple(mask_t.shape)} != input_ids {tuple(ids.shape)}")
    return TokenIds(ids.to(torch.int64), mask_t)


def _is_int_list(value: Any) -> bool:
    return (
        isinstance(value, list) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )


def to_item(value: Any, where: str) -> Item | None:
    """Turn one JSON-like value into an item; ``None`` for empty text (skipped, like blank lines)."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, Mapping):
        for field in _TEXT_FIELDS:
            if isinstance(value.get(field), str):
                return to_item(value[field], where)
        if "messages" in value:
            return _messages(value["messages"], where)
        if "input_ids" in value:
            return _token_ids(value["input_ids"], value.get("attention_mask"), where)
        if len(value) == 1 and isinstance(next(iter(value.values())), str):
            return to_item(next(iter(value.values())), where)
    elif _is_int_list(value) or isinstance(value, torch.Tensor):
        return _token_ids(value, None, where)
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) and "role" in v for v in value):
        return _messages(value, where)
    keys = f" with keys {sorted(value)}" if isinstance(value, Mapping) else ""
    raise ValueError(
        f"{where}: cannot read a {type(value).__name__}{keys} as a calibration sample; expected a string, an object "
        f'with "text", "messages" or "input_ids", or a list of token ids'
    )


def _messages(turns: Any, where: str) -> Messages:
    if not (isinstance(turns, list) and turns and all(isinstance(t, Mapping) and "role" in t for t in turns)):
        raise ValueError(f'{where}: "messages" must be a non-empty list of {{"role": ..., "content": ...}} objects')
    return Messages(tuple(dict(t) for t in turns))


def _items(values: Iterable[tuple[str, Any]], origin: str) -> list[Item]:
    items = [item for where, value in values if (item := to_item(value, where)) is not None]
    if not items:
        raise ValueError(f"{origin} contains no calibration samples (it is empty or every text is blank)")
    return items


def items_from_memory(data: Any) -> list[Item]:
    """Items from an in-memory dataset: a list of strings / dicts / token-id lists, a LongTensor ``[n, L]``, or a
    mapping with ``input_ids`` (e.g. ``tokenizer(texts, return_tensors="pt")``)."""
    if isinstance(data, Mapping) and "input_ids" in data:
        ids, mask = data["input_ids"], data.get("attention_mask")
        rows = list(ids) if not isinstance(ids, torch.Tensor) or ids.dim() == 2 else [ids]
        masks = [None] * len(rows) if mask is None else list(mask)
        return _items(
            (
                (f"input_ids[{i}]", {"input_ids": r, "attention_mask": m})
                for i, (r, m) in enumerate(zip(rows, masks, strict=True))
            ),
            "the dataset mapping",
        )
    if isinstance(data, torch.Tensor):
        if data.dim() != 2:
            raise ValueError(
                f"a token-id tensor dataset must be 2-D [n, L], got shape {tuple(data.shape)}; "
                "cut a 1-D stream with signround.data.chunk_token_ids(ids, seqlen, n)"
            )
        return _items(((f"row {i}", row) for i, row in enumerate(data)), "the token-id tensor")
    if isinstance(data, Sequence) and not isinstance(data, str):
        return _items(((f"dataset[{i}]", v) for i, v in enumerate(data)), "the dataset list")
    raise TypeError(
        f"unsupported dataset type {type(data).__name__}; expected a spec string, a path, a list of strings, "
        "a list of token-id lists or dicts with input_ids, or a LongTensor [n, L]"
    )


# ---------------------------------------------------------------------------------------------------- local files

Loader = Callable[[Path], list[Item]]
LOADERS: dict[str, Loader] = {}


def register_loader(*suffixes: str) -> Callable[[Loader], Loader]:
    """Register a local-file loader for the given suffixes (``".json"``); a new format is one decorated function."""

    def register(fn: Loader) -> Loader:
        for suffix in suffixes:
            LOADERS[suffix.lower()] = fn
        return fn

    return register


def _read_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"calibration file {str(path)!r} is empty")
    return text


@register_loader(".txt")
def load_txt(path: Path) -> list[Item]:
    text = _read_text(path).replace("\r\n", "\n").strip()
    if re.search(r"\n[ \t]*\n", text):
        docs = [p.strip("\n") for p in re.split(r"\n[ \t]*\n", text)]
        logger.info("%s: read %d blank-line separated paragraphs", path, len(docs))
    else:
        docs = text.split("\n")
        logger.info("%s: no blank lines, read %d lines as documents", path, len(docs))
    return _items(((f"{path} document {i}", d) for i, d in enumerate(docs)), f"calibration file {str(path)!r}")


@register_loader(".json")
def load_json(path: Path) -> list[Item]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if isinstance(data, Mapping):  # the reference takes the values of a top-level object
        values = ((f"{path} key {k!r}", v) for k, v in data.items())
    elif isinstance(data, list):
        values = ((f"{path} item {i}", v) for i, v in enumerate(data))
    else:
        raise ValueError(f"{path}: expected a JSON list (or object) of samples, got {type(data).__name__}")
    return _items(values, f"calibration file {str(path)!r}")


@register_loader(".jsonl")
def load_jsonl(path: Path) -> list[Item]:
    def values() -> Iterable[tuple[str, Any]]:
        for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err})") from None

    return _items(values(), f"calibration file {str(path)!r}")


def looks_like_hub_name(name: str) -> bool:
    return bool(_HUB_NAME.match(name)) and Path(name).suffix.lower() not in LOADERS


def _load_local(spec: DatasetSpec, path: Path) -> list[Item]:
    loader = LOADERS.get(path.suffix.lower())
    if loader is None:
        raise ValueError(f"unsupported calibration file type {path.suffix!r} ({path}); supported: {sorted(LOADERS)}")
    if spec.split is not None:
        raise ValueError(f"split= applies to hub datasets only; {str(path)!r} is a local file")
    return loader(path)


# ---------------------------------------------------------------------------------------------------- hub


def _offline_switch() -> str | None:
    for var in _OFFLINE_VARS:
        if os.environ.get(var, "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
            return var
    return None


def _hub_reachable(timeout: float = _HUB_PROBE_TIMEOUT_S) -> bool:
    """TCP-connect to the hub endpoint within ``timeout`` seconds (name resolution included, hence the thread)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _hub_rows(spec: DatasetSpec) -> Iterable[tuple[str, Any]]:
    offline = _offline_switch()
    try:
        import datasets
    except ImportError:
        raise ImportError(
            f"dataset {spec.name!r} is not a local file, and reading Hub datasets needs the optional `datasets` "
            f"package (pip install 'signround[datasets]'); or {_local_hint(spec.name)}"
        ) from None
    if offline is None and not _hub_reachable():
        raise HubUnavailableError(
            f"cannot reach the Hugging Face Hub to download dataset {spec.name!r} "
            f"(no connection within {_HUB_PROBE_TIMEOUT_S:.0f} s); {_local_hint(spec.name)}"
        )
    for split in spec.split or ("train",):
        try:
            table = datasets.load_dataset(spec.name, split=split)
        except OSError as err:  # ConnectionError, offline-mode and not-found errors
            why = f"offline mode ({offline}=1) and no cached copy" if offline else f"{type(err).__name__}: {err}"
            raise HubUnavailableError(
                f"cannot load hub dataset {spec.name!r} split {split!r}: {why}; {_local_hint(spec.name)}"
            ) from err
        field = next((f for f in (*_TEXT_FIELDS, "messages") if f in table.column_names), None)
        if field is None:
            raise ValueError(
                f"hub dataset {spec.name!r} has no text column; columns: {table.column_names}; "
                f'expected one of {[*_TEXT_FIELDS, "messages"]} (convert it to a local .jsonl with a "text" field)'
            )
        for i, value in enumerate(table[field]):
            yield f"{spec.name}[{split}] row {i}", {field: value}


def load_items(spec: DatasetSpec) -> list[Item]:
    """The items of one parsed dataset entry: a local file by suffix, else a hub dataset."""
    path = Path(spec.name).expanduser()
    if path.is_file():
        return _load_local(spec, path)
    if path.exists():
        raise ValueError(f"calibration dataset {spec.name!r} is a directory; pass a .json, .jsonl or .txt file")
    if not looks_like_hub_name(spec.name):
        raise FileNotFoundError(f"calibration file {spec.name!r} does not exist (supported types: {sorted(LOADERS)})")
    return _items(_hub_rows(spec), f"hub dataset {spec.name!r}")
