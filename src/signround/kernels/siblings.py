"""Sibling layers that read the same input: one kernel call for all of them.

A decoder block projects one hidden state three times for attention (q, k, v) and twice for the MLP (gate, up).
At decode (one token), each projection is a small kernel call whose fixed cost (dispatch, threading, a pass
over the activation) is a large part of its time: on CPU, SmolLM2's seven int4 calls per block take 8.0 ms per
token where four calls over the same weights take 5.5 ms (``bench/speed.py --fusion``).  Backends whose kernel
gains from that override :meth:`QuantLinear.fuse_siblings`; the rest keep running layer by layer.

Which layers are siblings is architecture knowledge (the same table vLLM and GPTQModel keep as "packed modules");
the names below cover the Llama family and its descendants (Mistral, Qwen, Gemma, Phi, OPT, ...).  The guess only
decides speed, never results: a fused group checks at run time that its members really get the same input
tensor, and a member called with another input gets the product of its own rows (see
``torch_int4._FusedSiblings``).
"""

from __future__ import annotations

from torch import nn

from .base import QuantLinear

__all__ = ["SIBLING_SETS", "fuse_siblings"]

SIBLING_SETS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("query", "key", "value"),
    ("w1", "w3"),
)


def fuse_siblings(model: nn.Module) -> int:
    """Offer every complete sibling set of QuantLinear layers to its backend; returns how many sets were fused."""
    fused = 0
    for parent in model.modules():
        for names in SIBLING_SETS:
            members = [parent._modules.get(name) for name in names]
            if all(isinstance(m, QuantLinear) for m in members) and type(members[0]).fuse_siblings(members):
                fused += 1
    return fused
