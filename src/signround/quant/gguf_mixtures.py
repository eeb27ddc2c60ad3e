"""llama.cpp's GGUF file types ("mixtures"): which GGUF type each tensor of a model is stored in.

A llama.cpp file type such as ``Q4_K_M`` is not one type for every weight: ``llama-quantize`` starts from a base
type (``q4_k``) and moves chosen tensors up (or, when a row does not fit the block size, sideways) according to
what the tensor is, where it sits in the model and a few facts about the model.  An exporter that wants its files to
look like llama.cpp's, and to be compared with them at equal size, has to make the same choices; this module
states them as data plus one small pure function, the same rules as llama.cpp 0.3.36 (llama-cpp-python 0.3.36,
``src/llama-quant.cpp``: ``llama_tensor_get_type`` and the loop of ``llama_model_quantize_impl``) for the file
types built from the types of :mod:`signround.quant.gguf`:

``q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q2_k_s q3_k_s q3_k_m q3_k_l q4_k_s q4_k_m q5_k_s q5_k_m q6_k``

(``llama-quantize``'s names, lower-cased).  The rules, in the order llama.cpp applies them:

1. **Not quantized at all** (the tensor keeps the type it has in the input file, normally ``f32`` for 1-D and
   ``f16`` / ``bf16`` / ``f32`` for the rest): 1-D tensors (norms, biases), names not ending in ``weight``, norms,
   MoE routers (``ffn_gate_inp``), positional / token-type embeddings and a list of small special tensors
   (:data:`NEVER_QUANTIZED_PARTS`).
2. **The logits matrix**: ``output.weight``, or ``token_embd.weight`` when there is no ``output.weight`` (tied
   embeddings), gets ``q6_k`` (``q8_0`` in the ``q8_0`` file type, and always ``q8_0`` when its rows do not fit the
   base type's blocks): every logit goes through it and nothing after it averages its error out, and a vocabulary
   projection is a small part of a large model.  An untied ``token_embd.weight`` is only looked up, one row per
   token, and keeps the base type.
3. **attn_v** (and the fused ``attn_qkv`` / MLA ``attn_kv_b``, which hold the value projection): more bits in most
   K mixtures (:attr:`Mixture.attn_v`).  With grouped-query attention the V projection has only ``n_head_kv``
   heads, so it is a small tensor whose every weight is shared by ``n_gqa`` query heads: extra bits cost little
   and buy much.  That is also why ``q2_k`` / ``q2_k_s`` lift it to ``q4_k`` once ``n_gqa >= 4`` and why a 70B
   model (8 query heads per KV head) turns its ``q3_k`` / ``q4_k`` V into ``q5_k``.  8-expert MoE models
   (Mixtral) store attn_v and attn_k in ``q8_0``: next to the experts they are tiny.
4. **ffn_down**: more bits on some layers (:attr:`Mixture.ffn_down`).  Its errors land directly in the residual
   stream, and the first and last layers matter most, hence :attr:`When.MORE_BITS` (first and last eighth of the
   layers plus every third one between) in ``_m`` mixtures and "first eighth / sixteenth" elsewhere.
5. **attn_output**: one step up in ``q2_k`` / ``q3_k_m`` / ``q3_k_l`` (and ``q5_k`` in the low mixtures of
   8-expert models, where attention is a small share of the weights).
6. **Row-size fallback**: a tensor whose rows (``ne[0]``) are not a multiple of its type's block (256 for the K
   types) gets a 32-block type of similar size instead (:data:`FALLBACK`: ``q2_k q3_k -> q4_0``,
   ``q4_k -> q5_0``, ``q5_k -> q5_1``, ``q6_k -> q8_0``), and ``f16`` when not even 32 divides its rows.

The per-layer choices depend on a layer's position: llama.cpp counts the attn_v-like tensors (and, in dense models,
the ffn_down tensors) in the order it walks them (non-block tensors first, then block by block, by name within a
block) and for MoE models reads the block number from the name.  :func:`plan_types` walks a whole model that way;
:func:`tensor_type` decides one tensor alone and takes its block number from the name, which is the same thing
whenever each ``blk.N`` holds one attn_v-like and one ffn_down tensor, as in every common architecture.

The thresholds themselves (which layers, which types) were settled empirically by llama.cpp's authors (perplexity
against file size) when the K-quants were introduced; they are reproduced, not re-derived.  Checked tensor for
tensor against ``llama_model_quantize`` and llama.cpp's own type chooser: ``integration_tests/
test_gguf_mixtures_llamacpp.py``.  Not covered: the ``iq*``, ``tq*``, ``mxfp4`` and ``q1_0`` / ``q2_0`` file
types, user overrides (``--tensor-type``, ``--output-tensor-type``, ``--token-embedding-type``, ``--pure``,
``--leave-output-tensor``), pruning, requantizing already-quantized inputs and the GLM-5 "next" special cases.
Note that ``llama-quantize`` refuses to write a ``q2_k_s`` file without an importance matrix (it calls q2_k without
one garbage in that mixture); the types it chooses are the same either way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum

from .gguf import gguf_type

__all__ = [
    "FALLBACK",
    "FLOAT_TYPES",
    "MIXTURES",
    "NEVER_QUANTIZED_PARTS",
    "Bump",
    "Category",
    "Mixture",
    "ModelFacts",
    "When",
    "category",
    "is_quantized",
    "mixture",
    "mixture_names",
    "plan_types",
    "tensor_nbytes",
    "tensor_type",
]

FLOAT_TYPES: dict[str, int] = {"f32": 4, "f16": 2, "bf16": 2}  # unquantized GGUF types: bytes per weight

# A 256-block type that does not fit a tensor's rows -> the 32-block type llama.cpp uses instead.  The 32-block types
# fall back to themselves; whatever still does not fit (rows not a multiple of 32) becomes f16.
FALLBACK: dict[str, str] = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
_LAST_RESORT = "f16"

# Substrings of tensor names llama.cpp never quantizes (``tensor_allows_quantization``), beside 1-D tensors and
# names not ending in "weight": norms, MoE routers and expert-id tables, Gemma-3n's tiny altup / laurel / per-layer
# projections, Mamba / LFM conv kernels, MiniMax indexer projections, RWKV's small 2-D time-mix weights, T5's
# relative position bias and vision / audio position, patch and codebook tensors.
_RWKV_TIME_MIX = ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2", "g1", "g2")
_RWKV_TIME_MIX += ("decay_w1", "decay_w2", "lerp_fused")
NEVER_QUANTIZED_PARTS: tuple[str, ...] = (
    "_norm.weight",
    "ffn_gate_inp.weight",
    "ffn_gate_tid2eid.weight",
    "altup",
    "laurel",
    "per_layer_model_proj",
    "ssm_conv1d",
    "shortconv.conv.weight",
    "indexer.k_proj.weight",
    "indexer.q_proj.weight",
    *(f"time_mix_{part}.weight" for part in _RWKV_TIME_MIX),
    "attn_rel_b.weight",
    ".position_embd",
    "sam.pos_embd",
    "sam.neck.",
    "sam.net_",
    ".rel_pos",
    ".patch_embd",
    ".patch_merger",
    "a.rvq.codebook",
    "mm.a.code_embd",
)
_NEVER_QUANTIZED_NAMES = frozenset({"position_embd.weight", "token_types.weight"})  # BERT-style input embeddings

_BLOCK = re.compile(r"blk\.(\d+)\.")


class Category(str, Enum):
    """What a tensor is, as far as the mixtures care (llama.cpp's ``tensor_category``, by name)."""

    OUTPUT = "output"
    TOKEN_EMBD = "token_embd"
    ATTN_V = "attn_v"  # also the fused attn_qkv and MLA's attn_kv_b: they carry the value projection
    ATTN_K = "attn_k"
    ATTN_Q = "attn_q"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OTHER = "other"


_EXACT_CATEGORIES: dict[str, Category] = {
    "output.weight": Category.OUTPUT,
    "token_embd.weight": Category.TOKEN_EMBD,
    "per_layer_token_embd.weight": Category.TOKEN_EMBD,  # Gemma-3n
}
# First match wins: "ffn_up" / "ffn_gate" / "ffn_down" also match expert ("_exps") and shared-expert ("_shexp")
# tensors.  (llama.cpp has a separate attn_qkv branch, but it comes after the attn_v one, which already takes the
# fused tensor, so for these file types attn_qkv is simply an attn_v.)
_CATEGORY_PARTS: tuple[tuple[str, Category], ...] = (
    ("attn_qkv.weight", Category.ATTN_V),
    ("attn_kv_b.weight", Category.ATTN_V),
    ("attn_v.weight", Category.ATTN_V),
    ("attn_k.weight", Category.ATTN_K),
    ("attn_q.weight", Category.ATTN_Q),
    ("attn_output.weight", Category.ATTN_OUTPUT),
    ("ffn_up", Category.FFN_UP),
    ("ffn_gate", Category.FFN_GATE),
    ("ffn_down", Category.FFN_DOWN),
)

# llama.cpp's LLM_TYPE_70B, the one model size the mixtures look at: architecture -> its block count then (per
# src/models/<arch>.cpp).  A Llama also needs grouped-query attention (else it is the 65B) and no 8 experts.
_SEVENTY_B_LAYERS: dict[str, int] = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}


@dataclass(frozen=True)
class ModelFacts:
    """The model facts llama.cpp's choice depends on (GGUF metadata, not weights).

    ``n_layer``: ``{arch}.block_count``; ``n_head`` / ``n_head_kv``: attention / KV heads (of the first layer, as
    llama.cpp takes them); ``n_expert``: routed experts (0 or 1 for a dense model); ``tied_output``: the file has no
    ``output.weight``, so ``token_embd.weight`` is also the logits matrix; ``arch``: ``general.architecture``
    (only ``"falcon"`` changes rules, and the 70B test below is per architecture).
    """

    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    tied_output: bool = False
    arch: str = "llama"

    def __post_init__(self) -> None:
        if self.n_layer < 1 or self.n_head < 1 or self.n_head_kv < 0 or self.n_expert < 0:
            raise ValueError(
                f"ModelFacts: need n_layer >= 1, n_head >= 1, n_head_kv >= 0, n_expert >= 0; got n_layer="
                f"{self.n_layer}, n_head={self.n_head}, n_head_kv={self.n_head_kv}, n_expert={self.n_expert}"
            )

    @property
    def n_gqa(self) -> int:
        """Query heads per KV head (llama.cpp's integer ``n_head / n_head_kv``; 0 without KV heads)."""
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        """llama.cpp classes the model as a 70B, which gives its attn_v ``q5_k`` instead of ``q3_k`` / ``q4_k``."""
        if _SEVENTY_B_LAYERS.get(self.arch) != self.n_layer:
            return False
        return self.arch != "llama" or (self.n_head != self.n_head_kv and self.n_expert != 8)

    @property
    def is_falcon(self) -> bool:
        return self.arch == "falcon"


class When(str, Enum):
    """Which tensors of a kind a :class:`Bump` applies to.  ``i`` is the tensor's position among its kind (its layer,
    in the usual one-per-block case) and ``n`` the number of them (``n_layer``); divisions are integer."""

    ALWAYS = "always"
    MORE_BITS = "more_bits"  # llama.cpp's use_more_bits: i < n/8, i >= 7n/8, or every third layer between
    FIRST_EIGHTH = "first_eighth"  # i < n/8
    FIRST_SIXTEENTH = "first_sixteenth"  # i < n/16
    FIRST_TWO = "first_two"  # i < 2
    FIRST_FOUR = "first_four"  # i < 4
    GQA_4 = "gqa_4"  # a model-wide condition: at least 4 query heads share each KV head

    def holds(self, i: int, n: int, facts: ModelFacts) -> bool:
        if self is When.ALWAYS:
            return True
        if self is When.MORE_BITS:
            return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2
        if self is When.FIRST_EIGHTH:
            return i < n // 8
        if self is When.FIRST_SIXTEENTH:
            return i < n // 16
        if self is When.FIRST_TWO:
            return i < 2
        if self is When.FIRST_FOUR:
            return i < 4
        return facts.n_gqa >= 4  # When.GQA_4


@dataclass(frozen=True)
class Bump:
    """Give the tensor type ``to`` where ``when`` holds.  A rule is a tuple of bumps; the first that holds wins and
    none holding leaves the mixture's base type."""

    to: str
    when: When = When.ALWAYS


Rule = tuple[Bump, ...]


@dataclass(frozen=True)
class Mixture:
    """One llama.cpp file type as data.

    ``name``: ``llama-quantize``'s name, lower-case; ``file_type``: its ``llama_ftype`` number, the value of the
    ``general.file_type`` key; ``base``: the type of every quantized tensor no rule moves; ``output``: the logits
    matrix's type (see the module docstring).  The rules (:class:`Bump` tuples) by tensor kind:

    * ``attn_v``: attn_v / attn_qkv / attn_kv_b, by their position among those;
    * ``ffn_down`` and, for Falcon, ``ffn_down_falcon`` (``None``: the same);
    * ``ffn_down_imatrix``: tried after ``ffn_down`` when the quantization has an importance matrix (only
      ``q4_0`` / ``q5_0``: with one, llama.cpp guards the first layers' ffn_down with the ``_1`` type);
    * ``attn_output``, ``attn_output_falcon``, and ``attn_output_8_experts``: the type for 8-expert models (``None``:
      the base type).
    """

    name: str
    file_type: int
    base: str
    output: str = "q6_k"
    attn_v: Rule = ()
    ffn_down: Rule = ()
    ffn_down_falcon: Rule | None = None
    ffn_down_imatrix: Rule = ()
    attn_output: Rule = ()
    attn_output_falcon: Rule = ()
    attn_output_8_experts: str | None = None

    def __post_init__(self) -> None:
        rules = (self.attn_v, self.ffn_down, self.ffn_down_falcon or (), self.ffn_down_imatrix, self.attn_output)
        named = [self.base, self.output, *(b.to for r in rules for b in r)]
        named += [b.to for b in self.attn_output_falcon] + [self.attn_output_8_experts or self.base]
        for type_name in named:
            gguf_type(type_name)  # raises on an unknown name

    @property
    def is_k_mixture(self) -> bool:
        return gguf_type(self.base).is_k_quant


def _mixtures(*items: Mixture) -> dict[str, Mixture]:
    return {m.name: m for m in items}


_MORE_BITS, _EIGHTH, _SIXTEENTH = When.MORE_BITS, When.FIRST_EIGHTH, When.FIRST_SIXTEENTH

MIXTURES: dict[str, Mixture] = _mixtures(
    Mixture("q4_0", 2, "q4_0", ffn_down_imatrix=(Bump("q4_1", _EIGHTH),)),
    Mixture("q4_1", 3, "q4_1"),
    Mixture("q5_0", 8, "q5_0", ffn_down_imatrix=(Bump("q5_1", _EIGHTH),)),
    Mixture("q5_1", 9, "q5_1"),
    Mixture("q8_0", 7, "q8_0", output="q8_0"),
    Mixture(
        "q2_k",
        10,
        "q2_k",
        attn_v=(Bump("q4_k", When.GQA_4), Bump("q3_k")),
        ffn_down=(Bump("q3_k"),),
        attn_output=(Bump("q3_k"),),
        attn_output_8_experts="q5_k",
    ),
    Mixture("q2_k_s", 21, "q2_k", attn_v=(Bump("q4_k", When.GQA_4),), ffn_down=(Bump("q4_k", _EIGHTH),)),
    Mixture("q3_k_s", 11, "q3_k", attn_output_8_experts="q5_k"),
    Mixture(
        "q3_k_m",
        12,
        "q3_k",
        attn_v=(Bump("q5_k", When.FIRST_TWO), Bump("q4_k")),
        ffn_down=(Bump("q5_k", _SIXTEENTH), Bump("q4_k")),
        ffn_down_falcon=(Bump("q5_k", _SIXTEENTH), Bump("q4_k", _MORE_BITS)),
        attn_output=(Bump("q4_k"),),
        attn_output_8_experts="q5_k",
    ),
    Mixture(
        "q3_k_l",
        13,
        "q3_k",
        attn_v=(Bump("q5_k"),),
        ffn_down=(Bump("q5_k"),),
        ffn_down_falcon=(Bump("q4_k"),),
        attn_output=(Bump("q5_k"),),
        attn_output_falcon=(Bump("q4_k"),),
    ),
    Mixture(
        "q4_k_s",
        14,
        "q4_k",
        attn_v=(Bump("q5_k", When.FIRST_FOUR),),
        ffn_down=(Bump("q5_k", _EIGHTH),),
        ffn_down_falcon=(),
        attn_output_8_experts="q5_k",
    ),
    Mixture(
        "q4_k_m",
        15,
        "q4_k",
        attn_v=(Bump("q6_k", _MORE_BITS),),
        ffn_down=(Bump("q6_k", _MORE_BITS),),
        ffn_down_falcon=(Bump("q6_k", _SIXTEENTH), Bump("q5_k", _MORE_BITS)),
        attn_output_8_experts="q5_k",
    ),
    Mixture("q5_k_s", 16, "q5_k"),
    Mixture("q5_k_m", 17, "q5_k", attn_v=(Bump("q6_k", _MORE_BITS),), ffn_down=(Bump("q6_k", _MORE_BITS),)),
    Mixture("q6_k", 18, "q6_k"),
)


def mixture_names() -> list[str]:
    return list(MIXTURES)


def mixture(name: str | Mixture) -> Mixture:
    """The registered file type called ``name`` (case-insensitive: ``"Q4_K_M"`` works); a Mixture is returned as is."""
    if isinstance(name, Mixture):
        return name
    found = MIXTURES.get(name.lower()) if isinstance(name, str) else None
    if found is None:
        raise ValueError(f"unknown GGUF mixture {name!r}; supported: {', '.join(MIXTURES)}")
    return found


def category(name: str) -> Category:
    """The kind of tensor ``name`` is (llama.cpp's ``tensor_get_category``)."""
    exact = _EXACT_CATEGORIES.get(name)
    if exact is not None:
        return exact
    return next((cat for part, cat in _CATEGORY_PARTS if part in name), Category.OTHER)


def _ne(shape: Sequence[int]) -> tuple[int, ...]:
    ne = tuple(int(d) for d in shape)
    if not ne or any(d < 1 for d in ne):
        raise ValueError(
            f"tensor shape must be non-empty positive ne (llama.cpp order, ne[0] = row length), got {shape}"
        )
    return ne


def _n_dims(ne: tuple[int, ...]) -> int:
    """``ggml_n_dims``: trailing dimensions of 1 do not count (a ``[4096, 1]`` tensor is 1-D)."""
    n = len(ne)
    while n > 1 and ne[n - 1] == 1:
        n -= 1
    return n


def is_quantized(name: str, shape: Sequence[int]) -> bool:
    """Whether llama.cpp quantizes this tensor at all (else it is copied in its input type)."""
    if _n_dims(_ne(shape)) < 2 or not name.endswith("weight") or name in _NEVER_QUANTIZED_NAMES:
        return False
    return not any(part in name for part in NEVER_QUANTIZED_PARTS)


def _block_of(name: str) -> int | None:
    found = _BLOCK.match(name)
    return int(found.group(1)) if found else None


def _first(rule: Iterable[Bump], i: int, n: int, facts: ModelFacts) -> str | None:
    return next((b.to for b in rule if b.when.holds(i, n, facts)), None)


def _fits(type_name: str, row: int) -> bool:
    return type_name in FLOAT_TYPES or row % gguf_type(type_name).block_size == 0


def _fallback(type_name: str, row: int) -> str:
    if _fits(type_name, row):
        return type_name
    legacy = FALLBACK.get(type_name, type_name)
    return legacy if _fits(legacy, row) else _LAST_RESORT


def _check_source(source_type: str) -> str:
    if source_type not in FLOAT_TYPES:
        raise ValueError(f"source type must be one of {', '.join(FLOAT_TYPES)} (no requantizing), got {source_type!r}")
    return source_type


def _layer(name: str, facts: ModelFacts) -> int:
    block = _block_of(name)
    if block is None or not 0 <= block < facts.n_layer:
        raise ValueError(
            f"{name}: cannot tell its layer (need a 'blk.N.' prefix with 0 <= N < n_layer={facts.n_layer})"
        )
    return block


def _choose(
    mix: Mixture, name: str, ne: tuple[int, ...], facts: ModelFacts, position: tuple[int, int] | None, imatrix: bool
) -> str:
    """The type of a tensor llama.cpp quantizes.  ``position``: ``(i, n)``, the tensor's index among the attn_v-like
    (or, in a dense model, ffn_down) tensors in llama.cpp's walk and their number; ``None``: its block number and
    ``n_layer``."""
    cat = category(name)
    base = mix.base
    if position is None or (cat is Category.FFN_DOWN and facts.n_expert > 1):
        position = (_layer(name, facts), facts.n_layer) if cat in (Category.ATTN_V, Category.FFN_DOWN) else (0, 1)
    i, n = position
    if cat is Category.OUTPUT or (cat is Category.TOKEN_EMBD and facts.tied_output):
        chosen = "q8_0" if facts.is_falcon or ne[0] % gguf_type(base).block_size else mix.output
    elif cat is Category.ATTN_V:
        chosen = _first(mix.attn_v, i, n, facts) or base
        if facts.is_70b and chosen in ("q3_k", "q4_k"):
            chosen = "q5_k"
        if facts.n_expert == 8:
            chosen = "q8_0"
    elif cat is Category.ATTN_K:
        chosen = "q8_0" if facts.n_expert == 8 else base
    elif cat is Category.FFN_DOWN:
        rule = mix.ffn_down_falcon if facts.is_falcon and mix.ffn_down_falcon is not None else mix.ffn_down
        chosen = _first(rule + mix.ffn_down_imatrix if imatrix else rule, i, n, facts) or base
    elif cat is Category.ATTN_OUTPUT:
        if facts.n_expert == 8 and not facts.is_falcon:
            chosen = mix.attn_output_8_experts or base
        else:
            chosen = _first(mix.attn_output_falcon if facts.is_falcon else mix.attn_output, i, n, facts) or base
    else:  # untied token_embd, attn_q, ffn_gate / ffn_up (only the iq mixtures move them), everything else
        chosen = base
    return _fallback(chosen, ne[0])


def tensor_type(
    mixture_name: str | Mixture,
    name: str,
    shape: Sequence[int],
    facts: ModelFacts,
    *,
    source_type: str = "f32",
    imatrix: bool = False,
) -> str:
    """The GGUF type llama.cpp's ``mixture_name`` file type stores tensor ``name`` in (lower-case, as in
    :mod:`signround.quant.gguf`, or ``"f32"`` / ``"f16"`` / ``"bf16"``).

    ``shape``: llama.cpp order (``ne[0]`` is the row length: an ``nn.Linear(in, out)`` weight is ``[in, out]``,
    experts ``[in, out, n_expert]``); ``source_type``: the tensor's type in the input file, which tensors llama.cpp
    does not quantize keep; ``imatrix``: whether the quantization uses an importance matrix.  The tensor's layer is
    read from its ``blk.N.`` prefix (see :func:`plan_types` for a whole model, which counts like llama.cpp).
    """
    mix = mixture(mixture_name)
    ne = _ne(shape)
    _check_source(source_type)
    if not is_quantized(name, ne):
        return source_type
    return _choose(mix, name, ne, facts, None, imatrix)


def _loader_order(name: str) -> tuple[int, str]:
    """llama.cpp walks tensors by block number (non-block tensors, -1, first), then by name."""
    block = _block_of(name)
    return (-1 if block is None else block, name)


def plan_types(
    mixture_name: str | Mixture,
    tensors: Mapping[str, Sequence[int]],
    facts: ModelFacts,
    *,
    source_types: Mapping[str, str] | str = "f32",
    imatrix: bool = False,
) -> dict[str, str]:
    """Every tensor's type, as ``llama_model_quantize`` chooses them for a whole model: ``{name: type}`` in the order
    of ``tensors`` (``{name: shape}``, shapes in llama.cpp order).

    Layer positions are counted like llama.cpp: attn_v-like tensors by their index in its walk (and their number,
    for "last eighth"), dense ffn_down tensors by theirs, MoE ffn_down by the block number in the name.
    ``facts.tied_output`` is ignored: as in llama.cpp, the embeddings count as tied exactly when ``tensors`` has no
    ``output.weight``.  ``source_types``: each tensor's input type (a mapping, ``"f32"`` for names it lacks, or one
    type for all).
    """
    mix = mixture(mixture_name)
    facts = replace(facts, tied_output="output.weight" not in tensors)
    shapes = {name: _ne(shape) for name, shape in tensors.items()}
    sources = {
        name: _check_source(source_types if isinstance(source_types, str) else source_types.get(name, "f32"))
        for name in shapes
    }
    # llama.cpp counts attn_v-like tensors among all names, dense ffn_down ones per block
    counts = {
        Category.ATTN_V: sum(category(name) is Category.ATTN_V for name in shapes),
        Category.FFN_DOWN: facts.n_layer,
    }
    seen = dict.fromkeys(counts, 0)
    chosen: dict[str, str] = {}
    for name in sorted(shapes, key=_loader_order):
        ne = shapes[name]
        if not is_quantized(name, ne):
            chosen[name] = sources[name]
            continue
        cat = category(name)
        position = None
        if cat in seen:
            position = (seen[cat], counts[cat])
            seen[cat] += 1
        chosen[name] = _choose(mix, name, ne, facts, position, imatrix)
    return {name: chosen[name] for name in tensors}


def tensor_nbytes(type_name: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of ``shape`` (llama.cpp order) stored in ``type_name`` (without the file's alignment)."""
    ne = _ne(shape)
    rows = 1
    for d in ne[1:]:
        rows *= d
    if type_name in FLOAT_TYPES:
        return ne[0] * rows * FLOAT_TYPES[type_name]
    t = gguf_type(type_name)
    if ne[0] % t.block_size:
        raise ValueError(f"{type_name} stores rows in blocks of {t.block_size}; a row of {ne[0]} does not fit")
    return ne[0] // t.block_size * t.type_size * rows
