"""GGUF facts per model family and per tokenizer layout, as data: what llama.cpp needs to run a Hugging Face model.

One table (:data:`GGUF_FAMILIES`) says which llama.cpp architecture runs an HF ``model_type``, which config fields
become which ``{arch}.*`` metadata keys, which block tensors llama.cpp requires, and whether the arch wants the
rotary rows of q/k reordered.  Tensor *names* are deliberately not tabled here: gguf-py's ``TensorNameMap`` (the
ecosystem's own table, ``gguf.get_tensor_name_map``) maps HF names to GGUF names, so a family is taught once, there.

A second table (:data:`BPE_PRE_TOKENIZERS`) names llama.cpp's pre-tokenizer for the byte-level BPE layouts we can
recognise from ``tokenizer.json`` (see :func:`bpe_pre_tokenizer`); llama.cpp picks its splitting regexes by that
name alone, so a wrong name silently tokenizes differently.  Anything not in a table is refused with a
``ValueError`` naming it and the supported values: guessing would produce a file that loads and is wrong.

Facts were read from llama.cpp as vendored by llama-cpp-python 0.3.36 (``src/llama-vocab.cpp``,
``src/llama-model.cpp``, ``src/models/*.cpp``, ``conversion/*.py``) and checked end to end by running our files in
it (``integration_tests/test_gguf_llamacpp.py``).
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BPE_PRE_TOKENIZERS",
    "GGUF_FAMILIES",
    "SPLIT_REGEXES",
    "GGUFFamily",
    "PreTokenizer",
    "bpe_pre_tokenizer",
    "check_gguf_supported",
    "gguf_family",
    "gguf_hparams",
    "llama_rotary_rows",
    "rope_scaling",
    "spm_add_space_prefix",
]

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------------------
# config values


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _rope_parameters(config: Any) -> dict[str, Any]:
    """transformers 5 keeps ``rope_theta`` and the scaling in ``rope_parameters``; 4.x in ``rope_theta`` /
    ``rope_scaling``.  Both are read so a config from either works."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    params.setdefault("rope_type", params.get("type", "default"))
    if "rope_theta" not in params:
        raise ValueError("the config has no rope_theta (rope_parameters or rope_theta): llama.cpp needs the base")
    return params


def _kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


# Derived values: a name in a table below that is not a plain config attribute.
_DERIVED: dict[str, Callable[[Any], Any]] = {
    "<head_dim>": _head_dim,
    "<kv_heads>": _kv_heads,
    "<rope_theta>": lambda c: _rope_parameters(c)["rope_theta"],
    # Qwen-MoE flags llama.cpp's qwen3moe arch cannot honour: it always renormalises the chosen experts' weights
    # and has no dense-MLP layers between the sparse ones.
    "<unnormalised_top_k>": lambda c: not getattr(c, "norm_topk_prob", True),
    "<normalised_top_k>": lambda c: bool(getattr(c, "norm_topk_prob", False)),
    "<dense_layers>": lambda c: bool(getattr(c, "mlp_only_layers", None)) or getattr(c, "decoder_sparse_step", 1) != 1,
}


def _config_value(config: Any, field: str) -> Any:
    return _DERIVED[field](config) if field in _DERIVED else getattr(config, field, None)


# (gguf-py GGUFWriter method, HF config field or derived value): the ``{arch}.*`` keys every decoder family
# here writes.  Method names carry the GGUF value type (uint32 / float32), so values are never mistyped.
DECODER_HPARAMS: tuple[tuple[str, str], ...] = (
    ("add_context_length", "max_position_embeddings"),
    ("add_embedding_length", "hidden_size"),
    ("add_block_count", "num_hidden_layers"),
    ("add_feed_forward_length", "intermediate_size"),
    ("add_head_count", "num_attention_heads"),
    ("add_head_count_kv", "<kv_heads>"),
    ("add_layer_norm_rms_eps", "rms_norm_eps"),
    ("add_rope_freq_base", "<rope_theta>"),
    ("add_rope_dimension_count", "<head_dim>"),  # transformers' GGUF loader reads llama's head_dim from it
    ("add_vocab_size", "vocab_size"),
)
# Written only when the head width is not hidden_size / heads (llama.cpp's default for both).
HEAD_DIM_HPARAMS: tuple[str, ...] = ("add_key_length", "add_value_length")

# The expert keys of MoE archs (routed experts; per-expert widths).
MOE_HPARAMS: tuple[tuple[str, str], ...] = (
    ("add_expert_count", "num_experts"),
    ("add_expert_used_count", "num_experts_per_tok"),
    ("add_expert_feed_forward_length", "moe_intermediate_size"),
)
# Qwen2-MoE: a shared expert beside the routed ones, gated by a sigmoid
SHARED_EXPERT_HPARAMS: tuple[tuple[str, str], ...] = (
    ("add_expert_shared_feed_forward_length", "shared_expert_intermediate_size"),
)
# Mixtral: experts as wide as intermediate_size (llama.cpp's llama arch reads feed_forward_length for them)
MIXTRAL_HPARAMS: tuple[tuple[str, str], ...] = (
    ("add_expert_count", "num_local_experts"),
    ("add_expert_used_count", "num_experts_per_tok"),
)

# GGUF tensor kinds (gguf-py TENSOR_NAMES without "blk.{bid}.") llama.cpp requires in every block of these archs.
_ATTENTION = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output")
_LLAMA_BLOCK = (*_ATTENTION, "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")
# routed experts, stacked per block (packing.gguf stacks our per-expert Linear layers)
_MOE_FFN = ("ffn_norm", "ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_SHARED_EXPERT = ("ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp")
_DENSE_LAYERS = (
    "<dense_layers>",
    "llama.cpp's qwen MoE archs have no dense-MLP layers (mlp_only_layers, decoder_sparse_step)",
)


@dataclass(frozen=True)
class GGUFFamily:
    """How llama.cpp runs one HF ``model_type``.

    ``arch``: llama.cpp's architecture name (``general.architecture``, gguf-py ``MODEL_ARCH_NAMES``).
    ``permute_qk``: the arch applies RoPE to *adjacent* pairs (llama.cpp ``LLAMA_ROPE_TYPE_NORM``) while HF rotates
    the two halves of each head (``rotate_half``), so q/k rows must be reordered (:func:`llama_rotary_rows`); archs
    with ``LLAMA_ROPE_TYPE_NEOX`` (qwen2, qwen3) rotate halves like HF and take the rows as they are.
    ``rope_types``: HF ``rope_type`` values llama.cpp reproduces for this arch (see :func:`rope_scaling`).
    ``block_tensors``: GGUF tensor kinds every block must have (biases and extras are optional).
    ``refuse``: ``(config field, reason)``: a truthy value means llama.cpp's arch would compute something else.
    ``warn``: ``(config field, note)``: a truthy value is logged, as convert_hf_to_gguf accepts it too.
    ``expert_projections``: our per-expert Linear names -> the names gguf-py's TensorNameMap knows for the stacked
    ``ffn_*_exps`` tensors (Mixtral's ``w1`` / ``w3`` / ``w2`` are its gate / up / down).
    """

    model_type: str
    arch: str
    permute_qk: bool
    rope_types: frozenset[str]
    block_tensors: tuple[str, ...] = _LLAMA_BLOCK
    hparams: tuple[tuple[str, str], ...] = DECODER_HPARAMS
    refuse: tuple[tuple[str, str], ...] = ()
    warn: tuple[tuple[str, str], ...] = ()
    expert_projections: tuple[tuple[str, str], ...] = ()


_LLAMA_ROPE = frozenset({"default", "linear", "llama3"})
_NEOX_ROPE = frozenset({"default", "linear"})  # qwen2 / qwen3 load no rope_freqs tensor, so no llama3 scaling
_NO_SWA = (("use_sliding_window", "llama.cpp's qwen2/qwen3 attend the whole context (no sliding window)"),)

GGUF_FAMILIES: dict[str, GGUFFamily] = {
    f.model_type: f
    for f in (
        GGUFFamily("llama", "llama", True, _LLAMA_ROPE),
        # convert_hf_to_gguf writes Mistral as llama too; llama.cpp's llama arch has no sliding window, so outputs
        # differ only once a sequence is longer than the window (Mistral-7B v0.1: 4096).
        GGUFFamily(
            "mistral",
            "llama",
            True,
            _LLAMA_ROPE,
            warn=(("sliding_window", "llama.cpp's llama arch attends the whole context, beyond the window"),),
        ),
        # llama.cpp's llama arch with routed experts (softmax over the router, top-k renormalised, as Mixtral)
        GGUFFamily(
            "mixtral",
            "llama",
            True,
            _LLAMA_ROPE,
            block_tensors=(*_ATTENTION, *_MOE_FFN),
            hparams=(*DECODER_HPARAMS, *MIXTRAL_HPARAMS),
            warn=(("sliding_window", "llama.cpp's llama arch attends the whole context, beyond the window"),),
            expert_projections=(("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")),
        ),
        GGUFFamily("qwen2", "qwen2", False, _NEOX_ROPE, refuse=_NO_SWA),
        GGUFFamily(
            "qwen3",
            "qwen3",
            False,
            _NEOX_ROPE,
            block_tensors=(*_LLAMA_BLOCK, "attn_q_norm", "attn_k_norm"),
            refuse=_NO_SWA,
        ),
        GGUFFamily(
            "qwen3_moe",
            "qwen3moe",
            False,
            _NEOX_ROPE,
            block_tensors=(*_ATTENTION, "attn_q_norm", "attn_k_norm", *_MOE_FFN),
            hparams=(*DECODER_HPARAMS, *MOE_HPARAMS),
            refuse=(
                *_NO_SWA,
                ("<unnormalised_top_k>", "llama.cpp's qwen3moe always renormalises the top-k expert weights"),
                _DENSE_LAYERS,
            ),
        ),
        GGUFFamily(
            "qwen2_moe",
            "qwen2moe",
            False,
            _NEOX_ROPE,
            block_tensors=(*_ATTENTION, *_MOE_FFN, *_SHARED_EXPERT),
            hparams=(*DECODER_HPARAMS, *MOE_HPARAMS, *SHARED_EXPERT_HPARAMS),
            refuse=(
                *_NO_SWA,
                ("<normalised_top_k>", "llama.cpp's qwen2moe does not renormalise the top-k expert weights"),
                _DENSE_LAYERS,
            ),
        ),
    )
}


def gguf_family(config: Any) -> GGUFFamily:
    """The family entry for ``config.model_type``; ``ValueError`` naming it and the supported list otherwise."""
    model_type = getattr(config, "model_type", None)
    family = GGUF_FAMILIES.get(model_type)  # type: ignore[arg-type]
    if family is None:
        raise ValueError(
            f"GGUF export does not support model_type {model_type!r}: llama.cpp's architectures are mapped for "
            f"{', '.join(sorted(GGUF_FAMILIES))} only (signround.models.gguf_arch.GGUF_FAMILIES)"
        )
    return family


def rope_scaling(config: Any) -> dict[str, Any]:
    """The HF RoPE parameters, checked against what the family's llama.cpp arch reproduces.

    ``default``: plain RoPE with ``rope.freq_base``.  ``linear``: positions divided by ``factor``, which is
    llama.cpp's ``rope.scaling.type = linear`` with ``rope.scaling.factor``.  ``llama3``: a fixed divisor per
    frequency, which llama.cpp's llama arch reads from a ``rope_freqs`` tensor.  Others (yarn, dynamic, longrope)
    depend on details not checked against llama.cpp here and are refused.
    """
    family = gguf_family(config)
    params = _rope_parameters(config)
    if params["rope_type"] not in family.rope_types:
        raise ValueError(
            f"GGUF export of {family.model_type!r} does not support rope_type {params['rope_type']!r}; "
            f"supported: {', '.join(sorted(family.rope_types))}"
        )
    return params


def _describe(config: Any, field: str) -> str:
    """The config fields behind a refusal, as the user's config spells them."""
    fields = {
        "<unnormalised_top_k>": ("norm_topk_prob",),
        "<normalised_top_k>": ("norm_topk_prob",),
        "<dense_layers>": ("mlp_only_layers", "decoder_sparse_step"),
    }.get(field, (field,))
    return ", ".join(f"{f}={getattr(config, f, None)!r}" for f in fields)


def check_gguf_supported(config: Any) -> None:
    """Raise before any tuning if a GGUF file of this model could not run in llama.cpp as the HF model does.

    Checks the family (``model_type``), its RoPE scaling, config flags the arch cannot honour, and that gguf-py
    (which writes the container) is installed.  Flags llama.cpp ignores but convert_hf_to_gguf accepts are logged.
    """
    family = gguf_family(config)
    rope_scaling(config)
    for field, reason in family.refuse:
        if _config_value(config, field):
            raise ValueError(f"GGUF export of {family.model_type!r}: {reason} ({_describe(config, field)})")
    for field, note in family.warn:
        if getattr(config, field, None):
            logger.warning("GGUF export of %r with %s=%r: %s", family.model_type, field, getattr(config, field), note)
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("GGUF export needs gguf-py: pip install 'signround[gguf]' (or pip install gguf)")


def gguf_hparams(config: Any) -> list[tuple[str, Any]]:
    """``(GGUFWriter method, value)`` for the ``{arch}.*`` keys of this config (RoPE scaling keys included)."""
    family = gguf_family(config)
    values = [(method, _config_value(config, src)) for method, src in family.hparams]
    if _head_dim(config) != config.hidden_size // config.num_attention_heads:
        values += [(method, _head_dim(config)) for method in HEAD_DIM_HPARAMS]
    params = rope_scaling(config)
    if params["rope_type"] == "linear":
        from gguf import RopeScalingType  # the optional dependency: only needed once a file is written

        values += [
            ("add_rope_scaling_type", RopeScalingType.LINEAR),
            ("add_rope_scaling_factor", float(params["factor"])),
        ]
    return values


def llama_rotary_rows(n_rows: int, n_head: int) -> list[int]:
    """Row order llama.cpp's NORM-RoPE archs expect for a q or k projection: GGUF row ``j`` is HF row ``rows[j]``.

    HF rotates the two halves of a head together: dimension ``i`` pairs with ``i + D/2`` (``D`` = head width).
    llama.cpp's llama arch rotates adjacent rows ``2i`` and ``2i + 1``.  So within each head, GGUF row ``2i + s``
    (``s`` = 0 or 1) is HF row ``s * D/2 + i``; heads stay in place.  Rows are whole output channels, so the same
    order applies to weights, biases and row-wise quantized blocks alike.
    """
    if n_head <= 0 or n_rows % (2 * n_head):
        raise ValueError(f"{n_rows} rows do not split into {n_head} heads of an even width")
    width = n_rows // n_head
    half = width // 2
    return [h * width + s * half + i for h in range(n_head) for i in range(half) for s in (0, 1)]


# ----------------------------------------------------------------------------------------------------------------
# tokenizers: llama.cpp's byte-level BPE pre-tokenizers, recognised from tokenizer.json


@dataclass(frozen=True)
class PreTokenizer:
    """A llama.cpp pre-tokenizer (``tokenizer.ggml.pre``) and the BPE option it implies.

    ``ignore_merges``: llama.cpp takes a whole pre-token that is itself a vocabulary entry without merging
    (llama-vocab.cpp sets this per pre name); it must equal the HF BPE model's ``ignore_merges``.
    """

    name: str
    ignore_merges: bool


# The splitting regexes of tokenizer.json's pre-tokenizers, by a short name.  "gpt2" is what a ByteLevel
# pre-tokenizer with use_regex applies (and what some files spell out in a Split); the others are the
# "original regex from tokenizer.json" llama-vocab.cpp quotes for each pre-tokenizer it adapts.
SPLIT_REGEXES: dict[str, str] = {
    "gpt2": r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    "llama3": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    ),
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+"
    ),
}

# Sequence of splitting steps (names of SPLIT_REGEXES, or "digits": Digits(individual_digits=true)) ->
# llama.cpp's pre-tokenizer whose regex list (llama-vocab.cpp, llm_tokenizer_bpe) splits the same way.
BPE_PRE_TOKENIZERS: dict[tuple[str, ...], PreTokenizer] = {
    ("gpt2",): PreTokenizer("gpt-2", ignore_merges=False),
    ("digits", "gpt2"): PreTokenizer("smollm", ignore_merges=False),  # "\p{N}" first, then the gpt2 regex
    ("llama3",): PreTokenizer("llama-bpe", ignore_merges=True),
    ("qwen2",): PreTokenizer("qwen2", ignore_merges=False),
}


def _step_types(step: dict[str, Any] | None) -> set[str]:
    if step is None:
        return set()
    return {step.get("type", "")}.union(*(_step_types(s) for s in step.get("pretokenizers", [])))


def _split_steps(step: dict[str, Any] | None) -> tuple[str, ...]:
    """The splitting steps of one tokenizer.json pre-tokenizer, by name; ``ValueError`` for anything else."""
    if step is None:
        return ()
    kind = step.get("type")
    if kind == "Sequence":
        return tuple(name for sub in step["pretokenizers"] for name in _split_steps(sub))
    if kind == "ByteLevel":
        if step.get("add_prefix_space"):
            raise ValueError("ByteLevel(add_prefix_space=true): llama.cpp's BPE tokenizers add no prefix space")
        return ("gpt2",) if step.get("use_regex", True) else ()
    if kind == "Digits" and step.get("individual_digits"):
        return ("digits",)
    if kind == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
        pattern = step.get("pattern", {})
        regex = pattern.get("Regex", pattern.get("String"))
        for name, known in SPLIT_REGEXES.items():
            if regex == known:
                return (name,)
        raise ValueError(f"Split regex {regex!r} is none of the known ones ({', '.join(SPLIT_REGEXES)})")
    raise ValueError(f"pre-tokenizer step {step!r} has no llama.cpp equivalent mapped here")


_SPACE_MARK = "\u2581"  # "▁": SentencePiece's visible space


def _is_space_to_mark(step: dict[str, Any]) -> bool:
    return (
        step.get("type") == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == _SPACE_MARK
    )


def spm_add_space_prefix(tokenizer_json: dict[str, Any]) -> bool:
    """``tokenizer.ggml.add_space_prefix`` for a SentencePiece-style (``▁``, byte fallback) ``tokenizer.json``.

    llama.cpp's "llama" tokenizer turns spaces into ``▁`` and, with add_space_prefix, puts one ``▁`` before the
    text (and after each special token) and then merges by score over the whole text, without pre-splitting.
    tokenizer.json spells that either as normalizers ``[Prepend("▁"),] Replace(" ", "▁")`` with no
    pre-tokenizer, or as a non-splitting ``Metaspace`` pre-tokenizer.  Metaspace adds no ``▁`` to a text that
    already starts with a space (llama.cpp and SentencePiece do): such texts tokenize differently, which is logged.
    Any other layout raises ``ValueError``.
    """
    normalizer, pre = tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")
    steps = [] if normalizer is None else normalizer.get("normalizers", [normalizer])
    prepend = [s for s in steps if s.get("type") == "Prepend"]
    if (
        pre is None
        and steps
        and _is_space_to_mark(steps[-1])
        and len(steps) == len(prepend) + 1
        and all(s.get("prepend") == _SPACE_MARK for s in prepend)
        and len(prepend) <= 1
    ):
        return bool(prepend)
    if not steps and pre is not None and pre.get("type") == "Metaspace" and not pre.get("split", True):
        if pre.get("replacement") != _SPACE_MARK:
            raise ValueError(f"Metaspace replacement {pre.get('replacement')!r}: llama.cpp always uses {_SPACE_MARK!r}")
        scheme = pre.get("prepend_scheme", "always" if pre.get("add_prefix_space", True) else "never")
        if scheme != "never":
            logger.warning(
                "tokenizer uses Metaspace(prepend_scheme=%r): a text that starts with a space gets no extra %r in "
                "transformers but does in llama.cpp, so such texts tokenize differently",
                scheme,
                _SPACE_MARK,
            )
        return scheme != "never"
    raise ValueError(
        f"SentencePiece-style tokenizer with normalizer {normalizer!r} and pre-tokenizer {pre!r}: llama.cpp's "
        "'llama' tokenizer only replaces spaces with '▁' (optionally prefixing one) and does not pre-split"
    )


def bpe_pre_tokenizer(tokenizer_json: dict[str, Any]) -> PreTokenizer:
    """llama.cpp's pre-tokenizer for a byte-level BPE ``tokenizer.json`` (a parsed dict), from what it does.

    convert_hf_to_gguf identifies pre-tokenizers by hashing the ids of one test string; here the pre-tokenizer
    steps themselves (ByteLevel's regex, Split regexes, Digits) are read and looked up in
    :data:`BPE_PRE_TOKENIZERS`, together with the BPE model's ``ignore_merges``.  A layout not in the table, or
    one whose ``ignore_merges`` disagrees with llama.cpp's, raises ``ValueError`` naming it.
    """
    pre = tokenizer_json.get("pre_tokenizer")
    if "ByteLevel" not in _step_types(pre):
        raise ValueError(f"BPE without byte fallback and without a ByteLevel pre-tokenizer ({pre!r}) is not byte-level")
    try:
        steps = _split_steps(pre)
    except ValueError as err:
        raise ValueError(f"cannot map this tokenizer's pre-tokenizer to llama.cpp's: {err}") from None
    known = BPE_PRE_TOKENIZERS.get(steps)
    if known is None:
        table = "; ".join(f"{' + '.join(k)} -> {v.name}" for k, v in BPE_PRE_TOKENIZERS.items())
        raise ValueError(f"no llama.cpp pre-tokenizer splits like {' + '.join(steps) or 'nothing'!r}; known: {table}")
    ignore_merges = bool(tokenizer_json["model"].get("ignore_merges", False))
    if ignore_merges != known.ignore_merges:
        raise ValueError(
            f"tokenizer splits like llama.cpp's {known.name!r} but has ignore_merges={ignore_merges}, "
            f"which llama.cpp runs with {known.ignore_merges}"
        )
    return known
