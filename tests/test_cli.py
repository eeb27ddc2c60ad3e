"""The ``signround`` command, run in-process through ``signround.cli.main``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from signround.cli import _config_kwargs, _quantize_parser, main
from signround.config import RECIPES


def _kwargs(*argv: str) -> dict:
    """The config kwargs of a command line, without low_cpu_mem_usage (on unless disabled, tested below)."""
    kwargs = _config_kwargs(_quantize_parser().parse_args(["--model", "m", *argv]))
    assert kwargs.pop("low_cpu_mem_usage") is ("--disable_low_cpu_mem_usage" not in argv)
    return kwargs


def test_low_cpu_mem_usage_is_on_unless_disabled_as_in_the_reference_cli() -> None:
    parse = _quantize_parser().parse_args
    assert _config_kwargs(parse(["--model", "m"]))["low_cpu_mem_usage"] is True
    assert _config_kwargs(parse(["--model", "m", "--low_cpu_mem_usage"]))["low_cpu_mem_usage"] is True
    assert _config_kwargs(parse(["--model", "m", "--disable_low_cpu_mem_usage"]))["low_cpu_mem_usage"] is False


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


def test_norm_tuning_is_on_unless_disabled() -> None:
    from signround.config import AutoRoundConfig

    assert "enable_norm_bias_tuning" not in _kwargs()
    assert AutoRoundConfig(bits=4).enable_norm_bias_tuning is True
    assert _kwargs("--disable_norm_bias_tuning") == {"enable_norm_bias_tuning": False}
    assert _kwargs("--enable_norm_bias_tuning") == {"enable_norm_bias_tuning": True}
    with pytest.raises(ValueError, match="enable_norm_bias_tuning must be True or False"):
        AutoRoundConfig(bits=4, enable_norm_bias_tuning="yes")


def test_quantized_inputs_are_on_unless_disabled() -> None:
    from signround.config import AutoRoundConfig

    assert "enable_quanted_input" not in _kwargs()
    assert AutoRoundConfig(bits=4).enable_quanted_input is True
    assert _kwargs("--disable_quanted_input") == {"enable_quanted_input": False}
    with pytest.raises(ValueError, match="enable_quanted_input must be True or False"):
        AutoRoundConfig(bits=4, enable_quanted_input="no")


def test_minmax_tuning_is_automatic_unless_given() -> None:
    from signround.config import AutoRoundConfig

    assert "enable_minmax_tuning" not in _kwargs()
    assert AutoRoundConfig(bits=4).enable_minmax_tuning is None
    assert _kwargs("--disable_minmax_tuning") == {"enable_minmax_tuning": False}
    assert _kwargs("--enable_minmax_tuning") == {"enable_minmax_tuning": True}
    with pytest.raises(ValueError, match=r"enable_minmax_tuning must be None \(automatic\), True or False"):
        AutoRoundConfig(bits=4, enable_minmax_tuning=1)


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


def _run(argv: list[str]) -> int:
    """``main`` in-process, as the console script would exit (argparse exits through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)


def _error_line(capsys) -> str:
    """The one line a user error prints; nothing else on stderr, no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("signround: error: ")
    return lines[0]


# Each is refused before the model is loaded: exit status 2, one line naming the bad value.
USER_ERRORS = [
    (["--bits", "5"], ["bits=5", "[2, 3, 4, 8]"]),
    (["--scheme", "W5A16"], ["'W5A16'", "W4A16"]),
    (["--nsamples", "0"], ["nsamples", "got 0"]),
    (["--format", "gguf"], ["'gguf'", "auto_round"]),
    (["--dataset", "{missing}"], ["does not exist", "nope.txt"]),
    (["--layer_config", '{"x": {"bitz": 8}}'], ["bitz", "'bits'"]),
    (["--layer_config", "{bad json"], ["--layer_config", "not valid JSON"]),
    (["--layer_config", "[1, 2]"], ["--layer_config", "JSON object"]),
    (["--moe_expert_names", "w1"], ["moe_expert_names='w1'", "gate_up_down"]),
    (["--ignore_layers", "lm_head", "--layer_config", '{"k_proj": 3}'], ["got 3", "scheme name"]),
    (["--bits", "five"], ["--bits", "'five'"]),
    (["--eval_ppl", "{missing}"], ["--eval_ppl", "nope.txt"]),
]


@pytest.mark.parametrize(("flags", "fragments"), USER_ERRORS, ids=lambda v: " ".join(v)[:40])
def test_user_errors_are_one_line_and_exit_2(tmp_path, stories_dir, capsys, monkeypatch, flags, fragments) -> None:
    monkeypatch.delenv("SIGNROUND_DEBUG", raising=False)
    import signround.api

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(signround.api, "_load_model", no_loading)
    flags = [f.replace("{missing}", str(tmp_path / "nope.txt")) for f in flags]
    out = tmp_path / "out"
    assert _run(["--model", str(stories_dir), *flags, "--output_dir", str(out)]) == 2
    line = _error_line(capsys)
    for fragment in fragments:
        assert fragment in line
    assert not out.exists()


def test_missing_model_directory_is_one_line(tmp_path, capsys) -> None:
    assert _run(["--model", str(tmp_path / "no_model"), "--output_dir", str(tmp_path / "out")]) == 2
    assert "no_model" in _error_line(capsys)
    assert _run(["--model", __file__, "--output_dir", str(tmp_path / "out")]) == 2
    assert "is a file" in _error_line(capsys)


def test_unwritable_output_dir_is_one_line(tmp_path, stories_dir, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert _run(["--model", str(stories_dir), "--output_dir", str(blocker / "out")]) == 2
    assert "not a directory" in _error_line(capsys)


def test_argparse_errors_are_one_line_too(capsys) -> None:
    assert _run(["--bits", "4"]) == 2  # no --model
    assert "--model" in _error_line(capsys)
    assert _run(["list", "nothing"]) == 2
    line = _error_line(capsys)
    assert "'nothing'" in line and "signround list --help" in line


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp_path, stories_dir, capsys, monkeypatch, how) -> None:
    argv = ["--model", str(stories_dir), "--bits", "5", "--output_dir", str(tmp_path / "out")]
    if how == "flag":
        argv.insert(0, "--debug")  # accepted anywhere, also before the subcommand's own flags
    else:
        monkeypatch.setenv("SIGNROUND_DEBUG", "1")
    assert _run(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ValueError: bits=5" in err
    assert err.splitlines()[-1] == "signround: error: bits=5 is not supported; accepted: [2, 3, 4, 8]"


def test_debug_flag_is_accepted_by_subcommands(capsys) -> None:
    assert main(["list", "schemes", "--debug"]) == 0
    assert "W4A16" in capsys.readouterr().out


def test_internal_errors_keep_their_traceback_and_exit_1(capsys, monkeypatch) -> None:
    import signround.cli

    def broken(argv):
        raise RuntimeError("boom")

    monkeypatch.setattr(signround.cli, "quantize_main", broken)
    assert _run(["--model", "m"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.splitlines()[-1] == "signround: internal error: RuntimeError: boom"


def test_interrupt_exits_130(capsys, monkeypatch) -> None:
    import signround.cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(signround.cli, "quantize_main", interrupted)
    assert _run(["--model", "m"]) == 130
    assert capsys.readouterr().err == "signround: interrupted\n"


def test_console_script_bad_bits_is_one_line(tmp_path, stories_dir) -> None:
    """The installed ``signround`` command, in a real process."""
    script = Path(sys.executable).with_name("signround")
    if not script.exists():
        pytest.skip(f"console script not installed next to {sys.executable}")
    env = {k: v for k, v in os.environ.items() if k != "SIGNROUND_DEBUG"}
    argv = [str(script), "--model", str(stories_dir), "--bits", "5", "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["signround: error: bits=5 is not supported; accepted: [2, 3, 4, 8]"]
    assert proc.stdout == ""
    assert not (tmp_path / "out").exists()


# -- per-layer flags ---------------------------------------------------------------------------------------------
def test_layer_flags_reach_the_config() -> None:
    from signround import AutoRoundConfig

    kwargs = _kwargs(
        "--ignore_layers", "lm_head,mlp.down_proj", "--fp_layers", "k_proj", "--to_quant_block_names",
        "model.language_model.layers", "--quant_nontext_module", "--layer_config", '{"q_proj": "W8A16"}',
    )  # fmt: skip
    assert kwargs == {
        "ignore_layers": "lm_head,mlp.down_proj",
        "fp_layers": "k_proj",
        "to_quant_block_names": "model.language_model.layers",
        "quant_nontext_module": True,
        "layer_config": {"q_proj": "W8A16"},
    }
    cfg = AutoRoundConfig(**kwargs)
    assert cfg.ignore_layers == ["lm_head", "mlp.down_proj", "k_proj"]
    assert cfg.layer_config == {
        "q_proj": "W8A16",
        "lm_head": {"bits": 16},
        "mlp.down_proj": {"bits": 16},
        "k_proj": {"bits": 16},
    }
    assert (cfg.to_quant_block_names, cfg.quant_nontext_module) == (["model.language_model.layers"], True)
    assert "quant_nontext_module" not in _kwargs()  # store_true flags pass nothing unless given


def test_layer_config_key_matching_nothing_names_close_layers(tmp_path, stories_dir, capsys) -> None:
    argv = ["--model", str(stories_dir), "--iters", "0", "--disable_opt_rtn", "--group_size", "32"]
    assert _run([*argv, "--ignore_layers", "self_attn.k_prj", "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.splitlines()[-1]  # after the model-loading progress bar
    assert line.startswith("signround: error: layer_config key 'self_attn.k_prj' matches no layer")
    assert "self_attn.k_proj" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], {"enable_minmax_tuning": False, "enable_norm_bias_tuning": True}),  # what the default tuning did
        (["--enable_minmax_tuning"], {"enable_norm_bias_tuning": True}),  # True is the reference's default: left out
        (["--disable_opt_rtn"], {"enable_norm_bias_tuning": True}),  # a plain start: its clipping is tuned
        (["--iters", "0"], {}),  # nothing tuned: neither key
        (
            ["--disable_quanted_input"],  # not the reference's default: written
            {"enable_minmax_tuning": False, "enable_norm_bias_tuning": True, "enable_quanted_input": False},
        ),
    ],
)
def test_the_checkpoint_records_what_the_tuning_moved(tmp_path, stories_dir, shakespeare, flags, expected) -> None:
    """The reference reads an absent ``enable_minmax_tuning`` as True: a run that kept the clipping must say so."""
    out = tmp_path / "out"
    argv = ["--model", str(stories_dir), "--scheme", "W4A16", "--group_size", "32", "--iters", "2", "--nsamples", "4"]
    argv += ["--seqlen", "32"]
    argv += ["--batch_size", "2", "--dataset", f"{shakespeare}:concat=True", "--output_dir", str(out), *flags]
    assert main(argv) == 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    keys = ("enable_minmax_tuning", "enable_norm_bias_tuning", "enable_quanted_input")
    recorded = {k: qc[k] for k in keys if k in qc}
    assert recorded == expected
