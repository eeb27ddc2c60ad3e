"""``enable_minmax_tuning``: which layers' clipping factors move with the rounding (by default only where no search
placed them: plain-RTN integer starts and the fp grids; not optimised-RTN integer starts nor the GGUF grids)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from signround.schemes import LayerSpec, gguf_spec_fields, scheme_fields
from signround.tuning import block as block_module
from signround.tuning.block import LayerStart, TuneOptions, run_block, tune_block
from signround.tuning.inputs import capture_block_inputs
from signround.tuning.rtn import plain_rtn_params


def _tuned(
    tiny_llama_factory, spec: LayerSpec, enable: bool | None, monkeypatch, disable_opt_rtn: bool = False
) -> dict[str, dict[str, bool]]:
    """Per layer, whether its ``v``, ``alpha`` and ``beta`` ended where they started after 10 steps."""
    model = tiny_llama_factory(seed=1, initializer_range=0.2)
    for p in model.parameters():
        p.requires_grad_(False)
    ids = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(2))
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, block, ids)
    targets = run_block(block, inputs, 8)
    linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    integer = spec.data_type == "int"  # (its start's clipping: alpha = beta = 1 here, searched or not)
    layers = {n: (m, spec, plain_rtn_params(m.weight, spec) if integer else LayerStart()) for n, m in linears.items()}
    starts: dict[str, list[torch.Tensor]] = {}  # per layer: v (zeros), alpha, beta as the loop got them
    seen: dict[str, dict[str, bool]] = {}
    tunable, clamp = LayerStart.tunable, block_module.clamp_after_step

    def recording_tunable(self, linear, spec, scale_dtype):
        tl = tunable(self, linear, spec, scale_dtype)
        name = next(n for n, m in linears.items() if m is linear)
        starts[name] = [p.detach().clone() for p in (tl.v, tl.alpha, tl.beta)]
        return tl

    def spying_clamp(tunables, norms):  # after every step: which parameters have left their start
        clamp(tunables, norms)
        for n, tl in tunables.items():
            now = (tl.v, tl.alpha, tl.beta)
            seen[n] = {k: not torch.equal(p, s) for k, p, s in zip(("v", "alpha", "beta"), now, starts[n], strict=True)}

    monkeypatch.setattr(block_module, "clamp_after_step", spying_clamp)
    monkeypatch.setattr(LayerStart, "tunable", recording_tunable)
    options = TuneOptions(
        iters=10, batch_size=4, show_progress=False, amp=False, lr=0.05, enable_minmax_tuning=enable,
        enable_norm_bias_tuning=False, disable_opt_rtn=disable_opt_rtn,
    )  # fmt: skip
    with torch.enable_grad():
        tune_block(block, layers, inputs, targets, options)
    return seen


GRIDS = {
    "int": LayerSpec(bits=4, group_size=32),  # optimised-RTN start: its clipping was searched
    "int-plain-start": LayerSpec(bits=4, group_size=32),  # disable_opt_rtn: nothing searched it
    "gguf": LayerSpec(**gguf_spec_fields("q4_1")),  # llama.cpp's search placed each sub-block's scale and min
    "fp": LayerSpec(**scheme_fields("MXFP4")),  # full block ranges
}
AUTOMATIC = {"int": False, "int-plain-start": True, "gguf": False, "fp": True}


@pytest.mark.parametrize("enable", [None, True, False])
@pytest.mark.parametrize("grid", list(GRIDS))
def test_clipping_moves_where_minmax_tuning_is_on(tiny_llama_factory, monkeypatch, grid: str, enable) -> None:
    moved = _tuned(tiny_llama_factory, GRIDS[grid], enable, monkeypatch, disable_opt_rtn=grid == "int-plain-start")
    expected = enable if enable is not None else AUTOMATIC[grid]
    assert moved and all(m["v"] for m in moved.values())  # the rounding is tuned either way
    assert all((m["alpha"] or m["beta"]) == expected for m in moved.values()), moved


@pytest.mark.parametrize(
    ("kwargs", "warned"),
    [
        ({"minmax_lr": 1e-3}, True),  # optimised-RTN start: the clipping is kept, the rate unused
        ({"minmax_lr": 1e-3, "enable_minmax_tuning": True}, False),
        ({"minmax_lr": 1e-3, "disable_opt_rtn": True}, False),  # a plain start: its clipping is tuned
        ({"minmax_lr": 1e-3, "iters": 0}, False),  # nothing is tuned: nothing to say about the rate
        ({}, False),
    ],
)
def test_an_unused_minmax_lr_is_named(caplog, kwargs: dict, warned: bool) -> None:
    from signround.api import tune_options
    from signround.config import AutoRoundConfig

    config = AutoRoundConfig(**{"bits": 4, "group_size": 32, "iters": 10, **kwargs})
    with caplog.at_level("WARNING", logger="signround.api"):
        tune_options(config, show_progress=False)
    assert ("minmax_lr=0.001 has no effect" in caplog.text) == warned, caplog.text
