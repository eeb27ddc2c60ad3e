"""Per-layer control: layer_config key matching and precedence, ignore_layers / fp_layers, unmatched keys."""

from __future__ import annotations

import json

import pytest

from signround import AutoRoundConfig
from signround.schemes import LayerSpec, key_matches, layer_override, resolve_plan

DEFAULT = LayerSpec(bits=4, group_size=32)
NAMES = [
    f"model.layers.{i}.{part}"
    for i in range(3)
    for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")
]
CANDIDATES = [(name, 64, 64) for name in NAMES]


def _plan(layer_config, **kwargs):
    return resolve_plan(CANDIDATES, DEFAULT, layer_config, **kwargs)


def _bits(plan) -> dict[str, int]:
    return {name: plan.layers[name].bits if name in plan.layers else 16 for name in NAMES}


# -- matching ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "matched"),
    [
        ("model.layers.1.mlp.up_proj", ["model.layers.1.mlp.up_proj"]),  # exact
        ("k_proj", [f"model.layers.{i}.self_attn.k_proj" for i in range(3)]),  # fragment (substring)
        ("layers.2.mlp", ["model.layers.2.mlp.up_proj", "model.layers.2.mlp.down_proj"]),
        ("*.self_attn.k_proj", [f"model.layers.{i}.self_attn.k_proj" for i in range(3)]),  # shell wildcard
        ("model.layers.*v_proj", [f"model.layers.{i}.self_attn.v_proj" for i in range(3)]),  # the user guide's form
        (r"layers\.[01]\.mlp\.down", ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]),  # regex
        ("(q|v)_proj$", [n for n in NAMES if n.endswith(("q_proj", "v_proj"))]),
        ("gate_proj", []),
    ],
)
def test_key_matching(key: str, matched: list[str]) -> None:
    assert [name for name in NAMES if key_matches(key, name)] == matched


def test_fragment_is_a_substring_like_the_reference() -> None:
    # "layers.1" is searched, so it is also found in "layers.10"; "layers.1." is the way to say layer 1 only
    assert key_matches("layers.1", "model.layers.10.mlp.up_proj")
    assert not key_matches("layers.1.", "model.layers.10.mlp.up_proj")


# -- values ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [16, "BF16", "bf16", {"bits": 16}])
def test_16_bit_values_keep_the_layer(value) -> None:
    assert layer_override(value) == {"bits": 16}
    plan = _plan({"down_proj": value})
    assert not any(name.endswith("down_proj") for name in plan.layers)
    assert plan.skipped == []  # kept on request, not reported as refused ...
    assert plan.kept == [n for n in NAMES if n.endswith("down_proj")]  # ... but listed, for extra_config
    assert AutoRoundConfig(layer_config={"down_proj": value}).layer_config == {"down_proj": value}


@pytest.mark.parametrize("value", [8, True, 16.0, ["W8A16"]])
def test_other_non_dict_values_are_refused(value) -> None:
    with pytest.raises(ValueError, match=r"scheme name .* 16 \(keep unquantized\) or a dict"):
        AutoRoundConfig(layer_config={"down_proj": value})


# -- precedence -----------------------------------------------------------------------------------------------------
def test_exact_name_beats_patterns_in_any_order() -> None:
    plan = _plan({"self_attn": {"bits": 2}, "model.layers.0.self_attn.q_proj": {"bits": 8}, "q_proj": {"bits": 3}})
    assert plan.layers["model.layers.0.self_attn.q_proj"] == LayerSpec(bits=8, group_size=32)
    assert plan.layers["model.layers.1.self_attn.q_proj"].bits == 2  # "self_attn" comes before "q_proj"


def test_first_matching_pattern_in_dict_order_wins() -> None:
    bits = _bits(_plan({"mlp": {"bits": 8}, "down_proj": {"bits": 2}}))
    assert bits["model.layers.0.mlp.down_proj"] == 8
    bits = _bits(_plan({"down_proj": {"bits": 2}, "mlp": {"bits": 8}}))
    assert bits["model.layers.0.mlp.down_proj"] == 2 and bits["model.layers.0.mlp.up_proj"] == 8
    assert bits["model.layers.0.self_attn.q_proj"] == 4  # unmatched: the default


def test_every_candidate_is_quantized_skipped_or_kept() -> None:
    candidates = [*CANDIDATES, ("model.layers.0.mlp.odd_proj", 48, 64)]  # 48 inputs: no group of 32 fits
    plan = resolve_plan(candidates, DEFAULT, {"k_proj": 16, "model.layers.1.mlp.up_proj": "BF16"})
    assert [s.name for s in plan.skipped] == ["model.layers.0.mlp.odd_proj"]
    assert plan.kept == [*(n for n in NAMES if n.endswith("k_proj") or n == "model.layers.1.mlp.up_proj")]
    assert sorted([*plan.layers, *plan.kept, *(s.name for s in plan.skipped)]) == sorted(n for n, *_ in candidates)
    # a 16-bit default (scheme BF16) keeps every layer not listed
    plan = resolve_plan(CANDIDATES, None, {"q_proj": {"bits": 4, "group_size": 32}})
    assert len(plan.layers) == 3 and len(plan.kept) == len(NAMES) - 3


def test_an_exact_key_is_not_also_a_pattern() -> None:
    candidates = [("blk.1.q_proj", 64, 64), ("vision.blk.1.q_proj", 64, 64)]
    plan = resolve_plan(candidates, DEFAULT, {"blk.1.q_proj": {"bits": 8}})
    assert plan.layers["blk.1.q_proj"].bits == 8 and plan.layers["vision.blk.1.q_proj"].bits == 4
    # ... but a key naming no candidate exactly is searched in every name (a checkpoint's key for an absent layer)
    plan = resolve_plan(candidates[1:], DEFAULT, {"blk.1.q_proj": {"bits": 8}})
    assert plan.layers["vision.blk.1.q_proj"].bits == 8


# -- unmatched keys -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "close"),
    [
        ("model.layers.1.self_attn.k_prj", "model.layers.1.self_attn.k_proj"),
        ("k_prj", "k_proj"),
        ("mlp.gate_proj", "mlp.up_proj"),
    ],
)
def test_unmatched_key_is_an_error_listing_close_names(key: str, close: str) -> None:
    with pytest.raises(ValueError) as info:
        _plan({key: {"bits": 8}}, strict_keys=True)
    message = str(info.value)
    assert f"layer_config key {key!r} matches no layer" in message
    assert "closest: [" in message and f"'{close}'" in message


def test_unmatched_key_without_close_names_shows_what_names_look_like() -> None:
    with pytest.raises(ValueError, match=r"'zzz' matches no layer .*layers look like \['model\.layers\.0\.self_attn"):
        _plan({"zzz": 16}, strict_keys=True)


def test_a_key_that_matches_but_loses_precedence_is_not_unmatched() -> None:
    plan = _plan({"mlp": {"bits": 8}, "down_proj": {"bits": 2}}, strict_keys=True)
    assert plan.layers["model.layers.2.mlp.down_proj"].bits == 8


def test_loading_tolerates_keys_that_match_nothing() -> None:
    # a checkpoint's extra_config may name layers this model lacks (an untied lm_head, another tool's regex)
    stored = {"lm_head": {"bits": 16}, r".*mlp\.down_proj": {"bits": 8}, "model.layers.9.mlp.up_proj": {"bits": 2}}
    bits = _bits(resolve_plan(CANDIDATES, DEFAULT, stored))
    assert bits["model.layers.0.mlp.down_proj"] == 8 and bits["model.layers.0.mlp.up_proj"] == 4
    assert _bits(resolve_plan(CANDIDATES, DEFAULT, stored, strict_keys=False)) == bits


def test_other_layers_may_be_kept_but_not_quantized_by_a_key() -> None:
    kept = {"lm_head": "lm_head (quant_lm_head=False)"}
    plan = _plan({"lm_head": 16, "k_proj": "BF16"}, strict_keys=True, other_layers=kept)
    assert "lm_head" not in plan.layers
    assert _plan({"lm_head": {"bits": 16}}, strict_keys=True, other_layers=["lm_head"]).skipped == []
    with pytest.raises(ValueError, match=r"not quantization candidates \(lm_head: lm_head \(quant_lm_head=False\)\)"):
        _plan({"lm_head": "W8A16"}, strict_keys=True, other_layers=kept)


# -- ignore_layers / fp_layers ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"ignore_layers": "down_proj, k_proj"},
        {"ignore_layers": ["down_proj", "k_proj"]},
        {"fp_layers": "down_proj,k_proj"},
        {"ignore_layers": "down_proj", "fp_layers": ["k_proj"]},
    ],
)
def test_ignore_layers_keep_their_layers_in_16_bit(kwargs) -> None:
    cfg = AutoRoundConfig(**kwargs)
    assert cfg.ignore_layers == ["down_proj", "k_proj"]
    bits = _bits(_plan(cfg.layer_config, strict_keys=True))
    assert {name for name, b in bits.items() if b == 16} == {n for n in NAMES if n.endswith(("down_proj", "k_proj"))}


def test_layer_config_wins_over_ignore_layers() -> None:
    cfg = AutoRoundConfig(
        layer_config={"k_proj": {"bits": 8}, "model.layers.0.mlp.up_proj": {"bits": 2}},
        ignore_layers="k_proj,mlp,model.layers.1.self_attn.k_proj",
    )
    # the same key: layer_config's value; ignore entries come after layer_config's own
    assert list(cfg.layer_config) == ["k_proj", "model.layers.0.mlp.up_proj", "mlp", "model.layers.1.self_attn.k_proj"]
    assert cfg.layer_config["k_proj"] == {"bits": 8}
    bits = _bits(_plan(cfg.layer_config, strict_keys=True))
    assert bits["model.layers.0.self_attn.k_proj"] == 8
    assert bits["model.layers.0.mlp.up_proj"] == 2  # exact layer_config name beats the "mlp" ignore pattern
    assert bits["model.layers.1.mlp.up_proj"] == 16
    assert bits["model.layers.1.self_attn.k_proj"] == 16  # an exact ignore name beats the "k_proj" pattern


@pytest.mark.parametrize(
    ("kwargs", "fragments"),
    [
        ({"ignore_layers": 3}, ["ignore_layers", "comma-separated", "3"]),
        ({"fp_layers": ["a", None]}, ["fp_layers", "list of strings"]),
        ({"to_quant_block_names": {"a": 1}}, ["to_quant_block_names", "comma-separated"]),
        ({"quant_nontext_module": "yes"}, ["quant_nontext_module", "True or False", "'yes'"]),
        ({"layer_config": [("k_proj", 8)]}, ["layer_config must be a dict", "list"]),
        ({"layer_config": {" ": 16}}, ["layer_config keys", "' '"]),
    ],
)
def test_bad_per_layer_values_name_value_and_accepted(kwargs, fragments) -> None:
    with pytest.raises(ValueError) as info:
        AutoRoundConfig(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value)


# -- block lists, non-text modules, serialisation ----------------------------------------------------------------------
def test_to_quant_block_names_and_quant_nontext_module_are_stored() -> None:
    cfg = AutoRoundConfig()
    assert (cfg.to_quant_block_names, cfg.quant_nontext_module, cfg.ignore_layers) == (None, False, [])
    assert not {"to_quant_block_names", "quant_nontext_module", "ignore_layers"} & set(cfg.to_dict())
    cfg = AutoRoundConfig(to_quant_block_names="model.language_model.layers, model.visual.blocks")
    assert cfg.to_quant_block_names == ["model.language_model.layers", "model.visual.blocks"]
    assert AutoRoundConfig(to_quant_block_names=["model.layers"]).to_quant_block_names == ["model.layers"]
    assert AutoRoundConfig(to_quant_block_names="").to_quant_block_names is None


def test_per_layer_keys_round_trip_through_json() -> None:
    cfg = AutoRoundConfig(
        ignore_layers=["lm_head", "k_proj"], to_quant_block_names="model.layers", quant_nontext_module=True
    )
    d = json.loads(json.dumps(cfg.to_dict()))
    assert (d["ignore_layers"], d["to_quant_block_names"], d["quant_nontext_module"]) == (
        "lm_head,k_proj",
        ["model.layers"],
        True,
    )
    again = AutoRoundConfig.from_dict(d)
    assert (again.ignore_layers, again.to_quant_block_names, again.quant_nontext_module) == (
        ["lm_head", "k_proj"],
        ["model.layers"],
        True,
    )
