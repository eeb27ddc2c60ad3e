"""A model whose layers run on different kernels, chosen per layer at load: 4-bit and 3-bit layers on the CPU's
int4 kernel (``native``, or ``torch_int4`` without a C compiler), symmetric 8-bit ones on ``native`` (or
``torch_int8``), a 4-bit one in groups of 16 on ``native`` (or, without a compiler, the ``torch`` reference:
torch_int4 takes groups of 32 and up); outputs, saving and forcing a backend."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import signround
from signround import AutoRoundConfig
from signround.layers import quant_linears

MIXED = {"mlp.down_proj": {"bits": 3}, "self_attn.v_proj": {"bits": 8}, "self_attn.o_proj": {"group_size": 16}}


def _logits(model) -> torch.Tensor:
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def mixed_checkpoint(tmp_path_factory, tiny_llama_dir):
    out = tmp_path_factory.mktemp("mixed") / "model"
    layer_config = {f"model.layers.{i}.{name}": spec for i in range(2) for name, spec in MIXED.items()}
    ar = signround.AutoRound(
        str(tiny_llama_dir), bits=4, group_size=32, sym=True, iters=0, disable_opt_rtn=True,
        layer_config=layer_config, show_progress=False,
    )  # fmt: skip
    ar.quantize_and_save(out, format="auto_round")
    return out


def test_each_layer_gets_the_best_backend_that_can_run_it(mixed_checkpoint, tmp_path, cpu_int4_backend) -> None:
    auto = AutoModelForCausalLM.from_pretrained(mixed_checkpoint, dtype=torch.float32)
    chosen = {name: layer.backend_name for name, layer in quant_linears(auto).items()}
    assert len(chosen) == 2 * 7
    group_16 = cpu_int4_backend if cpu_int4_backend == "native" else "torch"
    w8 = "native" if cpu_int4_backend == "native" else "torch_int8"
    expected_by_layer = {"v_proj": w8, "o_proj": group_16}  # every other layer: 3 or 4 bits, groups of 32
    for name, backend in chosen.items():
        expected = expected_by_layer.get(name.rsplit(".", 1)[-1], cpu_int4_backend)
        assert backend == expected, (name, backend)
    exact = AutoModelForCausalLM.from_pretrained(
        mixed_checkpoint, dtype=torch.float32, quantization_config=AutoRoundConfig(backend="torch")
    )
    assert {layer.backend_name for layer in quant_linears(exact).values()} == {"torch"}
    got, expected = _logits(auto), _logits(exact)
    assert float((got - expected).abs().max() / expected.abs().max()) < 2e-2  # torch_int4 would compute in bf16
    # saving the mixed model writes the checkpoint it was loaded from
    auto.save_pretrained(tmp_path / "again")
    again = AutoModelForCausalLM.from_pretrained(
        tmp_path / "again", dtype=torch.float32, quantization_config=AutoRoundConfig(backend="torch")
    )
    assert torch.equal(_logits(again), expected)


def test_forcing_a_backend_that_cannot_run_a_layer_names_it(mixed_checkpoint) -> None:
    with pytest.raises(
        ValueError,
        match=r"layer 'model.layers.0.self_attn.v_proj': backend 'torch_int4' cannot run .*bits=8 not in \[2, 3, 4\]",
    ):
        AutoModelForCausalLM.from_pretrained(
            mixed_checkpoint, quantization_config=AutoRoundConfig(backend="torch_int4")
        )


def test_fresh_process_loads_a_4bit_checkpoint_on_the_cpu_int4_kernel(rtn_checkpoint, cpu_int4_backend) -> None:
    """The first backend check of a process runs inside from_pretrained's meta-device context (a regression: the
    torch_int4 layout probe once ran on meta tensors there and failed; native's self-test runs there too);
    only a fresh process sees that."""
    import subprocess
    import sys

    code = (
        "import sys, signround, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        "from signround.layers import quant_linears\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "print(sorted({l.backend_name for l in quant_linears(m).values()}))\n"
        "print(bool(torch.isfinite(m(torch.tensor([[1, 2, 3]])).logits).all()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(rtn_checkpoint)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == [f"['{cpu_int4_backend}']", "True"]
