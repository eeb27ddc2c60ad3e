"""GGUF files for llama.cpp: a Hugging Face causal LM's weights (float or GGUF-quantized), config and tokenizer.

The container itself is written by gguf-py's ``GGUFWriter`` (never by hand); this module decides its content:

* :func:`gguf_tensors`: every HF weight under its GGUF name (gguf-py's ``TensorNameMap``), in the layout llama.cpp
  reads: quantized weights as their block bytes (``quant.gguf.to_bytes``, uint8 ``[rows, row_bytes]``, which
  gguf-py turns back into the ``[rows, cols]`` shape for the declared type), 1-D tensors (norms, biases) as f32,
  other float matrices as f32 / f16 / bf16, q/k rows reordered for archs with adjacent-pair RoPE, and nothing
  dropped silently: a weight is written, skipped for a stated reason, or named in an error.
* :func:`gguf_vocab`: the tokenizer metadata llama.cpp tokenizes with (``tokenizer.ggml.*``), read from the HF
  tokenizer's own ``tokenizer.json`` so llama.cpp produces the same ids.
* :func:`write_gguf`: the file, written to a temporary name in the target directory and renamed into place, so a
  failure never leaves a partial ``.gguf`` behind.

Family facts (arch names, config keys, RoPE, pre-tokenizer names) live in :mod:`signround.models.gguf_arch`.
gguf-py is an optional dependency (``pip install 'signround[gguf]'``), imported inside the functions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from ..models.gguf_arch import (
    bpe_pre_tokenizer,
    check_gguf_supported,
    gguf_family,
    gguf_hparams,
    llama_rotary_rows,
    rope_scaling,
    spm_add_space_prefix,
)
from ..quant.gguf import GGUFQuantized, to_bytes
from ..quant.gguf_mixtures import ModelFacts, plan_types

__all__ = ["FLOAT_TYPES", "SKIPPED", "GGUFTensor", "GGUFVocab", "gguf_tensors", "gguf_vocab", "write_gguf"]

logger = logging.getLogger(__name__)

# Float storage for 2-D weights left unquantized: name -> (gguf-py GGMLQuantizationType member, torch dtype).
FLOAT_TYPES: dict[str, tuple[str, torch.dtype]] = {
    "f32": ("F32", torch.float32),
    "f16": ("F16", torch.float16),
    "bf16": ("BF16", torch.bfloat16),
}

# HF tensors deliberately not written (name suffix -> why).
SKIPPED: dict[str, str] = {
    ".rotary_emb.inv_freq": "RoPE frequencies: llama.cpp computes them from rope.freq_base (and rope_freqs)",
}

_OUTPUT, _EMBED = "output.weight", "token_embd.weight"
_ROPE_FREQS = "rope_freqs.weight"

Weight = torch.Tensor | GGUFQuantized

# A per-expert weight of an unfused experts module (signround.models.experts): llama.cpp stores each projection of
# a block's experts as one tensor ``[n_expert, out, in]`` (``ffn_{gate,up,down}_exps``), named by gguf-py's
# TensorNameMap as ``<prefix>.experts.<proj>.weight``.
_EXPERT = re.compile(r"^(?P<experts>.+\.experts)\.(?P<index>\d+)\.(?P<proj>[^.]+)\.weight$")


class StackedExperts(NamedTuple):
    """One experts module's projection as llama.cpp stores it: every expert's weight in expert order, written as one
    ``[n_expert, out, in]`` tensor (all of one GGUF type, or all float)."""

    parts: tuple[Weight, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.parts), *tuple(self.parts[0].shape))


def expert_groups(names: Iterable[str], config: Any = None) -> dict[str, list[str]]:
    """``<prefix>.experts.<proj>.weight`` -> the per-expert names ``<prefix>.experts.<i>.<proj>.weight`` in expert
    order, for every experts module among ``names`` (``<proj>`` renamed by the family's ``expert_projections``
    when ``config`` is given); ``ValueError`` if an expert is missing (a file with a hole would run the wrong
    experts)."""
    renamed = dict(gguf_family(config).expert_projections) if config is not None else {}
    found: dict[str, dict[int, str]] = {}
    for name in names:
        m = _EXPERT.match(name)
        if m is not None:
            proj = renamed.get(m["proj"], m["proj"])
            found.setdefault(f"{m['experts']}.{proj}.weight", {})[int(m["index"])] = name
    groups = {}
    for stacked, by_index in found.items():
        if sorted(by_index) != list(range(len(by_index))):
            raise ValueError(f"GGUF: {stacked} needs experts 0..{len(by_index) - 1}; found {sorted(by_index)}")
        groups[stacked] = [by_index[i] for i in range(len(by_index))]
    return groups


def _stacked(tensors: Mapping[str, Any], groups: Mapping[str, list[str]], make: Any) -> dict[str, Any]:
    """``tensors`` with each experts module's per-expert entries (``groups``, from :func:`expert_groups`) replaced
    by one stacked entry (``make(parts)``), placed where its first expert was."""
    if not groups:
        return dict(tensors)
    first = {members[0]: stacked for stacked, members in groups.items()}
    members_of = {m for members in groups.values() for m in members}
    out: dict[str, Any] = {}
    for name, value in tensors.items():
        if name in first:
            out[first[name]] = make([tensors[m] for m in groups[first[name]]])
        elif name not in members_of:
            out[name] = value
    return out


class GGUFTensor(NamedTuple):
    """One tensor as handed to ``GGUFWriter.add_tensor``: GGUF name, numpy data (uint8 block bytes for quantized and
    bf16 data, else the float array itself) and its ``GGMLQuantizationType``."""

    name: str
    data: np.ndarray
    ggml_type: int


def _gguf():
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - exercised only without the optional dependency
        raise ImportError("GGUF export needs gguf-py: pip install 'signround[gguf]' (or pip install gguf)") from err
    return gguf


# ----------------------------------------------------------------------------------------------------------------
# tensors


def _is_tied(config: Any, tensors: Mapping[str, Weight]) -> bool:
    """True when llama.cpp should reuse token_embd as the output matrix, i.e. write no ``output.weight``.

    As convert_hf_to_gguf does for tied models.  A head given separately that is quantized, or differs from the
    embedding, is written as ``output.weight`` (llama.cpp then uses it), so what was quantized is what runs.
    """
    if not getattr(config, "tie_word_embeddings", False):
        return False
    head, embed = tensors.get("lm_head.weight"), tensors.get("model.embed_tokens.weight")
    if head is None:
        return True
    if isinstance(head, GGUFQuantized) or isinstance(embed, GGUFQuantized) or embed is None:
        return False
    return head.shape == embed.shape and bool(torch.equal(head, embed))


def _map_names(config: Any, hf_names: Iterable[str], tied: bool) -> dict[str, str]:
    """HF name -> GGUF name for every tensor to write (``tied``: no ``output.weight``, llama.cpp reuses the
    embedding); raises ``ValueError`` listing every tensor that has no GGUF name in this arch and every block
    tensor llama.cpp requires that is missing."""
    gguf = _gguf()
    family = gguf_family(config)
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[family.arch]
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    mapped, unknown = {}, []
    for hf_name in hf_names:
        reason = next((why for suffix, why in SKIPPED.items() if hf_name.endswith(suffix)), None)
        if reason is not None:
            logger.debug("GGUF: skipping %s (%s)", hf_name, reason)
            continue
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unknown.append(hf_name)
        elif tied and gguf_name == _OUTPUT:
            logger.debug("GGUF: %s equals the embedding; tied, so llama.cpp reuses %s", hf_name, _EMBED)
        else:
            mapped[hf_name] = gguf_name
    if unknown:
        raise ValueError(f"GGUF ({family.arch}): no GGUF name for {', '.join(unknown)}; nothing was written")
    have = set(mapped.values())
    if len(have) < len(mapped):
        twice = sorted(hf for hf, g in mapped.items() if list(mapped.values()).count(g) > 1)
        raise ValueError(f"GGUF ({family.arch}): {', '.join(twice)} map to the same GGUF tensor")
    required = [_EMBED, "output_norm.weight"] + [
        f"blk.{b}.{kind}.weight" for b in range(config.num_hidden_layers) for kind in family.block_tensors
    ]
    if not tied:
        required.append(_OUTPUT)
    missing = [n for n in required if n not in have]
    if missing:
        raise ValueError(f"GGUF ({family.arch}): llama.cpp needs {', '.join(missing)}, absent from the given tensors")
    return mapped


def _head_count(config: Any, gguf_name: str) -> int | None:
    """Heads whose rows :func:`llama_rotary_rows` reorders for this tensor, or None if it is not q/k."""
    kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else ""
    if kind == "attn_q":
        return config.num_attention_heads
    if kind == "attn_k":
        return getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return None


def _stacked_tensor(name: str, value: StackedExperts, float_type: str) -> GGUFTensor:
    """``[n_expert, out, in]``: the experts' block bytes stacked (one GGUF type), or their float weights."""
    parts = value.parts
    if all(isinstance(p, GGUFQuantized) for p in parts):
        kinds = {p.type.name for p in parts}  # type: ignore[union-attr]
        if len(kinds) > 1:
            raise ValueError(f"GGUF: the experts of {name} have different types {sorted(kinds)}; llama.cpp needs one")
        return GGUFTensor(name, np.stack([to_bytes(p) for p in parts]), parts[0].type.ggml_type)  # type: ignore[arg-type,union-attr]
    if any(isinstance(p, GGUFQuantized) for p in parts):
        raise ValueError(f"GGUF: the experts of {name} are partly quantized; llama.cpp stores them as one tensor")
    member, dtype = FLOAT_TYPES[float_type]
    t = torch.stack([p.detach().cpu() for p in parts]).to(dtype).contiguous()  # type: ignore[union-attr]
    data = t.view(torch.uint8).numpy() if dtype == torch.bfloat16 else t.numpy()
    return GGUFTensor(name, data, int(_gguf().GGMLQuantizationType[member]))


def _tensor(name: str, value: Weight, rows: list[int] | None, float_type: str) -> GGUFTensor:
    """One tensor's GGUF data, rows reordered by ``rows`` (GGUF row j = given row ``rows[j]``) when set."""
    gguf = _gguf()
    types = gguf.GGMLQuantizationType
    if isinstance(value, StackedExperts):
        return _stacked_tensor(name, value, float_type)
    if isinstance(value, GGUFQuantized):
        data = to_bytes(value)
        return GGUFTensor(name, data[rows] if rows is not None else data, value.type.ggml_type)
    t = value.detach().cpu()
    if rows is not None:
        t = t[torch.tensor(rows)]
    if t.ndim == 1:  # norms and biases: ggml adds / multiplies them in f32
        return GGUFTensor(name, t.to(torch.float32).numpy(), int(types.F32))
    if t.ndim != 2 or not t.is_floating_point():
        raise ValueError(f"GGUF: {name} is {t.dtype} {tuple(t.shape)}; only 1-D / 2-D float tensors are written")
    member, dtype = FLOAT_TYPES[float_type]
    t = t.to(dtype).contiguous()
    data = t.view(torch.uint8).numpy() if dtype == torch.bfloat16 else t.numpy()  # numpy has no bfloat16
    return GGUFTensor(name, data, int(types[member]))


def _rope_freqs(config: Any) -> torch.Tensor:
    """llama.cpp's ``rope_freqs``: the divisor of each RoPE frequency, float32 ``[head_dim / 2]``.

    Taken as the ratio of the unscaled to transformers' own scaled inverse frequencies, so the scaling rule is
    transformers' (``ROPE_INIT_FUNCTIONS``), not re-implemented here.
    """
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = rope_scaling(config)
    scaled, _ = ROPE_INIT_FUNCTIONS[params["rope_type"]](config, torch.device("cpu"))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    plain = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    return (plain / scaled.to(torch.float64)).to(torch.float32)


def gguf_tensors(config: Any, tensors: Mapping[str, Weight], float_type: str = "f16") -> Iterator[GGUFTensor]:
    """The GGUF tensors of a model, from its HF-named weights (``model.layers.0.self_attn.q_proj.weight`` ...).

    :param config: the HF config (its ``model_type`` picks the family, see ``models.gguf_arch``).
    :param tensors: every weight of the model, each a float tensor or a :class:`GGUFQuantized` ``[out, in]``.
    :param float_type: storage of float matrices: ``"f32"``, ``"f16"`` or ``"bf16"`` (1-D tensors are always f32).
    All names are checked before the first tensor is produced (``ValueError`` names every problem).
    """
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type {float_type!r} is not one of {', '.join(FLOAT_TYPES)}")
    check_gguf_supported(config)
    family = gguf_family(config)
    tensors = _stacked(tensors, expert_groups(tensors, config), lambda parts: StackedExperts(tuple(parts)))
    names = _map_names(config, tensors, _is_tied(config, tensors))
    if rope_scaling(config)["rope_type"] == "llama3":
        yield GGUFTensor(_ROPE_FREQS, _rope_freqs(config).numpy(), int(_gguf().GGMLQuantizationType.F32))
    for hf_name, gguf_name in names.items():
        value = tensors[hf_name]
        heads = _head_count(config, gguf_name) if family.permute_qk else None
        rows = llama_rotary_rows(value.shape[0], heads) if heads else None
        yield _tensor(gguf_name, value, rows, float_type)


def model_facts(config: Any, tied: bool) -> ModelFacts:
    """What llama.cpp's type choice reads from a model's GGUF metadata, from its HF config."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0
    heads = config.num_attention_heads
    return ModelFacts(
        n_layer=config.num_hidden_layers,
        n_head=heads,
        n_head_kv=getattr(config, "num_key_value_heads", None) or heads,
        n_expert=int(experts),
        tied_output=tied,
        arch=gguf_family(config).arch,
    )


def planned_types(
    config: Any, shapes: Mapping[str, Sequence[int]], mixture_name: str, tied: bool, imatrix: bool = False
) -> dict[str, str]:
    """HF weight name -> the GGUF type ``llama-quantize`` gives that tensor in file type ``mixture_name``.

    ``shapes`` holds every weight that goes into the file (HF order, ``[out, in]``; 1-D for norms); ``tied``: the
    file reuses the embedding as the output matrix.  Planning reads this before tuning, so each layer is tuned
    towards the grid it will be stored in.
    """
    groups = expert_groups(shapes, config)
    stacked = _stacked(shapes, groups, lambda parts: (len(parts), *tuple(parts[0])))
    names = _map_names(config, stacked, tied)
    by_gguf = {g: tuple(reversed(tuple(stacked[hf]))) for hf, g in names.items()}  # llama.cpp's order: ne0 = row
    types = plan_types(mixture_name, by_gguf, model_facts(config, tied), imatrix=imatrix)
    planned = {hf: types[g] for hf, g in names.items() if hf not in groups}
    for name, members in groups.items():  # every expert gets its stacked tensor's type
        planned.update({member: types[names[name]] for member in members})
    return planned


# ----------------------------------------------------------------------------------------------------------------
# tokenizer


@dataclass(frozen=True)
class GGUFVocab:
    """The ``tokenizer.ggml.*`` metadata of one tokenizer, padded to the model's ``vocab_size``.

    ``model``: ``"llama"`` (SentencePiece-style pieces with ``▁`` and ``<0xXX>`` byte fallback, merged by
    ``scores``) or ``"gpt2"`` (byte-level BPE, merged by ``merges`` after the ``pre`` tokenizer's split).
    ``token_types``: gguf-py ``TokenType`` values.  ``special_ids``: ``bos`` / ``eos`` / ``unk`` / ``pad`` -> id.
    """

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str | list[dict[str, str]] | None


def _tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            f"GGUF export reads the tokenizer's tokenizer.json; {type(tokenizer).__name__} has no `tokenizers` "
            "backend (load it with AutoTokenizer, which builds one)"
        )
    return json.loads(backend.to_str())


def _merge_pairs(model: dict[str, Any]) -> list[tuple[str, str]]:
    """BPE merges as pairs: tokenizer.json stores ``"a b"`` strings (older files) or ``["a", "b"]`` lists."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges", [])]


def _spm_scores(vocab: dict[str, int], merges: list[tuple[str, str]], added: set[str]) -> dict[str, float]:
    """Scores under which llama.cpp's "llama" tokenizer merges exactly as the HF BPE model does.

    llama.cpp repeatedly merges the adjacent pair whose concatenation is a vocabulary piece of highest score
    (leftmost first on ties); HF merges the listed pair of lowest rank.  Scoring a piece ``-rank`` of the first
    merge producing it makes the two agree when (a) every split of a piece into two pieces is a listed merge and
    (b) the merges producing one piece have consecutive ranks.  SentencePiece-derived merge lists have both;
    anything else raises ``ValueError`` rather than tokenizing differently.
    """
    first, count, last = {}, {}, {}
    for rank, (a, b) in enumerate(merges):
        first.setdefault(a + b, rank)
        last[a + b] = rank
        count[a + b] = count.get(a + b, 0) + 1
    split = [p for p in first if last[p] - first[p] + 1 != count[p]]
    listed = set(merges)
    unlisted = [
        (p[:k], p[k:])
        for p in (*vocab, *added)
        for k in range(1, len(p))
        if p[:k] in vocab and p[k:] in vocab and (p[:k], p[k:]) not in listed
    ]
    if split or unlisted:
        raise ValueError(
            "this byte-fallback BPE cannot be expressed as SentencePiece scores for llama.cpp: "
            f"pieces made by non-consecutive merges {split[:5]}, mergeable pairs missing from the merges "
            f"{unlisted[:5]}"
        )
    return {piece: -float(rank) for piece, rank in first.items()}


def _special_flags(tokenizer: Any) -> tuple[bool, bool]:
    """``(add_bos, add_eos)``, observed: what encoding with special tokens adds around a plain encoding."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if starts:
        before, after = full[: starts[0]], full[starts[0] + len(plain) :]
        if before in ([], [bos]) and after in ([], [eos]):
            return bool(before), bool(after)
    raise ValueError(f"the tokenizer adds {full} around {plain}; llama.cpp can only add one BOS and one EOS")


def gguf_vocab(tokenizer: Any, vocab_size: int) -> GGUFVocab:
    """The GGUF tokenizer metadata of an HF tokenizer (a ``tokenizers``-backed one), for a ``vocab_size`` model.

    Token types: added special tokens CONTROL, other added tokens USER_DEFINED, ``<0xXX>`` pieces of a byte
    fallback vocabulary BYTE, its unk UNKNOWN, ids without a token (embedding rows past the tokenizer) UNUSED
    ``[PAD<id>]`` as convert_hf_to_gguf writes them.  Unsupported layouts raise ``ValueError`` (see
    ``models.gguf_arch``).
    """
    gguf = _gguf()
    kind = gguf.TokenType
    data = _tokenizer_json(tokenizer)
    model = data["model"]
    vocab: dict[str, int] = model.get("vocab", {})
    if model.get("type") != "BPE" or not isinstance(vocab, dict):
        raise ValueError(f"GGUF export supports BPE tokenizers only; this one is {model.get('type')!r}")
    spm = bool(model.get("byte_fallback"))
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    by_id = {i: p for p, i in vocab.items()} | {i: t["content"] for i, t in added.items()}
    if max(by_id) >= vocab_size:
        raise ValueError(f"tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size}")
    merges = _merge_pairs(model)
    scores = _spm_scores(vocab, merges, {t["content"] for t in added.values()}) if spm else None
    tokens, types = [], []
    for i in range(vocab_size):
        piece = by_id.get(i)
        tokens.append(f"[PAD{i}]" if piece is None else piece)
        if piece is None:
            types.append(kind.UNUSED)
        elif spm and piece == model.get("unk_token"):  # SentencePiece files mark it so, added token or not
            types.append(kind.UNKNOWN)
        elif i in added:
            types.append(kind.CONTROL if added[i].get("special") else kind.USER_DEFINED)
        elif spm and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            types.append(kind.BYTE)
        else:
            types.append(kind.NORMAL)
    if not spm and any(" " in a or " " in b for a, b in merges):
        raise ValueError("a merge contains a space, which llama.cpp's 'a b' merge strings cannot carry")
    ids = {k: getattr(tokenizer, f"{k}_token_id", None) for k in ("bos", "eos", "unk", "pad")}
    add_bos, add_eos = _special_flags(tokenizer)
    return GGUFVocab(
        model="llama" if spm else "gpt2",
        pre="default" if spm else bpe_pre_tokenizer(data).name,
        tokens=tokens,
        token_types=[int(t) for t in types],
        scores=[scores.get(p, 0.0) for p in tokens] if scores is not None else None,
        merges=None if spm else [f"{a} {b}" for a, b in merges],
        special_ids={k: v for k, v in ids.items() if v is not None},
        add_bos=add_bos,
        add_eos=add_eos,
        add_space_prefix=spm_add_space_prefix(data) if spm else None,
        chat_template=getattr(tokenizer, "chat_template", None) or None,
    )


# ----------------------------------------------------------------------------------------------------------------
# the file


def _add_vocab(writer: Any, vocab: GGUFVocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges is not None:
        writer.add_token_merges(vocab.merges)
    for key, token_id in vocab.special_ids.items():
        getattr(writer, f"add_{key}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)


def write_gguf(
    path: str | os.PathLike[str],
    config: Any,
    tokenizer: Any,
    tensors: Mapping[str, Weight],
    *,
    float_type: str = "f16",
    name: str | None = None,
    file_type: int | None = None,
) -> Path:
    """Write a complete, self-contained ``.gguf`` (weights, hyper-parameters, tokenizer) and return its path.

    Everything is converted and checked before the file is created; the file is written under a temporary name
    in the same directory and renamed into place, so a failure leaves no ``.gguf`` (and an old file intact).
    ``name`` goes to ``general.name`` (default: the config's ``name_or_path``, when set); ``file_type`` to
    ``general.file_type`` (llama.cpp's ``llama_ftype`` of the mixture, e.g. 15 for Q4_K_M; else llama.cpp guesses).
    """
    gguf = _gguf()
    family = gguf_family(config)
    items = list(gguf_tensors(config, tensors, float_type))
    vocab = gguf_vocab(tokenizer, config.vocab_size)
    path = Path(path)
    # a fresh name next to the target (same file system, so the rename is atomic); created by the writer with
    # the usual permissions, unlike mkstemp's owner-only file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        writer = gguf.GGUFWriter(tmp, family.arch)
        name = name or getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
        if name:
            writer.add_name(Path(str(name)).name)
        for method, value in gguf_hparams(config):
            getattr(writer, method)(value)
        if any(isinstance(v, GGUFQuantized) for v in tensors.values()):
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if file_type is not None:
            writer.add_file_type(file_type)
        _add_vocab(writer, vocab)
        for t in items:
            writer.add_tensor(t.name, t.data, raw_dtype=t.ggml_type if t.data.dtype == np.uint8 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
