"""select() over backend descriptors: picks the best usable one and explains every rejection."""

from __future__ import annotations

import logging

import pytest
import torch

from signround.kernels import Backend, QuantLinear, backend_names, candidates, register_backend, registry, select
from signround.kernels.torch import TorchQuantLinear
from signround.schemes import LayerSpec

W4 = LayerSpec(bits=4, group_size=128, sym=True)
PACKING = "auto_round:auto_gptq"


def _fake(name: str, **fields) -> Backend:
    spec = {
        "quant_linear": QuantLinear,
        "devices": ("cpu",),
        "bits": (4,),
        "dtypes": (torch.bfloat16,),
        "packings": (PACKING,),
        "priority": 5,
    }
    spec.update(fields)
    return Backend(name=name, **spec)


def test_torch_is_registered_and_is_the_fallback_on_cpu(monkeypatch) -> None:
    assert "torch" in backend_names()
    monkeypatch.delitem(registry._BACKENDS, "native")  # as on a machine without a C compiler
    backend = select(LayerSpec(bits=8, group_size=128, sym=False), PACKING, "cpu", torch.bfloat16, 256, 512)
    assert backend.name == "torch" and backend.quant_linear is TorchQuantLinear  # asymmetric 8-bit: no CPU kernel
    assert select(W4, "auto_round", torch.device("cpu"), torch.float32, 256, 512, requested="torch").name == "torch"


def test_the_cpu_int4_kernel_is_chosen_for_4bit_cpu_layers_it_can_run(cpu_int4_backend, monkeypatch) -> None:
    assert select(W4, PACKING, "cpu", torch.bfloat16, 256, 512).name == cpu_int4_backend
    assert select(W4, PACKING, "cpu", torch.float32, 256, 512).name == cpu_int4_backend
    monkeypatch.delitem(registry._BACKENDS, "native")  # torch_int4: what it takes and why it rejects
    reasons = dict((b.name, r) for b, r in candidates(W4, PACKING, "cpu", torch.float32, 256, 520))
    assert reasons["torch_int4"] == "out_features=520 is not a multiple of 16"
    reasons = dict(
        (b.name, r) for b, r in candidates(LayerSpec(bits=4, group_size=16), PACKING, "cpu", torch.float32, 256, 512)
    )
    assert reasons["torch_int4"].startswith("group of 16 input features is not a multiple of 32")
    per_channel = LayerSpec(bits=4, group_size=-1)  # split into kernel groups of 256 (in_features 256 or 768)
    assert select(per_channel, PACKING, "cpu", torch.float32, 256, 512).name == "torch_int4"
    assert select(per_channel, PACKING, "cpu", torch.float32, 768, 512).name == "torch_int4"
    assert (
        "device 'cuda' not in ['cpu']"
        in dict((b.name, r) for b, r in candidates(W4, PACKING, "cuda", torch.float16, 256, 512))["torch_int4"]
    )


def test_unknown_requested_backend_lists_registered() -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'machete'; registered: .*torch"):
        select(W4, PACKING, "cpu", torch.bfloat16, 256, 512, requested="machete")


def test_requested_backend_that_cannot_run_gives_reason() -> None:
    with pytest.raises(
        ValueError, match=r"backend 'torch' cannot run the layer .*device 'hpu' not in \['cpu', 'cuda', 'xpu'\]"
    ):
        select(W4, PACKING, "hpu", torch.bfloat16, 256, 512, requested="torch")
    with pytest.raises(ValueError, match=r"activation dtype torch.int8"):
        select(W4, PACKING, "cpu", torch.int8, 256, 512, requested="torch")


def test_no_usable_backend_lists_each_rejection(monkeypatch) -> None:
    monkeypatch.setitem(registry._BACKENDS, "fake_gpu", _fake("fake_gpu", devices=("cuda",)))
    with pytest.raises(ValueError, match="no kernel backend can run the layer") as err:
        select(W4, PACKING, "cpu", torch.bfloat16, 256, 172)
    message = str(err.value)
    assert "fake_gpu: device 'cpu' not in ['cuda']" in message
    assert "torch: " in message and "out_features=172" in message


def test_unknown_packing_is_a_rejection_reason() -> None:
    reasons = dict((b.name, r) for b, r in candidates(W4, "awq_gemm_v9", "cpu", torch.bfloat16, 256, 512))
    assert "unknown packing format 'awq_gemm_v9'" in reasons["torch"]


def test_priority_missing_package_and_hint(monkeypatch, caplog) -> None:
    monkeypatch.setitem(
        registry._BACKENDS, "fast", _fake("fast", priority=30, requires=("signround-no-such-package>=1.0",))
    )
    monkeypatch.setitem(registry._BACKENDS, "medium", _fake("medium", priority=20))
    ranked = candidates(W4, PACKING, "cpu", torch.bfloat16, 256, 640)
    order = [b.name for b, _ in ranked]
    assert order[:4] == ["fast", "medium", "native", "torch_int4"] and order[-1] == "torch"
    assert "pip install 'signround-no-such-package>=1.0'" in ranked[0][1]
    with caplog.at_level(logging.INFO, logger="signround.kernels.registry"):
        chosen = select(W4, PACKING, "cpu", torch.bfloat16, 256, 640)
    assert chosen.name == "medium"
    assert "faster if installed: fast" in caplog.text
    # what no descriptor allows falls back to torch (asymmetric 8-bit, as on a machine without a C compiler)
    monkeypatch.delitem(registry._BACKENDS, "native")
    assert select(LayerSpec(bits=8, sym=False), PACKING, "cpu", torch.bfloat16, 256, 640).name == "torch"


def test_custom_check_and_divisibility(monkeypatch) -> None:
    monkeypatch.setitem(
        registry._BACKENDS,
        "picky",
        _fake(
            "picky", priority=19, out_features_multiple=64, check=lambda s, i, o: "needs i >= 512" if i < 512 else None
        ),
    )
    reasons = dict((b.name, r) for b, r in candidates(W4, PACKING, "cpu", torch.bfloat16, 256, 96))
    assert reasons["picky"] == "out_features=96 is not a multiple of 64"
    reasons = dict((b.name, r) for b, r in candidates(W4, PACKING, "cpu", torch.bfloat16, 256, 128))
    assert reasons["picky"] == "needs i >= 512"
    assert select(W4, PACKING, "cpu", torch.bfloat16, 512, 128).name == "picky"


def test_register_twice_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_backend(registry.get_backend("torch"))


def test_one_info_line_per_distinct_choice(caplog, cpu_int4_backend) -> None:
    registry._log_choice_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="signround.kernels.registry"):
        for in_f, out_f in ((256, 512), (512, 256), (256, 1024)):
            select(W4, PACKING, "cpu", torch.float32, in_f, out_f)
        select(LayerSpec(bits=8, group_size=128, sym=False), PACKING, "cpu", torch.float32, 256, 512)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("kernel backend")]
    asym_8bit = "native" if cpu_int4_backend == "native" else "torch"
    assert len(lines) == 2 and f"'{cpu_int4_backend}'" in lines[0] and f"'{asym_8bit}'" in lines[1]


def test_environment_probes_run_on_real_memory_inside_a_meta_context() -> None:
    """from_pretrained builds the model (and selects kernels) under torch.device("meta"); a probe that computes on
    tensors must still see real ones."""
    seen = []

    def probe() -> str | None:
        seen.append(torch.empty(1).device.type)
        return None

    with torch.device("meta"):
        assert _fake("probing", environment=probe).availability() is None
    assert seen == ["cpu"]
