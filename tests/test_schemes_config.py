"""Scheme presets, AutoRoundConfig validation and (de)serialisation, and resolve_plan."""

from __future__ import annotations

import json
import logging

import pytest

from signround import AutoRoundConfig
from signround.config import QUANT_METHOD
from signround.packing import get_packer
from signround.schemes import SCHEMES, LayerSpec, layer_override, resolve_plan, scheme_fields


@pytest.fixture
def calib(shakespeare) -> str:
    return str(shakespeare)


def _config(calib: str, **kwargs) -> AutoRoundConfig:
    kwargs.setdefault("dataset", calib)
    return AutoRoundConfig(**kwargs)


# -- validation: every error names the bad value and what is accepted ----------------------------------------------
LAYER = "model.layers.0.self_attn.q_proj"
BAD_VALUES = [
    # (kwargs, error type, fragments the message must contain: the bad value, then the accepted values)
    ({"scheme": "W5A16"}, ValueError, ["'W5A16'", "W4A16", "W2A16G32", "BF16"]),
    ({"scheme": 3}, ValueError, ["3", "W4A16"]),
    ({"bits": 5}, ValueError, ["bits=5", "[2, 3, 4, 8]"]),
    ({"group_size": 0}, ValueError, ["group_size=0", "positive integer", "-1"]),
    ({"group_size": -2}, ValueError, ["group_size=-2", "positive integer", "-1"]),
    ({"group_size": "a"}, ValueError, ["group_size='a'", "positive integer", "-1"]),
    ({"sym": "yes"}, ValueError, ["'yes'", "True or False"]),
    ({"iters": -1}, ValueError, ["iters", "-1", ">= 0"]),
    ({"iters": 2.5}, ValueError, ["iters", "2.5", ">= 0"]),
    ({"lr": 0}, ValueError, ["lr", "got 0", "positive"]),
    ({"lr": -1e-3}, ValueError, ["lr", "-0.001", "positive"]),
    ({"minmax_lr": 0.0}, ValueError, ["minmax_lr", "0.0", "positive"]),
    ({"nsamples": 0}, ValueError, ["nsamples", "got 0", ">= 1"]),
    ({"seqlen": 0}, ValueError, ["seqlen", "got 0", ">= 1"]),
    ({"batch_size": 1.5}, ValueError, ["batch_size", "1.5", ">= 1"]),
    ({"layer_config": {LAYER: 3}}, ValueError, ["got 3", "scheme name", "bits", "group_size"]),
    ({"layer_config": {LAYER: {"bitz": 8}}}, ValueError, ["bitz", "'bits'", "'group_size'"]),
    ({"layer_config": {LAYER: {"bits": 5}}}, ValueError, ["bits=5", "[2, 3, 4, 8]"]),
    ({"layer_config": {LAYER: {"bits": "8"}}}, ValueError, ["bits='8'", "[2, 3, 4, 8]"]),
    ({"layer_config": {LAYER: {"sym": "no"}}}, ValueError, ["sym='no'", "True or False"]),
    ({"layer_config": {LAYER: {"group_size": 0}}}, ValueError, ["group_size=0", "-1"]),
    ({"layer_config": {LAYER: "W9A16"}}, ValueError, ["'W9A16'", "W4A16"]),
    ({"format": "gguf"}, ValueError, ["'gguf'", "auto_round"]),
    ({"format": "auto_round,gguf"}, ValueError, ["'gguf'", "auto_round"]),
    ({"backend": "machete"}, ValueError, ["'machete'", "'auto'", "'torch'", "'marlin'"]),
    ({"data_type": "fp8"}, ValueError, ["'fp8'", "'int'"]),
    ({"act_bits": 8}, ValueError, ["act_bits=8", "16"]),
]


@pytest.mark.parametrize(("kwargs", "error", "fragments"), BAD_VALUES, ids=lambda v: repr(v)[:40])
def test_invalid_values_name_value_and_accepted(calib: str, kwargs, error, fragments) -> None:
    with pytest.raises(error) as info:
        _config(calib, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} missing from {message!r}"


def test_missing_dataset_file_is_named(tmp_path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        AutoRoundConfig(dataset=f"{missing}:concat=True")
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):  # second entry of a list spec
        AutoRoundConfig(dataset=f"{tmp_path},{missing}")


@pytest.mark.parametrize(
    ("suffix", "fragments"),
    [
        (":bogus=1", ["bogus=1", "num=", "concat="]),
        (":num=abc", ["num=abc", "positive integer"]),
        (":num=0", ["num=0", "positive integer"]),
        (":concat=maybe", ["concat=maybe", "True or False"]),
        (",,", ["empty dataset name"]),
    ],
)
def test_malformed_dataset_spec(calib: str, suffix: str, fragments: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        AutoRoundConfig(dataset=calib + suffix)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_valid_dataset_specs_accepted(calib: str) -> None:
    assert AutoRoundConfig(dataset=f"{calib}:concat=True:num=4").dataset.endswith("num=4")
    assert AutoRoundConfig(dataset=["a text", "another"]).dataset == ["a text", "another"]


# -- schemes -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(SCHEMES))
def test_scheme_presets(calib: str, name: str) -> None:
    cfg = _config(calib, scheme=name.lower())  # case-insensitive
    fields = SCHEMES[name]
    assert cfg.scheme == name
    if fields is None:
        assert cfg.bits == 16 and cfg.default_spec() is None
    else:
        assert (cfg.bits, cfg.group_size, cfg.sym) == (fields["bits"], fields["group_size"], fields["sym"])
        assert cfg.default_spec() == LayerSpec(**fields)


def test_explicit_values_override_the_scheme(calib: str) -> None:
    cfg = _config(calib, scheme="W2A16", group_size=32)
    assert (cfg.bits, cfg.group_size, cfg.sym) == (2, 32, True)
    cfg = _config(calib, scheme="W4A16", bits=3, sym=False, group_size=-1)
    assert cfg.default_spec() == LayerSpec(bits=3, group_size=-1, sym=False)
    cfg = _config(calib, scheme="W2A16G64")
    assert (cfg.bits, cfg.group_size) == (2, 64)


def test_scheme_fields_returns_a_copy() -> None:
    fields = scheme_fields("W4A16")
    assert fields is not None
    fields["bits"] = 2
    assert SCHEMES["W4A16"]["bits"] == 4


def test_layer_override_forms() -> None:
    assert layer_override("W8A16") == {"bits": 8, "group_size": 128, "sym": True}
    assert layer_override("BF16") == {"bits": 16}
    assert layer_override({"bits": 16}) == {"bits": 16}
    assert layer_override(16) == {"bits": 16}  # the reference's shorthand for "keep in 16 bit"


# -- serialisation -------------------------------------------------------------------------------------------------
def test_to_dict_is_json_with_reference_keys(calib: str) -> None:
    cfg = _config(calib, bits=3, group_size=64, sym=False, iters=7, lr=0.01, layer_config={LAYER: {"bits": 8}})
    d = cfg.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["quant_method"] == QUANT_METHOD == "auto-round"
    assert (d["bits"], d["group_size"], d["sym"], d["data_type"]) == (3, 64, False, "int")
    assert (d["iters"], d["lr"], d["dataset"]) == (7, 0.01, calib)
    # a list dataset is summarised, not dumped
    d = AutoRoundConfig(dataset=["x", "y", "z"]).to_dict()
    assert json.dumps(d) and d["dataset"] == "<list of 3 samples>"


def test_unknown_keys_are_kept(calib: str) -> None:
    cfg = _config(calib, some_future_key={"nested": [1, 2]}, quant_method="auto-round")
    assert cfg.to_dict()["some_future_key"] == {"nested": [1, 2]}


def test_from_dict_round_trip_keeps_checkpoint_verbatim() -> None:
    packer = get_packer("auto_round").resolve(LayerSpec(bits=4, group_size=32))
    body = packer.quantization_config(
        LayerSpec(bits=4, group_size=32),
        {"model.layers.0.mlp.down_proj": {"bits": 16}, "model.layers.1.self_attn.q_proj": {"bits": 8}},
        {"iters": 20, "nsamples": 16, "block_name_to_quantize": "model.layers"},
    )
    body["vendor_key"] = {"keep": ["me", 1]}
    body["autoround_version"] = "0.16.1"
    cfg = AutoRoundConfig.from_dict(json.loads(json.dumps(body)))
    assert cfg.to_dict() == body
    assert list(cfg.to_dict()) == list(body)  # key order too
    assert (cfg.bits, cfg.group_size, cfg.sym, cfg.packing_format) == (4, 32, True, "auto_round:auto_gptq")
    assert cfg.extra_config["model.layers.0.mlp.down_proj"]["bits"] == 16
    assert cfg.unknown_keys["vendor_key"] == {"keep": ["me", 1]}
    again, unused = AutoRoundConfig.from_dict(cfg.to_dict(), return_unused_kwargs=True)
    assert again.to_dict() == body and unused == {}
    # a checkpoint config does not need its calibration file to exist
    body["dataset"] = "/nowhere/calib.txt"
    assert AutoRoundConfig.from_dict(body).to_dict()["dataset"] == "/nowhere/calib.txt"


def test_from_dict_rejects_other_methods() -> None:
    with pytest.raises(ValueError, match=r"quant_method='gptq'.*'auto-round'"):
        AutoRoundConfig.from_dict({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True})


def test_loading_attributes_are_only_the_backend(calib: str) -> None:
    assert _config(calib, backend="torch").get_loading_attributes() == {"backend": "torch"}


# -- resolve_plan --------------------------------------------------------------------------------------------------
CANDIDATES = [
    ("blk.0.q_proj", 64, 64),
    ("blk.0.k_proj", 64, 32),
    ("blk.0.v_proj", 64, 32),
    ("blk.0.up_proj", 64, 172),
    ("blk.0.down_proj", 172, 64),
    ("blk.1.q_proj", 64, 64),
    ("blk.1.k_proj", 64, 32),
]
DEFAULT = LayerSpec(bits=4, group_size=32)


def test_resolve_plan_default_and_shape_skips() -> None:
    plan = resolve_plan(CANDIDATES, DEFAULT)
    assert set(plan.layers) == {n for n, *_ in CANDIDATES} - {"blk.0.down_proj"}
    assert all(spec == DEFAULT for spec in plan.layers.values())
    assert [(s.name, s.reason) for s in plan.skipped] == [
        ("blk.0.down_proj", "in_features=172 not divisible by group_size=32")
    ]
    # the format's own shape check (auto_round packs 32 output columns per qzeros word)
    packer = get_packer("auto_round").resolve(DEFAULT)
    plan = resolve_plan(CANDIDATES, DEFAULT, can_hold=packer.can_hold)
    skipped = {s.name: s.reason for s in plan.skipped}
    assert set(skipped) == {"blk.0.up_proj", "blk.0.down_proj"}
    assert "out_features=172" in skipped["blk.0.up_proj"]
    assert "172" in skipped["blk.0.down_proj"]
    assert "blk.0.up_proj" not in plan.layers


def test_resolve_plan_layer_config_exact_16bit_and_patterns() -> None:
    layer_config = {
        "*k_proj": {"bits": 2},  # shell pattern
        r"blk\.1\..*": "W8A16",  # regex (group 128 cannot hold 64 inputs -> skipped with reason)
        "blk.0.q_proj": {"bits": 3, "sym": False},  # exact name beats patterns
        "blk.0.v_proj": {"bits": 16},  # kept unquantized: absent, and not reported as skipped
    }
    plan = resolve_plan(CANDIDATES, DEFAULT, layer_config)
    assert plan.layers["blk.0.q_proj"] == LayerSpec(bits=3, group_size=32, sym=False)
    assert plan.layers["blk.0.k_proj"] == LayerSpec(bits=2, group_size=32)
    assert "blk.0.v_proj" not in plan.layers
    assert "blk.0.v_proj" not in {s.name for s in plan.skipped}
    # first matching pattern in dict order wins: blk.1.k_proj matches "*k_proj" before the regex
    assert plan.layers["blk.1.k_proj"] == LayerSpec(bits=2, group_size=32)
    skipped = {s.name: s.reason for s in plan.skipped}
    assert skipped["blk.1.q_proj"] == "in_features=64 not divisible by group_size=128"
    assert plan.overrides() == {
        "blk.0.q_proj": {"bits": 3, "sym": False},
        "blk.0.k_proj": {"bits": 2},
        "blk.1.k_proj": {"bits": 2},
    }


def test_resolve_plan_without_default_quantizes_only_listed_layers() -> None:
    plan = resolve_plan(CANDIDATES, None, {"blk.0.q_proj": {"bits": 4, "group_size": 32}})
    assert list(plan.layers) == ["blk.0.q_proj"] and plan.skipped == []


def test_layer_spec_rejects_bad_fields() -> None:
    with pytest.raises(ValueError, match=r"bits=16 .*\[2, 3, 4, 8\]"):
        LayerSpec(bits=16)
    with pytest.raises(ValueError, match=r"sym=1 .*True or False"):
        LayerSpec(sym=1)  # type: ignore[arg-type]


def test_an_argument_the_config_does_not_use_is_named_in_a_warning(calib: str, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="signround.config"):
        cfg = _config(calib, iter=50)  # a typo of iters: kept, but it tunes nothing
    assert cfg.iters != 50
    assert "'iter'" in caplog.text and "did you mean 'iters'?" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="signround.config"):
        AutoRoundConfig.from_dict({**_config(calib).to_dict(), "vendor_key": 1})  # a checkpoint's extra key: silent
        _config(calib, iters=3)
    assert caplog.text == ""
