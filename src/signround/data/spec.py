"""Parse the reference tool's ``--dataset`` string into :class:`DatasetSpec` dataclasses.

Syntax (as in the reference user guide): datasets are separated by commas, a dataset's options by colons, and several
values of one option are joined by ``+``::

    ./calib.jsonl:num=64,NeelNanda/pile-10k:split=train+validation:concat=True
    'NeelNanda/pile-10k:apply_chat_template:system_prompt="You are a helpful assistant."'

Any piece may be wrapped in single or double quotes; inside quotes ``,``, ``:`` and ``+`` are literal, so a system
prompt or a path may contain them. Parsing is strict on purpose: a typo such as ``conact=True`` or ``num=abc`` would
otherwise silently calibrate on different data, which only shows up as worse accuracy hours later. Every error is a
``ValueError`` that names the bad piece and lists the accepted options, raised before any file is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

__all__ = ["OPTIONS", "DatasetSpec", "parse_dataset_spec"]

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
_QUOTES = "\"'"
# Bare words users write for a split (the guide shows "NeelNanda/pile-10k:train"); they get a hint, not a guess.
_SPLIT_LIKE = {"train", "validation", "valid", "val", "test", "train_sft", "test_sft", "train_gen", "test_gen"}


@dataclass(frozen=True)
class DatasetSpec:
    """One calibration source and its options.

    :param name: a local file path (.json, .jsonl, .txt) or a Hugging Face Hub dataset name.
    :param num: how many samples to take from this source when mixing (``None``: an even share of what is left).
    :param concat: join all documents and cut consecutive ``seqlen`` chunks instead of dropping short documents.
    :param apply_chat_template: wrap each text as a user turn and render it with the tokenizer's chat template.
    :param system_prompt: system turn prepended when the chat template is applied (setting it implies
        ``apply_chat_template``, as in the reference).
    :param split: the hub splits to read (``None``: ``train``); local files have no splits.
    """

    name: str
    num: int | None = None
    concat: bool = False
    apply_chat_template: bool = False
    system_prompt: str | None = None
    split: tuple[str, ...] | None = None


def _parse_bool(text: str | None) -> bool:
    if text is None:  # a bare flag such as ":concat"
        return True
    if text.lower() in _TRUE:
        return True
    if text.lower() in _FALSE:
        return False
    raise ValueError("expected True or False")


def _parse_num(text: str | None) -> int:
    if text is None:
        raise ValueError("expected a positive integer")
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a positive integer") from None
    if value <= 0:
        raise ValueError("expected a positive integer")
    return value


def _parse_split(text: str | None) -> tuple[str, ...]:
    if text is None:
        raise ValueError("expected split names joined by '+', e.g. split=train+validation")
    parts = tuple(p.strip() for p in _split_top_level(text, "+"))
    if not all(parts):
        raise ValueError("expected split names joined by '+', e.g. split=train+validation")
    return tuple(_unquote(p) for p in parts)


def _parse_text(text: str | None) -> str:
    if text is None:
        raise ValueError('expected a value, e.g. system_prompt="You are a helpful assistant."')
    return _unquote(text)


# option name -> (DatasetSpec field, value parser, example shown in errors)
OPTIONS: dict[str, tuple[str, Callable[[str | None], Any], str]] = {
    "num": ("num", _parse_num, "num=256"),
    "concat": ("concat", _parse_bool, "concat=True"),
    "apply_chat_template": ("apply_chat_template", _parse_bool, "apply_chat_template"),
    "system_prompt": ("system_prompt", _parse_text, 'system_prompt="..."'),
    "split": ("split", _parse_split, "split=train+validation"),
}


def _accepted() -> str:
    return ", ".join(example for _, _, example in OPTIONS.values())


def _split_top_level(text: str, sep: str) -> list[str]:
    """Split ``text`` at ``sep`` outside quotes; raise on an unbalanced quote."""
    parts, current, quote = [], [], None
    for char in text:
        if quote:
            current.append(char)
            if char == quote:
                quote = None
        elif char in _QUOTES:
            quote = char
            current.append(char)
        elif char == sep:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if quote:
        raise ValueError(f"unbalanced {quote} quote in {text!r}")
    parts.append("".join(current))
    return parts


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in _QUOTES:
        return text[1:-1]
    return text


def _parse_option(spec: DatasetSpec, piece: str, entry: str, seen: set[str]) -> DatasetSpec:
    key, sep, raw = piece.partition("=")
    key = key.strip()
    value = raw.strip() if sep else None
    if not key:
        raise ValueError(f"empty option in dataset entry {entry!r}; accepted options: {_accepted()}")
    if key not in OPTIONS and not sep and "+" not in key and key.lower() in _SPLIT_LIKE:
        key, value = "split", key  # the reference's shorthand: "NeelNanda/pile-10k:train"
    if key not in OPTIONS:
        raise ValueError(f"unknown option {piece!r} in dataset entry {entry!r}; accepted options: {_accepted()}")
    if key in seen:
        raise ValueError(f"option {key!r} given twice in dataset entry {entry!r}")
    seen.add(key)
    field, parser, example = OPTIONS[key]
    try:
        parsed = parser(value)
    except ValueError as err:
        raise ValueError(f"bad value in {piece!r} of dataset entry {entry!r}: {err} (e.g. {example})") from None
    spec = replace(spec, **{field: parsed})
    if key == "system_prompt" and "apply_chat_template" not in seen:
        spec = replace(spec, apply_chat_template=True)
    return spec


def _parse_entry(entry: str) -> DatasetSpec:
    pieces = _split_top_level(entry, ":")
    name = _unquote(pieces[0])
    if not name:
        raise ValueError(f"empty dataset name in entry {entry!r}; expected e.g. ./calib.json:num=128")
    spec, seen = DatasetSpec(name=name), set()
    for piece in pieces[1:]:
        spec = _parse_option(spec, piece.strip(), entry, seen)
    return spec


def parse_dataset_spec(spec: str) -> list[DatasetSpec]:
    """Parse a ``--dataset`` string into one :class:`DatasetSpec` per comma-separated entry.

    A string naming an existing file is taken whole (so a path with a comma or colon in it works without quotes).
    """
    if not isinstance(spec, str):
        raise TypeError(f"dataset spec must be a string, got {type(spec).__name__}")
    if not spec.strip():
        raise ValueError("empty dataset spec; expected e.g. ./calib.json or NeelNanda/pile-10k:num=256")
    if os.path.isfile(spec):
        return [DatasetSpec(name=spec)]
    entries = _split_top_level(spec, ",")
    for entry in entries:
        if not entry.strip():
            raise ValueError(f"empty dataset name in {spec!r} (datasets are separated by single commas)")
    return [_parse_entry(entry.strip()) for entry in entries]
