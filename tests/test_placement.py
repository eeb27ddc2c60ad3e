"""Where blocks are tuned and where their cached streams live (``device_map`` / ``low_gpu_mem_usage``), and the
deterministic mode.  The accelerator cases run where one is present and skip, saying so, elsewhere."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import pytest
import torch
from tiny_families import make_tiny_llama

import signround
from signround import placement
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
def test_placement_policy(device, low_mem, block_on, expected, monkeypatch):
    monkeypatch.setattr(engine, "_host_accelerator", lambda: None)  # the same answer on a machine with a GPU
    options = TuneOptions(device=device, low_gpu_mem_usage=low_mem)
    tune, cache = engine.placement(options, torch.device(block_on))
    assert (str(tune), str(cache)) == expected


@pytest.mark.parametrize(
    ("device", "low_mem", "block_on", "expected"),
    [
        (None, False, "cpu", ("cuda:0", "cuda:0")),  # a model loaded on the host is tuned on the GPU beside it
        (None, True, "cpu", ("cuda:0", "cpu")),  # low_gpu_mem_usage: its caches stay on the host
        (None, False, "cuda:1", ("cuda:1", "cuda:1")),  # a block already on an accelerator is tuned where it is
        ("cpu", False, "cpu", ("cpu", "cpu")),  # the host when asked for
    ],
)
def test_default_device_is_the_accelerator_like_the_references_device_map_0(
    device, low_mem, block_on, expected, monkeypatch
):
    monkeypatch.setattr(engine, "_host_accelerator", lambda: torch.device("cuda"))
    tune, cache = engine.placement(TuneOptions(device=device, low_gpu_mem_usage=low_mem), torch.device(block_on))
    assert (str(tune), str(cache)) == expected


@pytest.mark.skipif(_accelerator() is None, reason="needs an accelerator (CUDA / XPU): none on this machine")
def test_a_model_on_the_host_is_tuned_on_the_accelerator_by_default():
    accelerator = _accelerator()
    model = make_tiny_llama()
    seen: list[str] = []
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda m, args: seen.append(next(m.parameters()).device.type))
    plan = resolve_plan(engine.quantizable_layers(model), LayerSpec(bits=4, group_size=32))
    engine.run(model, plan, IDS, None, TuneOptions(iters=3, batch_size=2, show_progress=False))
    assert set(seen) == {accelerator.type}
    assert all(p.device == CPU for p in model.parameters())  # and home again


@pytest.mark.skipif(_accelerator() is None, reason="needs an accelerator (CUDA / XPU): none on this machine")
@pytest.mark.parametrize("iters", [0, 3])
def test_a_host_head_is_quantized_on_the_accelerator_and_goes_home(iters, monkeypatch):
    accelerator = _accelerator()
    model = make_tiny_llama()
    seen: list[str] = []
    start = engine._layer_start

    def recording_start(layer, *args, **kwargs):
        seen.append(layer.weight.device.type)
        return start(layer, *args, **kwargs)

    monkeypatch.setattr(engine, "_layer_start", recording_start)
    plan = resolve_plan(engine.quantizable_layers(model, include_lm_head=True), LayerSpec(bits=4, group_size=32))
    assert "lm_head" in plan.layers
    report = engine.run(model, plan, IDS, None, TuneOptions(iters=iters, batch_size=2, show_progress=False))
    assert set(seen) == {accelerator.type}  # every layer's start, the head's included, was found there
    assert model.lm_head.weight.device == CPU and report.quantized["lm_head"].codes.device == CPU
    assert (report.head_loss is not None) == bool(iters)


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


# -- several devices (signround.placement) ----------------------------------------------------------------------
# On this CPU-only suite, plans are made over fake accelerator names (the planner is pure) and executed with every
# planned device mapped to the CPU (``placement.physical``): accelerate's real hooks then run the whole path, and a
# spread run must give exactly the single-device run's tensors.


def _fake_accelerators(monkeypatch, count: int = 2, kind: str = "cuda") -> None:
    """``torch.accelerator`` reporting ``count`` devices of ``kind`` (for config parsing only; nothing runs there)."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *a, **k: torch.device(kind))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: count)


@pytest.mark.parametrize(
    ("device_map", "expected"),
    [
        ("0,1", ("cuda:0", "cuda:1")),
        ("cuda:0, cuda:1", ("cuda:0", "cuda:1")),
        ("auto", ("cuda:0", "cuda:1")),  # every accelerator of the machine
        ("0,cpu", ("cuda:0", "cpu")),  # a block too big for the card spills onto the host
        (["cuda", 1], ("cuda:0", "cuda:1")),
        ("1,1", "cuda:1"),  # one device after all: the plain path
        ({"mlp.experts": 1, "self_attn": "cuda:0"}, {"mlp.experts": "cuda:1", "self_attn": "cuda:0"}),
    ],
)
def test_device_map_forms_for_several_devices(monkeypatch, device_map, expected):
    _fake_accelerators(monkeypatch)
    assert signround.AutoRoundConfig(bits=4, device_map=device_map).tuning_device() == expected


@pytest.mark.parametrize(
    ("device_map", "message"),
    [
        ("0,2", "only 2 cuda devices"),
        ("0,disk", "'disk' is not a device"),
        ({"*": "cuda:0"}, "key '*' is not a layer name or pattern"),
        ({}, "is empty"),
        (object(), "is not supported for tuning"),
    ],
)
def test_bad_device_maps_are_refused_in_one_line_naming_the_accepted_forms(monkeypatch, device_map, message):
    _fake_accelerators(monkeypatch)
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        signround.AutoRoundConfig(bits=4, device_map=device_map)
    assert "\n" not in str(err.value)
    if message != "only 2 cuda devices":
        assert "'0,1'" in str(err.value) and "dict" in str(err.value)


def test_single_device_forms_are_unchanged_on_a_cpu_machine():
    config = signround.AutoRoundConfig
    assert config(bits=4, device_map="auto").tuning_device() == "cpu"
    assert config(bits=4, device_map="cpu, cpu").tuning_device() == "cpu"
    assert config(bits=4, device_map={"mlp": "cpu"}).tuning_device() == {"mlp": "cpu"}
    with pytest.raises(ValueError, match="names an accelerator; this machine has none"):
        config(bits=4, device_map="0,1")


def _block():
    return make_tiny_llama().model.layers[0]


def _device_of(device_map: dict[str, str], name: str) -> str:
    """The device a (leaf) module gets from a plan: its own entry or its nearest planned ancestor's."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return device_map[key]
    raise AssertionError(f"{name} has no device in {device_map}")


def test_the_tuning_budget_counts_rounding_state_and_activations():
    block = _block()
    linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
    size, need = placement.tuning_bytes(block, tokens=64)
    assert size == sum(t.numel() * t.element_size() for t in [*block.parameters(), *block.buffers()])
    weights = sum(m.weight.numel() for m in linears)
    features = sum(m.in_features + m.out_features for m in linears)
    assert need == size + placement.TUNING_BYTES_PER_WEIGHT * weights + 8 * 64 * features
    assert placement.runtime_budgets(["cpu"])["cpu"] > 0  # from free memory at run time (the host: available RAM)


def test_a_block_that_fits_the_first_device_stays_whole_there_else_on_the_first_that_holds_it():
    block = _block()
    _, need = placement.tuning_bytes(block, tokens=64)
    devices = ["cuda:0", "cuda:1"]
    assert placement.plan_block(block, devices, {0: need + 1024, 1: need}, tokens=64) == {"": "cuda:0"}
    assert placement.plan_block(block, devices, {0: need // 2, 1: "1GiB"}, tokens=64) == {"": "cuda:1"}
    # what the first device keeps for the streams is not the block's
    assert placement.plan_block(block, devices, {0: need + 1024, 1: "1GiB"}, tokens=64, reserve=2048) == {"": "cuda:1"}


def test_a_block_too_big_for_each_device_is_split_layer_by_layer_over_them_in_order():
    block = _block()
    _, need = placement.tuning_bytes(block, tokens=64)
    budget = need * 6 // 10
    plan = placement.plan_block(block, ["cuda:0", "cuda:1"], {0: budget, 1: budget}, tokens=64)
    linears = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
    devices = {name: _device_of(plan, name) for name in linears}
    assert set(devices.values()) == {"cuda:0", "cuda:1"}
    assert any(key in linears for key in plan)  # cut inside a sub-layer: single Linears placed on their own
    modules = dict(block.named_modules())
    assert all(key in modules for key in plan)  # module names only, to put hooks on
    # budgets are in user form too, and a device list may end on the host
    spill = placement.plan_block(block, ["cuda:0", "cpu"], {"cuda:0": budget, "cpu": "64GiB"}, tokens=64)
    assert {_device_of(spill, n) for n in linears} == {"cuda:0", "cpu"}


def test_a_block_too_big_for_all_devices_is_refused_in_one_line_naming_it_and_the_budgets():
    block = _block()
    with pytest.raises(placement.PlacementError) as err:
        placement.plan_block(block, ["cuda:0", "cuda:1"], {0: "100KiB", 1: "100KiB"}, tokens=64, name="model.layers.0")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("model.layers.0 (LlamaDecoderLayer) does not fit")
    assert "cuda:0 100.0 KiB, cuda:1 100.0 KiB" in message
    with pytest.raises(ValueError, match="gives no budget for cuda:1"):
        placement.plan_block(block, ["cuda:0", "cuda:1"], {0: "1GiB"})


def test_a_dict_names_layers_inside_every_block_as_in_the_reference_deepseek_example():
    from tiny_families import make_causal_lm

    from signround.models import unfuse_experts

    model = make_causal_lm("qwen3_moe")
    unfuse_experts(model)
    block = model.model.layers[1]
    mapping = {
        "mlp.experts.0.gate_proj": "cuda:1",  # a block-relative name, as the reference's example writes them
        ".mlp.experts.1.up_proj": "cuda:1",  # its n[2:] slicing leaves a leading dot for blocks >= 10
        r"mlp\.experts\.[23]\..*": "cuda:2",  # a pattern
        "model.layers.1.self_attn": "cuda:0",  # a full name
        "lm_head": "cuda:0",  # outside the blocks
    }
    placed, used = placement.match_map(block, mapping, "model.layers.1.")
    assert placed["mlp.experts.0.gate_proj"] == "cuda:1" and placed["mlp.experts.1.up_proj"] == "cuda:1"
    assert {placed[f"mlp.experts.{e}.down_proj"] for e in (2, 3)} == {"cuda:2"}
    assert placed["self_attn"] == "cuda:0"
    assert "mlp.experts.0.up_proj" not in placed  # unnamed: the main device
    assert used == set(mapping) - {"lm_head"}
    assert placement.main_device(mapping) == torch.device("cuda:1")  # the dict's first accelerator


def _spread_plan(block) -> dict[str, str]:
    _, need = placement.tuning_bytes(block, tokens=64)
    return placement.plan_block(block, ["cuda:0", "cuda:1"], {0: need * 6 // 10, 1: need * 6 // 10}, tokens=64)


def test_a_dispatched_block_runs_each_layer_on_its_device_and_goes_home_unchanged():
    block = _block()
    params = {name: p for name, p in block.named_parameters()}
    plan = {name: "cpu" for name in _spread_plan(block)}  # the split plan, executed on the CPU
    hidden = torch.randn(2, 8, 64)
    position = make_tiny_llama().model.rotary_emb(hidden, torch.arange(8)[None])
    expected = block(hidden, position_embeddings=position)
    checked: list[str] = []

    def where(name):
        def hook(module, args):
            hf = module._hf_hook  # placed by accelerate: its inputs go to its execution device
            assert str(hf.execution_device) == _device_of(plan, name) == "cpu"
            assert all(str(p.device) == "cpu" for p in module.parameters())
            checked.append(name)

        return hook

    dispatch = placement.Dispatch(block, plan, "cpu", CPU)
    handles = [block.get_submodule(n).register_forward_pre_hook(where(n)) for n in plan]
    torch.testing.assert_close(block(hidden, position_embeddings=position), expected, rtol=0, atol=0)
    assert sorted(checked) == sorted(plan)
    for h in handles:
        h.remove()
    dispatch.release()
    assert not any(hasattr(m, "_hf_hook") or "forward" in vars(m) for m in block.modules())
    assert all(p is params[name] for name, p in block.named_parameters())  # same parameters, not copies


def _hook_runs(monkeypatch) -> list[tuple[str, str, str]]:
    """Every accelerate alignment during a run: (module class, execution device, where its inputs landed); the
    module's own tensors are checked to be on that device."""
    from accelerate.hooks import AlignDevicesHook

    runs: list[tuple[str, str, str]] = []
    original = AlignDevicesHook.pre_forward

    def pre_forward(self, module, *args, **kwargs):
        args, kwargs = original(self, module, *args, **kwargs)
        device = torch.device(self.execution_device)
        assert all(t.device == device for t in module.parameters(recurse=False)), type(module).__name__
        first = next(t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor))
        runs.append((type(module).__name__, str(device), str(first.device)))
        return args, kwargs

    monkeypatch.setattr(AlignDevicesHook, "pre_forward", pre_forward)
    return runs


def test_a_device_list_spreads_each_block_by_plan_and_tunes_exactly_like_one_device(monkeypatch):
    """device_map=("cuda:0", "cuda:1") on budgets too small for one card: each block is planned over both (fake
    ids, run-time budgets), executed on the CPU through accelerate's hooks; the tensors equal the one-device run's."""
    _, single = _run(TuneOptions(iters=3, batch_size=2, show_progress=False))
    plans: list[dict[str, str]] = []
    real_plan = placement.plan_block

    def recording_plan(*args, **kwargs):
        plans.append(real_plan(*args, **kwargs))
        return plans[-1]

    need = placement.tuning_bytes(_block(), tokens=2 * 32)[1]
    budget = need * 6 // 10 + placement.main_reserve(torch.zeros(4, 32, 64), 2, streams_on_main=True)
    monkeypatch.setattr(placement, "runtime_budgets", lambda devices: dict.fromkeys(devices, budget))
    monkeypatch.setattr(placement, "plan_block", recording_plan)
    monkeypatch.setattr(placement, "physical", lambda device: CPU)
    runs = _hook_runs(monkeypatch)
    model, spread = _run(TuneOptions(iters=3, batch_size=2, show_progress=False, device=("cuda:0", "cuda:1")))
    assert len(plans) == 2 and all({"cuda:0", "cuda:1"} <= set(p.values()) for p in plans)
    assert sum(kind == "TunableLinear" for kind, _, _ in runs) > 0  # the tuned layers kept their placement
    assert {(device, landed) for _, device, landed in runs} == {("cpu", "cpu")}
    for name, qt in single.quantized.items():
        for part in ("codes", "scales", "zeros"):
            assert torch.equal(getattr(qt, part), getattr(spread.quantized[name], part)), (name, part)
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())
    assert all(p.device == CPU for p in model.parameters())


def test_a_dict_device_map_places_the_named_layers_and_tunes_exactly_like_one_device(monkeypatch, caplog):
    _, single = _run(TuneOptions(iters=3, batch_size=2, show_progress=False))
    runs = _hook_runs(monkeypatch)
    mapping = {"mlp.down_proj": "cpu", r"self_attn\.[qk]_proj": "cpu", "lm_head": "cpu"}
    with caplog.at_level("WARNING", logger="signround.placement"):
        _, spread = _run(TuneOptions(iters=3, batch_size=2, show_progress=False, device=mapping))
    kinds = {kind for kind, _, _ in runs}
    assert {"LlamaDecoderLayer", "Linear", "TunableLinear"} <= kinds
    assert sum(kind in ("Linear", "TunableLinear") for kind, _, _ in runs) % 3 == 0  # q, k and down each time
    for name, qt in single.quantized.items():
        assert torch.equal(qt.codes, spread.quantized[name].codes), name
    assert "named no module of the tuned blocks: lm_head" in caplog.text


def test_a_block_failing_mid_tuning_leaves_no_hooks_behind(monkeypatch):
    def failing(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(engine, "tune_block", failing)
    model = make_tiny_llama()
    plan = resolve_plan(engine.quantizable_layers(model), LayerSpec(bits=4, group_size=32))
    with pytest.raises(RuntimeError, match="simulated"):
        engine.run(model, plan, IDS, None, TuneOptions(iters=2, show_progress=False, device={"mlp": "cpu"}))
    assert not any(hasattr(m, "_hf_hook") for m in model.modules())


def _accelerators() -> int:
    accelerator = getattr(torch, "accelerator", None)
    return accelerator.device_count() if accelerator and accelerator.is_available() else 0


def _agreement(a, b) -> float:
    same = sum(int((qa.codes == b[n].codes).sum()) for n, qa in a.items())
    return same / sum(qa.codes.numel() for qa in a.values())


@pytest.mark.skipif(_accelerators() < 1, reason="needs an accelerator (CUDA / XPU) to split a block with the CPU")
def test_on_an_accelerator_a_block_split_with_the_cpu_runs_its_layers_on_both(monkeypatch):
    """device_map=("<accelerator>:0", "cpu") with a card budget below one block: each block's layers run on the card
    and on the host; the model and the quantized tensors end on the host; the tensors match the card-only run up
    to the arithmetic difference between the two devices (fp32, amp off)."""
    accelerator = f"{_accelerator().type}:0"
    options = dict(iters=3, batch_size=2, show_progress=False, amp=False)
    _, alone = _run(TuneOptions(**options, device=accelerator))
    need = placement.tuning_bytes(_block(), tokens=2 * 32)[1]
    reserve = placement.main_reserve(torch.zeros(4, 32, 64), 2, streams_on_main=True)
    budgets = {accelerator: need * 6 // 10 + reserve, "cpu": 2**34}
    monkeypatch.setattr(placement, "runtime_budgets", lambda devices: budgets)
    runs = _hook_runs(monkeypatch)
    model, split = _run(TuneOptions(**options, device=(accelerator, "cpu")))
    used = {device for kind, device, _ in runs if kind in ("Linear", "TunableLinear", "LlamaAttention", "LlamaMLP")}
    assert {torch.device(d).type for d in used} == {_accelerator().type, "cpu"}
    assert all(torch.device(device) == torch.device(landed) for _, device, landed in runs)
    assert all(p.device == CPU for p in model.parameters())
    assert all(qt.codes.device == CPU for qt in split.quantized.values())
    assert _agreement(alone.quantized, split.quantized) > 0.95


@pytest.mark.skipif(_accelerators() < 2, reason="needs 2 accelerators (CUDA / XPU) to split a block between cards")
def test_on_two_accelerators_a_block_too_big_for_one_is_split_between_them(monkeypatch):
    kind = _accelerator().type
    devices = (f"{kind}:0", f"{kind}:1")
    options = dict(iters=3, batch_size=2, show_progress=False, amp=False)
    _, alone = _run(TuneOptions(**options, device=devices[0]))
    need = placement.tuning_bytes(_block(), tokens=2 * 32)[1]
    budget = need * 6 // 10 + placement.main_reserve(torch.zeros(4, 32, 64), 2, streams_on_main=True)
    monkeypatch.setattr(placement, "runtime_budgets", lambda names: dict.fromkeys(names, budget))
    runs = _hook_runs(monkeypatch)
    model, split = _run(TuneOptions(**options, device=devices))
    layers = ("Linear", "TunableLinear", "LlamaAttention", "LlamaMLP")
    assert {device for kind_, device, _ in runs if kind_ in layers} == set(devices)
    assert all(p.device == CPU for p in model.parameters())
    assert _agreement(alone.quantized, split.quantized) > 0.99


def test_the_gpu_bench_script_runs_its_tiny_cpu_smoke_path(capsys):
    """bench/gpu_multi_device.py --tiny: the same three runs at tiny size, the card's planned but run on the CPU."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
    try:
        import gpu_multi_device
    finally:
        sys.path.pop(0)
    assert gpu_multi_device.parse_args([]).shape == "llama3-8b"
    assert gpu_multi_device.main(["--tiny"]) == 0
    out = capsys.readouterr().out
    assert "hooks, one card\ttensors equal to one card's: True" in out
    assert "'cuda:0'" in out and "'cpu'" in out and out.rstrip().endswith("OK")
    assert placement.physical("cuda:0") == torch.device("cuda:0")  # the smoke run's substitution is undone
    assert not torch.are_deterministic_algorithms_enabled()


def test_max_memory_reaches_the_tuning_options_and_bad_values_are_refused():
    from signround.api import tune_options

    config = signround.AutoRoundConfig(max_memory={"0": "20GiB", "cpu": "64GiB"})
    assert tune_options(config, show_progress=False).max_memory == {"0": "20GiB", "cpu": "64GiB"}
    with pytest.raises(ValueError, match="max_memory='20GiB' is not supported; accepted: None or a dict"):
        signround.AutoRoundConfig(max_memory="20GiB")


def test_quantize_on_load_placement_keeps_tuning_room_on_accelerators():
    """transformers' own placement (``_get_device_map`` for ``device_map="sequential"``) asks the quantizer:
    quantizing on load, each accelerator keeps ``TUNING_HEADROOM`` free, so a model that just fits card 0 spills
    a block to the host; loading a packed checkpoint changes nothing.  Device ids are only planned, never used."""
    from transformers.integrations.accelerate import _get_device_map

    from signround.hf_quantizer import TUNING_HEADROOM, SignRoundHfQuantizer

    with torch.device("meta"):
        model = make_tiny_llama()
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    max_memory = {0: int(size * 1.05), "cpu": 10 * size}
    config = signround.AutoRoundConfig()
    quantizing = SignRoundHfQuantizer(config, pre_quantized=False)
    loading = SignRoundHfQuantizer(config, pre_quantized=True)
    assert quantizing.adjust_max_memory(dict(max_memory)) == {
        0: int(max_memory[0] * (1 - TUNING_HEADROOM)),
        "cpu": 10 * size,
    }
    assert loading.adjust_max_memory(dict(max_memory)) == max_memory
    placed_loading = _get_device_map(model, "sequential", dict(max_memory), loading)
    placed_quantizing = _get_device_map(model, "sequential", dict(max_memory), quantizing)
    assert set(placed_loading.values()) == {0}
    assert "cpu" in set(placed_quantizing.values()) and 0 in set(placed_quantizing.values())
