"""The selection matrix: which backend each kind of layer gets on each device, with every package installed and
with none, and why the better ones were passed over.  Written as a table of expected choices (the reference's
priority marlin > exllamav2 > triton > torch on CUDA; native > torch_int4 / torch_int8 > ipex > torch on CPU; ipex on XPU;
hpu on Gaudi), so a descriptor change that alters a choice fails here by name."""

from __future__ import annotations

import logging

import pytest
import torch

from signround.kernels import Backend, candidates, select
from signround.schemes import LayerSpec

ALL = "all installed"
NONE = "none installed"
BARE = "none installed, no C compiler"
NO_CC = "all installed, no C compiler"
PACKING = "auto_round:auto_gptq"
F16, BF16, F32 = torch.float16, torch.bfloat16, torch.float32


@pytest.fixture
def installed(monkeypatch):
    """Set which optional stacks are present: ``ALL`` (every requirement met, every vendor stack imports, a C
    compiler), ``NONE`` (no optional package: torch's own CPU kernels, torch_int4 and torch_int8, and our compiled
    native remain), ``BARE`` (``NONE`` without a C compiler: native cannot be built) or ``NO_CC``
    (``ALL`` without a C compiler)."""

    def setup(which: str) -> None:
        def availability(self: Backend) -> str | None:
            if self.name == "native" and which in (BARE, NO_CC):
                return "native kernel unavailable: no C compiler found (cc / gcc / clang not on PATH; install a C compiler, or set CC)"
            if (
                which in (ALL, NO_CC)
                or (not self.requires and self.environment is None)
                or self.name in ("torch_int4", "torch_int8", "native")
            ):
                return None
            return f"needs {self.requires or 'its vendor stack'} (pip install ...)"

        monkeypatch.setattr(Backend, "availability", availability)

    return setup


# (device, bits, group, sym, dtype, in, out, installed) -> expected backend
MATRIX = [
    # CUDA
    ("cuda", 4, 128, True, F16, 4096, 4096, ALL, "marlin"),
    ("cuda", 4, 128, True, BF16, 4096, 11008, ALL, "marlin"),
    ("cuda", 8, 128, True, F16, 4096, 4096, ALL, "marlin"),
    ("cuda", 4, 128, False, F16, 4096, 4096, ALL, "exllamav2"),  # Marlin is symmetric-only
    ("cuda", 4, 128, True, F16, 4096, 4128, ALL, "exllamav2"),  # out % 64 != 0: not on Marlin's tile
    ("cuda", 4, 256, True, F16, 4096, 4096, ALL, "triton"),  # group 256: neither GPTQModel kernel
    ("cuda", 8, 128, False, F16, 4096, 4096, ALL, "triton"),  # ExLlamaV2 is 4-bit only
    ("cuda", 2, 32, True, BF16, 4096, 4096, ALL, "triton"),
    ("cuda", 4, 128, True, F32, 4096, 4096, ALL, "triton"),  # fp32 activations: only Triton and torch
    ("cuda", 3, 128, True, F16, 4096, 4096, ALL, "torch"),  # 3-bit codes straddle words: torch only
    ("cuda", 4, 128, True, F16, 4096, 4096, NONE, "torch"),
    # CPU
    ("cpu", 4, 128, True, BF16, 4096, 4096, ALL, "native"),
    ("cpu", 4, 32, False, F32, 576, 1536, NONE, "native"),  # needs a C compiler, no package
    ("cpu", 4, 32, False, F32, 576, 1536, BARE, "torch_int4"),  # no compiler: torch's own int4 kernel
    ("cpu", 4, -1, True, BF16, 4096, 4096, ALL, "native"),
    ("cpu", 4, -1, True, BF16, 4096, 4096, BARE, "torch_int4"),  # per-channel: run as kernel groups of 256
    ("cpu", 4, 512, False, F32, 4096, 4096, BARE, "torch_int4"),
    ("cpu", 4, 16, True, BF16, 4096, 4096, ALL, "native"),  # any even group
    ("cpu", 4, 16, True, BF16, 4096, 4096, BARE, "torch"),  # groups of 16: below torch_int4's 32
    ("cpu", 4, 16, True, BF16, 4096, 4096, NO_CC, "ipex"),
    ("cpu", 4, 16, True, F32, 4096, 4096, NO_CC, "torch"),  # IPEX takes bf16 / fp16 activations
    ("cpu", 2, 128, True, BF16, 4096, 4096, ALL, "native"),  # 2/3-bit codes run as 4-bit ones, exactly
    ("cpu", 2, 128, True, BF16, 4096, 4096, BARE, "torch_int4"),
    ("cpu", 3, 64, False, F32, 4096, 4096, NONE, "native"),
    ("cpu", 8, 128, True, BF16, 4096, 4096, ALL, "native"),
    ("cpu", 8, 128, True, BF16, 4096, 4096, BARE, "torch_int8"),
    ("cpu", 8, -1, True, F32, 576, 1536, BARE, "torch_int8"),  # per-channel: one kernel call
    ("cpu", 8, 128, False, BF16, 4096, 4096, NONE, "native"),
    ("cpu", 8, 128, False, BF16, 4096, 4096, BARE, "torch"),  # asymmetric 8-bit without a compiler: the reference
    # Intel GPU
    ("xpu", 4, 128, True, F16, 4096, 4096, ALL, "ipex"),
    ("xpu", 8, 128, True, F16, 4096, 4096, ALL, "triton"),
    ("xpu", 3, 128, True, F16, 4096, 4096, ALL, "torch"),
    ("xpu", 4, 128, True, F16, 4096, 4096, NONE, "torch"),
    # Gaudi
    ("hpu", 4, 128, True, BF16, 4096, 4096, ALL, "hpu"),
]


@pytest.mark.parametrize(
    ("device", "bits", "group", "sym", "dtype", "in_f", "out_f", "which", "expected"),
    MATRIX,
    ids=[f"{r[0]}-w{r[1]}g{r[2]}{'s' if r[3] else 'a'}-{str(r[4])[6:]}-{r[5]}x{r[6]}-{r[7][:4]}" for r in MATRIX],
)
def test_selection_matrix(installed, device, bits, group, sym, dtype, in_f, out_f, which, expected) -> None:
    installed(which)
    spec = LayerSpec(bits=bits, group_size=group, sym=sym)
    ranked = candidates(spec, PACKING, device, dtype, in_f, out_f)
    chosen = select(spec, PACKING, device, dtype, in_f, out_f)
    assert chosen.name == expected
    for backend, reason in ranked:  # everything ranked above the choice says why it was passed over
        if backend.name == expected:
            break
        assert reason, backend.name


REASONS = [
    # (device, bits, group, sym, dtype, in, out, which, backend, fragment of its rejection reason)
    ("cuda", 4, 128, False, F16, 4096, 4096, ALL, "marlin", "sym=False not supported"),
    ("cuda", 4, 128, True, F16, 4096, 4128, ALL, "marlin", "not a multiple of 64"),
    ("cuda", 4, 256, True, F16, 4096, 4096, ALL, "exllamav2", "group_size=256 not in [-1, 32, 64, 128]"),
    ("cuda", 3, 128, True, F16, 4096, 4096, ALL, "triton", "bits=3 not in [2, 4, 8]"),
    ("cuda", 4, 128, True, F16, 4096, 4096, NONE, "marlin", "pip install"),
    ("cpu", 4, 16, True, BF16, 4096, 4096, ALL, "torch_int4", "group of 16 input features is not a multiple of 32"),
    ("cpu", 4, 128, True, BF16, 4096, 4096, BARE, "native", "no C compiler found"),
    ("cpu", 4, 16, True, BF16, 4096, 4096, BARE, "ipex", "pip install"),
    ("cpu", 4, 128, True, BF16, 4096, 4096, ALL, "marlin", "device 'cpu' not in ['cuda']"),
    ("cpu", 4, -1, True, F32, 4096, 4096, ALL, "ipex", "activation dtype torch.float32 not in"),
    ("hpu", 8, 128, True, BF16, 4096, 4096, ALL, "hpu", "bits=8 not in [4]"),
]


@pytest.mark.parametrize(
    ("device", "bits", "group", "sym", "dtype", "in_f", "out_f", "which", "backend", "fragment"), REASONS
)
def test_rejection_reasons(installed, device, bits, group, sym, dtype, in_f, out_f, which, backend, fragment) -> None:
    installed(which)
    spec = LayerSpec(bits=bits, group_size=group, sym=sym)
    reasons = {b.name: r for b, r in candidates(spec, PACKING, device, dtype, in_f, out_f)}
    assert fragment in (reasons[backend] or ""), reasons[backend]


def test_hpu_8bit_has_no_backend_and_lists_why(installed) -> None:
    installed(ALL)
    with pytest.raises(ValueError, match="no kernel backend can run the layer") as err:
        select(LayerSpec(bits=8, group_size=128), PACKING, "hpu", BF16, 4096, 4096)
    assert "hpu: bits=8 not in [4]" in str(err.value) and "torch: device 'hpu'" in str(err.value)


@pytest.mark.parametrize(("which", "hinted"), [(NO_CC, True), (ALL, False)])
def test_a_missing_c_compiler_is_hinted_as_installable(installed, caplog, which: str, hinted: bool) -> None:
    """Without a compiler the CPU layers go to torch_int4, and the INFO line says native would be faster."""
    installed(which)
    with caplog.at_level(logging.INFO, logger="signround.kernels.registry"):
        chosen = select(LayerSpec(bits=4, group_size=64, sym=False), PACKING, "cpu", F32, 1024, 320)
    assert chosen.name == ("torch_int4" if hinted else "native")
    assert ("faster if installed: native (native kernel unavailable: no C compiler found" in caplog.text) is hinted
