"""End to end on the shared models: quantize in from_pretrained / the API / the CLI, save, reload, evaluate; bad input.

stories260K (hidden 64, 5 blocks) has 172-wide MLPs, which no group size of 32 divides and auto_round's packing
cannot hold: only its attention layers are quantized there.  The tiny random Llama of conftest.py covers a model
whose every block Linear is quantized.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import signround
from signround import AutoRoundConfig
from signround.cli import main as cli_main
from signround.kernels import get_backend
from signround.layers import quant_linears

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def _logits(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def _listing(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# -- from_pretrained(quantization_config=...) on stories260K ---------------------------------------------------------
@pytest.fixture(scope="module")
def tuned(tmp_path_factory, stories_dir, shakespeare):
    """stories260K tuned during from_pretrained (W4 g32 sym, 20 iters), saved with its tokenizer."""
    cfg = AutoRoundConfig(
        bits=4, group_size=32, sym=True, dataset=f"{shakespeare}:concat=True", iters=20, nsamples=16, seqlen=128
    )
    model = AutoModelForCausalLM.from_pretrained(stories_dir, quantization_config=cfg)
    out = tmp_path_factory.mktemp("tuned") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(stories_dir).save_pretrained(out)
    return model, out


def test_tuned_model_layers_and_reload(tuned, cpu_int4_backend) -> None:
    model, out = tuned
    cpu_default = get_backend(cpu_int4_backend).quant_linear
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for m in (model, reloaded):
        layers = quant_linears(m)
        assert len(layers) == 5 * 4  # every attention projection of the 5 blocks, nothing else
        assert all(isinstance(layer, cpu_default) for layer in layers.values())
        for i, block in enumerate(m.model.layers):
            assert all(isinstance(getattr(block.self_attn, n), cpu_default) for n in ATTN), i
            assert all(type(getattr(block.mlp, n)) is nn.Linear for n in MLP), i
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert set(saved) == set(loaded)
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert torch.equal(_logits(reloaded), _logits(model))


def test_tuned_checkpoint_config(tuned) -> None:
    _model, out = tuned
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "auto-round"
    assert qc["packing_format"] == "auto_round:auto_gptq"  # what the reference writes for sym int models
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["data_type"]) == (4, 32, True, "int")
    assert (qc["iters"], qc["nsamples"], qc["seqlen"]) == (20, 16, 128)
    sixteen = {f"model.layers.{i}.mlp.{n}" for i in range(5) for n in MLP}
    assert set(qc["extra_config"]) == sixteen
    assert all(entry["bits"] == 16 for entry in qc["extra_config"].values())
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()


def test_tuning_beats_plain_rtn_perplexity(tuned, stories_dir, shakespeare, wikitext) -> None:
    """Same bits / group size / calibration: 20 SignRound steps give a lower WikiText-2 perplexity than plain RTN."""
    from signround.eval.ppl import perplexity, tokenize_file

    tuned_model, _out = tuned
    rtn_cfg = AutoRoundConfig(
        bits=4, group_size=32, sym=True, dataset=f"{shakespeare}:concat=True", iters=0, disable_opt_rtn=True
    )
    rtn_model = AutoModelForCausalLM.from_pretrained(stories_dir, quantization_config=rtn_cfg)
    fp_model = AutoModelForCausalLM.from_pretrained(stories_dir)
    ids = tokenize_file(AutoTokenizer.from_pretrained(stories_dir), wikitext)[: 10 * 256 + 1]
    ppl = {
        name: perplexity(m, token_ids=ids, seqlen=256, max_windows=10)
        for name, m in (("fp", fp_model), ("rtn", rtn_model), ("tuned", tuned_model))
    }
    assert all(v == v and 1 < v < 1000 for v in ppl.values()), ppl
    assert ppl["rtn"] != ppl["fp"], ppl  # RTN did change the model
    assert ppl["tuned"] < ppl["rtn"], ppl


# -- the API ------------------------------------------------------------------------------------------------------
def test_api_quantize_and_save_loads_back(tmp_path, stories_dir, shakespeare) -> None:
    ar = signround.AutoRound(
        str(stories_dir),
        scheme="W4A16",
        group_size=32,
        iters=5,
        nsamples=8,
        seqlen=64,
        dataset=f"{shakespeare}:concat=True",
        show_progress=False,
        low_cpu_mem_usage=False,  # the model stays in memory: compared with the file, saved twice
    )
    out = ar.quantize_and_save(tmp_path / "out", format="auto_round")
    assert out == (tmp_path / "out").resolve()
    assert _listing(tmp_path) == ["out"]
    assert len(quant_linears(ar.model)) == 20
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert len(quant_linears(reloaded)) == 20
    assert torch.equal(_logits(reloaded, 1), _logits(ar.model, 1))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["iters"], qc["nsamples"], qc["seqlen"]) == (4, 32, 5, 8, 64)
    # saving again replaces the directory atomically
    assert ar.save_quantized(out) == out and _listing(tmp_path) == ["out"]


def test_api_save_failure_leaves_nothing(tmp_path, stories_dir, monkeypatch) -> None:
    ar = signround.AutoRound(str(stories_dir), group_size=32, iters=0, disable_opt_rtn=True, show_progress=False)
    ar.quantize()
    existing = tmp_path / "out"
    existing.mkdir()
    (existing / "keep.txt").write_text("old")

    def boom(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ar.tokenizer, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        ar.save_quantized(existing)
    assert _listing(tmp_path) == ["out"]  # no temp dir left
    assert _listing(existing) == ["keep.txt"]  # the old output is untouched
    with pytest.raises(OSError, match="disk full"):
        ar.save_quantized(tmp_path / "new")
    assert _listing(tmp_path) == ["out"]


# -- a model whose every block Linear is quantized ------------------------------------------------------------------
def test_tiny_llama_all_layers_quantized(tiny_llama_dir, shakespeare, tmp_path) -> None:
    cfg = AutoRoundConfig(
        bits=3, group_size=32, sym=False, dataset=f"{shakespeare}:concat=True", iters=5, nsamples=8, seqlen=64
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    layers = quant_linears(model)
    assert sorted(layers) == sorted(
        f"model.layers.{i}.{part}.{n}"
        for i in range(2)
        for part, names in (("self_attn", ATTN), ("mlp", MLP))
        for n in names
    )
    assert type(model.lm_head) is nn.Linear
    model.save_pretrained(tmp_path / "q")
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (qc["bits"], qc["group_size"], qc["sym"], qc["packing_format"]) == (3, 32, False, "auto_round")
    assert "extra_config" not in qc  # no layer left in 16 bit
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert len(quant_linears(reloaded)) == 14
    assert torch.equal(_logits(reloaded), _logits(model))


# -- bad input: a named error, and no output (nor temp dir) left ------------------------------------------------------
def _run_cli(tmp_path, *argv: str) -> int:
    return cli_main(["--model", *argv, "--output_dir", str(tmp_path / "out")])


def _fails_with(capsys, rc: int, pattern: str) -> None:
    """The CLI's user-error contract: exit status 2 and one line on stderr naming the problem."""
    import re

    err = capsys.readouterr().err
    assert rc == 2, err
    last = err.rstrip("\n").rsplit("\n", 1)[-1]  # after any progress bars of the model loading
    assert last.startswith("signround: error: ") and err.count("signround: error") == 1, err
    assert "Traceback" not in err, err
    assert re.search(pattern, last), err


def _api_kwargs(argv: list[str]) -> dict:
    """The CLI flags of the bad-settings cases as AutoRound keyword arguments."""
    kwargs: dict = {}
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        key = flag.removeprefix("--")
        kwargs[key] = int(value) if value.isdigit() else value
    return kwargs


@pytest.mark.parametrize(
    ("argv", "error", "pattern"),
    [
        (["--scheme", "W5A16"], ValueError, r"unknown scheme 'W5A16'; accepted: W4A16"),
        (["--bits", "5", "--group_size", "32"], ValueError, r"bits=5 is not supported; accepted: \[2, 3, 4, 8\]"),
        (["--group_size", "48", "--iters", "0"], ValueError, r"no layer of LlamaForCausalLM can be quantized.*size=48"),
        (["--group_size", "32", "--format", "gguf"], ValueError, r"unknown format 'gguf'; accepted: auto_round"),
    ],
)
def test_bad_quantization_settings(tmp_path, stories_dir, argv, error, pattern, capsys) -> None:
    _fails_with(capsys, _run_cli(tmp_path, str(stories_dir), *argv), pattern)
    with pytest.raises(error, match=pattern):  # the API raises the same error
        signround.AutoRound(str(stories_dir), **_api_kwargs(argv)).quantize_and_save(str(tmp_path / "api"))
    assert _listing(tmp_path) == []


@pytest.mark.parametrize(
    ("content", "suffix", "error", "pattern"),
    [
        (None, "", FileNotFoundError, r"calib\.txt' does not exist"),
        ("", "", ValueError, r"calib\.txt' is empty"),
        ("Once upon a time there was a cat.\n", ":concat=True", ValueError, r"0 calibration samples of seqlen=64"),
        ("hello world\nshort line\n" * 20, "", ValueError, r"0 calibration samples of seqlen=64.*concat=True"),
    ],
    ids=["missing", "empty", "shorter-than-seqlen-concat", "short-lines"],
)
def test_bad_calibration_data(tmp_path, stories_dir, content, suffix, error, pattern, capsys) -> None:
    data = tmp_path / "data"
    data.mkdir()
    calib = data / "calib.txt"
    if content is not None:
        calib.write_text(content)
    before = _listing(tmp_path)
    argv = ["--group_size", "32", "--iters", "2", "--nsamples", "4", "--seqlen", "64"]
    _fails_with(capsys, _run_cli(tmp_path, str(stories_dir), *argv, "--dataset", f"{calib}{suffix}"), pattern)
    assert error in (FileNotFoundError, ValueError)
    assert _listing(tmp_path) == before == ["data"]


def test_output_under_a_regular_file_fails_before_tuning(tmp_path, stories_dir, monkeypatch, capsys) -> None:
    (tmp_path / "afile").write_text("not a directory")

    def must_not_run(self):
        raise AssertionError("quantize() ran although the output directory cannot be created")

    monkeypatch.setattr(signround.AutoRound, "quantize", must_not_run)
    for target in (tmp_path / "afile" / "out", tmp_path / "afile"):
        rc = cli_main(["--model", str(stories_dir), "--group_size", "32", "--output_dir", str(target)])
        _fails_with(capsys, rc, "afile.* is not a directory")
    assert _listing(tmp_path) == ["afile"]
    assert (tmp_path / "afile").read_text() == "not a directory"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_output_parent(tmp_path, stories_dir) -> None:
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        rc = cli_main(["--model", str(stories_dir), "--group_size", "32", "--output_dir", str(parent / "out")])
        assert rc == 2
        assert _listing(parent) == []
    finally:
        parent.chmod(0o700)


# -- corrupted checkpoints ---------------------------------------------------------------------------------------
def _corrupt(rtn_checkpoint, tmp_path, edit) -> str:
    from safetensors.torch import load_file, save_file

    out = tmp_path / "ckpt"
    shutil.copytree(rtn_checkpoint, out)
    tensors = load_file(out / "model.safetensors")
    edit(tensors)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


def test_missing_tensor_names_the_layer(rtn_checkpoint, tmp_path) -> None:
    layer = "model.layers.3.self_attn.k_proj"
    path = _corrupt(rtn_checkpoint, tmp_path, lambda t: t.pop(f"{layer}.qzeros"))
    with pytest.raises(ValueError, match=rf"layer '{layer}'.*qzeros.*missing"):
        AutoModelForCausalLM.from_pretrained(path)


def test_non_finite_scales_name_the_layer(rtn_checkpoint, tmp_path) -> None:
    layer = "model.layers.1.self_attn.o_proj"

    def poison(tensors):
        tensors[f"{layer}.scales"][0, 0] = float("nan")

    path = _corrupt(rtn_checkpoint, tmp_path, poison)
    with pytest.raises(ValueError, match=rf"layer '{layer}': buffer 'scales' holds non-finite"):
        AutoModelForCausalLM.from_pretrained(path)


def test_rtn_checkpoint_itself_loads(rtn_checkpoint) -> None:
    """The control for the two tests above: the unmodified checkpoint loads and runs."""
    model = AutoModelForCausalLM.from_pretrained(rtn_checkpoint)
    assert len(quant_linears(model)) == 20
    assert torch.isfinite(_logits(model)).all()
