"""Auto-round checkpoints signround cannot run go to Intel auto-round's own loader, or fail naming the scheme.

After ``import signround`` the quant_method ``"auto-round"`` loads through signround (:mod:`signround.hf_quantizer`).
The reference writes schemes signround has no kernel for (e.g. integer activations, ``act_bits=8`` with
``data_type="int"``); such a checkpoint must not become a dead end because signround took the name over.  When its
``quantization_config`` fails our validation, the checkpoint is handed to transformers' own classes for the name
(its ``AutoRoundConfig`` / ``AutoRoundQuantizer``, which call Intel's package) if that package is installed;
otherwise loading fails with one line naming the scheme and the package that loads it.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

logger = logging.getLogger(__name__)

INTEL_PACKAGE = "auto_round"  # the import name of Intel's auto-round (pip install auto-round)
_SCHEME_KEYS = ("bits", "group_size", "sym", "data_type", "act_bits", "act_data_type", "act_group_size", "act_dynamic")


def intel_loader_available() -> bool:
    """Whether Intel's auto-round can be imported (without importing it: it is heavy, and may not be needed)."""
    return importlib.util.find_spec(INTEL_PACKAGE) is not None


def describe_scheme(config_dict: dict[str, Any]) -> str:
    """The scheme fields a checkpoint's quantization_config sets, as ``key=value`` pairs."""
    return " ".join(f"{key}={config_dict[key]!r}" for key in _SCHEME_KEYS if key in config_dict)


def foreign_config(config_dict: dict[str, Any], error: ValueError, **kwargs: Any) -> Any:
    """Transformers' own ``AutoRoundConfig`` for a checkpoint config signround rejected with ``error``, when Intel's
    auto-round is installed to load it; else ValueError naming the scheme and what loads it."""
    scheme = describe_scheme(config_dict)
    if not intel_loader_available():
        raise ValueError(
            f"this auto-round checkpoint's scheme ({scheme}) is not one signround runs ({error}); install Intel's "
            "auto-round (pip install auto-round) to load it with its own loader"
        ) from error
    from transformers.utils.quantization_config import AutoRoundConfig as TransformersAutoRoundConfig

    logger.warning("signround cannot run this checkpoint's scheme (%s): loading it with Intel's auto-round", scheme)
    return TransformersAutoRoundConfig.from_dict(config_dict, **kwargs)


def foreign_quantizer(quantization_config: Any, **kwargs: Any) -> Any:
    """Transformers' own quantizer for a config :func:`foreign_config` handed over."""
    from transformers.quantizers.quantizer_auto_round import AutoRoundQuantizer

    return AutoRoundQuantizer(quantization_config, **kwargs)
