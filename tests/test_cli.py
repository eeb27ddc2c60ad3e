"""The ``signround`` command, run in-process through ``signround.cli.main``."""

from __future__ import annotations

import json

import pytest
import torch

from signround.cli import _config_kwargs, _quantize_parser, main
from signround.config import RECIPES


def _kwargs(*argv: str) -> dict:
    return _config_kwargs(_quantize_parser().parse_args(["--model", "m", *argv]))


def test_recipe_light_sets_reference_values() -> None:
    kwargs = _kwargs("--recipe", "light")
    assert kwargs == {"iters": 50, "lr": 5e-3, "nsamples": 128, "seqlen": 2048, "batch_size": 8}
    assert kwargs == RECIPES["light"]


def test_explicit_flags_override_the_recipe() -> None:
    kwargs = _kwargs("--recipe", "light", "--iters", "7", "--lr", "0.01", "--seqlen", "64", "--bs", "2")
    assert kwargs == {"iters": 7, "lr": 0.01, "nsamples": 128, "seqlen": 64, "batch_size": 2}
    kwargs = _kwargs("--recipe", "best", "--nsamples", "3")
    assert (kwargs["iters"], kwargs["nsamples"], kwargs["lr"]) == (1000, 3, None)


def test_flags_without_recipe_only_pass_what_was_given() -> None:
    assert _kwargs() == {}
    kwargs = _kwargs("--asym", "--group_size", "32", "--disable_opt_rtn", "--layer_config", '{"x": {"bits": 8}}')
    assert kwargs == {"sym": False, "group_size": 32, "disable_opt_rtn": True, "layer_config": {"x": {"bits": 8}}}
    assert _kwargs("--sym")["sym"] is True
    assert _kwargs("--iter", "3")["iters"] == 3  # the reference's spelling


def test_unknown_recipe_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        _quantize_parser().parse_args(["--model", "m", "--recipe", "fastest"])
    assert "light" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("what", "expected"), [("backends", "torch"), ("formats", "auto_round"), ("schemes", "W4A16"), ("recipes", "light")]
)
def test_list(capsys, what: str, expected: str) -> None:
    assert main(["list", what]) == 0
    assert expected in capsys.readouterr().out


def test_list_backends_says_what_runs_here_and_why_not(capsys, monkeypatch) -> None:
    from signround.kernels import registry

    monkeypatch.setattr(registry, "device_present", lambda device: device == "cpu")  # a CPU-only machine
    main(["list", "backends"])
    rows = {line.split("\t")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert rows["torch"].endswith("usable here on cpu")
    assert "priority=10" in rows["torch_int4"] and "usable here on cpu" in rows["torch_int4"]
    assert "Habana" in rows["hpu"] or "no hpu device here" in rows["hpu"]
    assert ("pip install" in rows["marlin"]) or rows["marlin"].endswith("no cuda device here")
    assert set(rows) >= {"exllamav2", "hpu", "ipex", "marlin", "torch", "torch_int4", "triton"}


def test_list_recipes_prints_their_values(capsys) -> None:
    main(["list", "recipes"])
    out = capsys.readouterr().out
    assert "'iters': 50" in out and "'lr': 0.005" in out


def test_quantize_rtn_to_disk_and_load_back(tmp_path, stories_dir) -> None:
    from transformers import AutoModelForCausalLM

    from signround.kernels.base import QuantLinear
    from signround.quant.int import dequantize, quantize
    from signround.schemes import LayerSpec

    out = tmp_path / "out"
    argv = ["--model", str(stories_dir), "--iters", "0", "--disable_opt_rtn", "--group_size", "32"]
    assert main([*argv, "--output_dir", str(out)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp dirs left behind
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["sym"], qc["iters"]) == ("auto-round", 4, 32, True, 0)
    assert (out / "tokenizer.json").is_file()

    fp = AutoModelForCausalLM.from_pretrained(stories_dir)
    q = AutoModelForCausalLM.from_pretrained(out)
    layer = q.model.layers[2].self_attn.v_proj
    assert isinstance(layer, QuantLinear)
    # plain RTN: what was saved dequantizes to exactly dequantize(quantize(fp weight))
    expected = dequantize(quantize(fp.model.layers[2].self_attn.v_proj.weight, LayerSpec(bits=4, group_size=32)))
    assert torch.equal(dequantize(layer.quantized_tensor()), expected)
    ids = torch.randint(0, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lq, lf = q(ids).logits, fp(ids).logits
    assert not torch.equal(lq, lf) and torch.isfinite(lq).all()
    assert (lq.argmax(-1) == lf.argmax(-1)).float().mean() > 0.5  # 4-bit attention: mostly the same predictions


def test_quantize_optimised_rtn_with_calibration(tmp_path, stories_dir, shakespeare) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    argv = ["--model", str(stories_dir), "--scheme", "W2A16G32", "--iters", "0", "--nsamples", "4", "--seqlen", "64"]
    argv += ["--dataset", f"{shakespeare}:concat=True", "--output_dir", str(out)]
    assert main(argv) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["nsamples"], qc["seqlen"]) == (2, 32, 4, 64)
    model = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 5, 9, 13]])).logits).all()


def test_quantize_refuses_bad_scheme_before_loading(tmp_path, stories_dir) -> None:
    with pytest.raises(ValueError, match=r"unknown scheme 'W5A16'; accepted: W4A16"):
        main(["--model", str(stories_dir), "--scheme", "W5A16", "--output_dir", str(tmp_path / "out")])
    assert list(tmp_path.iterdir()) == []
