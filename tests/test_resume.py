"""Resuming a block walk: a walk continued from a checkpoint gives exactly what the uninterrupted walk gives, and
the work directory refuses another model, config or data."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_families import make_tiny_llama

from signround.resume import ResumeStore, fingerprint, work_dir_for
from signround.schemes import LayerSpec, resolve_plan
from signround.tuning import engine
from signround.tuning.block import TuneOptions

IDS = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(3))
OPTIONS = TuneOptions(iters=4, batch_size=2, show_progress=False)


def _plan(model):
    return resolve_plan(engine.quantizable_layers(model), LayerSpec(bits=3, group_size=32))


class _Killed(Exception):
    pass


@pytest.mark.parametrize("quanted_input", [True, False])  # False: one stream, stored once
def test_walk_resumed_after_block_0_equals_the_uninterrupted_walk(tmp_path, quanted_input):
    options = dataclasses.replace(OPTIONS, enable_quanted_input=quanted_input)
    model = make_tiny_llama()
    full = engine.run(model, _plan(model), IDS, None, options)

    store = ResumeStore(tmp_path / "work", {"model": "m", "config": "c", "data": "d"})
    known: set[str] = set()

    def record_then_die(checkpoint):
        store.save(checkpoint, known)
        raise _Killed  # the process dies right after block 0 was recorded

    killed = make_tiny_llama()
    with pytest.raises(_Killed):
        engine.run(killed, _plan(killed), IDS, None, options, on_block=record_then_die)
    loaded = store.load()
    assert loaded is not None and loaded.next_block == 1
    assert sorted(loaded.report.quantized) == sorted(n for n in full.quantized if n.startswith("model.layers.0."))

    fresh = make_tiny_llama()  # the fp model again, as after a kill
    resumed = engine.run(fresh, _plan(fresh), IDS, None, options, resume=loaded)
    assert set(resumed.quantized) == set(full.quantized)
    for name, qt in full.quantized.items():
        other = resumed.quantized[name]
        assert torch.equal(qt.codes, other.codes) and torch.equal(qt.scales, other.scales), name
    assert resumed.block_losses == full.block_losses
    # the skipped block's layers compute their packed values: the model equals the uninterrupted one
    for name, p in model.state_dict().items():
        assert torch.equal(p, fresh.state_dict()[name]), name


def test_resuming_from_another_model_config_or_data_is_refused(tmp_path):
    model = make_tiny_llama()
    base = fingerprint(model, {"bits": 4}, IDS)
    assert base == fingerprint(make_tiny_llama(), {"bits": 4}, IDS)  # the same inputs: the same fingerprint
    checkpoints = []
    engine.run(model, _plan(model), IDS, None, OPTIONS, on_block=checkpoints.append)
    ResumeStore(tmp_path, base).save(checkpoints[0], set())

    others = {
        "model": fingerprint(make_tiny_llama(seed=1), {"bits": 4}, IDS),
        "config": fingerprint(make_tiny_llama(), {"bits": 3}, IDS),
        "data": fingerprint(make_tiny_llama(), {"bits": 4}, IDS + 1),
    }
    for what, other in others.items():
        assert [k for k in base if base[k] != other[k]] == [what]
        with pytest.raises(ValueError, match=f"the {what} differs from the interrupted run"):
            ResumeStore(tmp_path, other).load()


def test_work_dir_sits_beside_the_output(tmp_path):
    assert work_dir_for(tmp_path / "out") == tmp_path / ".out.signround-resume"


def _rss_file_kib() -> int:
    for line in open("/proc/self/status").read().splitlines():  # noqa: SIM115
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


def test_fingerprint_reads_a_few_pages_of_a_memory_mapped_weight(tmp_path) -> None:
    """A low_cpu_mem_usage run keeps its embeddings and head memory-mapped: fingerprinting them must not fault
    the whole tensor in (a strided sample of single values did, 2 x 131 MB on a 1B model)."""
    path = tmp_path / "weight.bin"
    numel = 16 * 2**20  # 64 MiB of float32
    torch.arange(numel, dtype=torch.float32).numpy().tofile(path)
    mapped = torch.from_file(str(path), shared=True, size=numel, dtype=torch.float32)
    model = torch.nn.Module()
    model.weight = torch.nn.Parameter(mapped, requires_grad=False)
    before = _rss_file_kib()
    digest = fingerprint(model, {}, IDS)["model"]
    assert _rss_file_kib() - before < 16 * 1024  # a quarter of the 64 MiB file at most (a strided sample: all)
    with torch.no_grad():
        model.weight[-1] += 1  # the last value is in the sample
    assert fingerprint(model, {}, IDS)["model"] != digest


def test_a_run_fingerprints_alike_with_and_without_low_cpu_mem_usage(stories_dir) -> None:
    """Offloaded weights (meta tensors under low_cpu_mem_usage) are sampled from their checkpoint file, the same
    runs as in memory: a run killed in one placement resumes in the other; a changed value still changes it."""
    from transformers import AutoModelForCausalLM

    import signround

    kwargs = dict(bits=4, group_size=32, iters=0, nsamples=4, seqlen=32, show_progress=False)
    offloaded = signround.AutoRound(str(stories_dir), dataset=[IDS[0].tolist()], low_cpu_mem_usage=True, **kwargs)
    metas = [n for n, p in offloaded.model.named_parameters() if p.device.type == "meta"]
    assert len(metas) > 10  # the blocks are on "disk"
    in_memory = AutoModelForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    digest = fingerprint(in_memory, {}, IDS)["model"]
    assert fingerprint(offloaded.model, {}, IDS)["model"] == digest
    with torch.no_grad():
        in_memory.get_parameter(metas[0]).view(-1)[0] += 1  # the first value is in the sample
    assert fingerprint(in_memory, {}, IDS)["model"] != digest
