"""signround: AutoRound-style (SignRound) weight-only quantization as a Transformers quantizer plugin.

Importing this package registers the plugin with Transformers (see :mod:`signround.hf_quantizer`).
"""

__version__ = "0.1.0"

from .api import AutoRound
from .config import RECIPES, AutoRoundConfig
from .hf_quantizer import SignRoundHfQuantizer, register_with_transformers

register_with_transformers()

__all__ = ["RECIPES", "AutoRound", "AutoRoundConfig", "SignRoundHfQuantizer", "__version__"]
