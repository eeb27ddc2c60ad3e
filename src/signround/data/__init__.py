"""Calibration data: parse a dataset spec, read its sources, and build fixed-length token tensors.

``load_calibration(dataset, tokenizer, seqlen, nsamples, seed)`` is the one entry point (``load`` is the same
function under the name used in DESIGN.md); see :mod:`.spec` for the string syntax, :mod:`.sources` for the
accepted inputs and :mod:`.prepare` for the tokenisation rules.
"""

from .prepare import CalibrationSet, chunk_token_ids, load_calibration
from .sources import LOADERS, HubUnavailableError, register_loader
from .spec import OPTIONS, DatasetSpec, parse_dataset_spec

load = load_calibration

__all__ = [
    "LOADERS",
    "OPTIONS",
    "CalibrationSet",
    "DatasetSpec",
    "HubUnavailableError",
    "chunk_token_ids",
    "load",
    "load_calibration",
    "parse_dataset_spec",
    "register_loader",
]
