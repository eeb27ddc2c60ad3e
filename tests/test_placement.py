"""Where blocks are tuned and where their cached streams live (``device_map`` / ``low_gpu_mem_usage``), and the
deterministic mode.  The accelerator cases run where one is present and skip, saying so, elsewhere."""

from __future__ import annotations

import hashlib

import pytest
import torch
from tiny_families import make_tiny_llama

import signround
from signround.schemes import LayerSpec, resolve_plan
from signround.tuning import engine
from signround.tuning.block import TuneOptions
from signround.tuning.inputs import BlockInputs

IDS = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
CPU = torch.device("cpu")


def _accelerator() -> torch.device | None:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.current_accelerator() if accelerator and accelerator.is_available() else None


@pytest.mark.parametrize(
    ("device", "low_mem", "block_on", "expected"),
    [
        (None, False, "cpu", ("cpu", "cpu")),  # where the block is
        ("cpu", True, "cpu", ("cpu", "cpu")),
        ("cuda:1", False, "cpu", ("cuda:1", "cuda:1")),  # caches beside the block on the device
        ("cuda:1", True, "cpu", ("cuda:1", "cpu")),  # low_gpu_mem_usage: caches on the host
        ("xpu", True, "cpu", ("xpu", "cpu")),  # a device is a string, not a code path
        (None, True, "cuda:0", ("cuda:0", "cpu")),
    ],
)
def test_placement_policy(device, low_mem, block_on, expected):
    options = TuneOptions(device=device, low_gpu_mem_usage=low_mem)
    tune, cache = engine.placement(options, torch.device(block_on))
    assert (str(tune), str(cache)) == expected


def test_host_cache_hands_out_batches_on_the_compute_device():
    inputs = BlockInputs(torch.randn(4, 8, 16), shared={"flag": True}, per_sample={"mask": torch.ones(4, 1, 8, 8)})
    placed = inputs.placed(CPU, torch.device("meta"))
    assert placed.hidden.device == CPU  # the cache stays on the host
    hidden, kwargs = placed.batch(torch.arange(2))
    assert hidden.device.type == "meta" and kwargs["mask"].device.type == "meta" and kwargs["flag"] is True
    assert inputs.placed(CPU, CPU).compute_device is None  # same device: no per-batch transfer


def _run(options: TuneOptions):
    model = make_tiny_llama()
    plan = resolve_plan(engine.quantizable_layers(model), LayerSpec(bits=3, group_size=32))
    return model, engine.run(model, plan, IDS, None, options)


def test_block_moves_to_the_requested_device_for_its_tuning_and_back(monkeypatch):
    """The engine asks for the device (block.to(device)) and returns the block home; on CPU both are the CPU, and
    the requested-device run gives exactly the default run's result, host cache included."""
    calls: list[tuple[int, str]] = []
    original = torch.nn.Module.to

    def recording_to(self, *args, **kwargs):
        if type(self).__name__ == "LlamaDecoderLayer":
            calls.append((id(self), str(args[0])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    _, placed = _run(TuneOptions(iters=3, batch_size=2, show_progress=False, device="cpu", low_gpu_mem_usage=True))
    assert [device for _, device in calls] == ["cpu", "cpu"] * 2  # to the device, then home, per block
    assert calls[0][0] == calls[1][0] != calls[2][0]
    monkeypatch.undo()
    _, default = _run(TuneOptions(iters=3, batch_size=2, show_progress=False))
    for name, qt in default.quantized.items():
        assert torch.equal(qt.codes, placed.quantized[name].codes), name


@pytest.mark.skipif(_accelerator() is None, reason="needs an accelerator (CUDA / XPU): none on this machine")
def test_on_an_accelerator_blocks_run_there_and_the_model_stays_on_the_host():
    accelerator = _accelerator()
    model = make_tiny_llama()
    seen: list[str] = []
    for block in model.model.layers:
        block.register_forward_pre_hook(
            lambda m, args: seen.append(f"{next(m.parameters()).device.type}/{args[0].device.type}")
        )
    plan = resolve_plan(engine.quantizable_layers(model), LayerSpec(bits=4, group_size=32))
    options = TuneOptions(iters=3, batch_size=2, show_progress=False, device=str(accelerator), low_gpu_mem_usage=True)
    report = engine.run(model, plan, IDS, None, options)
    assert set(seen) == {f"{accelerator.type}/{accelerator.type}"}
    assert all(p.device == CPU for p in model.parameters())
    assert all(qt.codes.device == CPU for qt in report.quantized.values())


def test_deterministic_mode_is_on_while_tuning_and_gives_the_same_bytes(tmp_path, stories_dir, shakespeare):
    from transformers import AutoTokenizer

    states: list[bool] = []
    digests = []
    for run in range(2):
        model = make_tiny_llama()
        model.model.layers[1].register_forward_pre_hook(
            lambda _m, _a: states.append(torch.are_deterministic_algorithms_enabled())
        )
        ar = signround.AutoRound(
            model, AutoTokenizer.from_pretrained(stories_dir), bits=4, group_size=32, iters=3, nsamples=4, seqlen=32,
            batch_size=2, dataset=str(shakespeare), enable_deterministic_algorithms=True, show_progress=False,
        )  # fmt: skip
        ar.quantize()
        assert not torch.are_deterministic_algorithms_enabled()  # restored after the run
        out = ar.save_quantized(tmp_path / f"run{run}")
        digests.append({f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())})
    assert states and all(states)
    assert digests[0] == digests[1]
