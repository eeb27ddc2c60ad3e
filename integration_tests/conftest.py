"""Re-use the fixtures of ``tests/conftest.py`` (shared model / data paths, tiny Llama, RTN checkpoint)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "tests" / "conftest.py"
if str(_PATH.parent) not in sys.path:  # tests/conftest.py imports tests/tiny_families.py
    sys.path.insert(0, str(_PATH.parent))
_NAME = "signround_tests_shared_fixtures"
if _NAME not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_NAME, _PATH)
    assert _spec is not None and _spec.loader is not None
    sys.modules[_NAME] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_NAME])
_shared = sys.modules[_NAME]

cpu_int4_backend = _shared.cpu_int4_backend
data_dir = _shared.data_dir
rtn_checkpoint = _shared.rtn_checkpoint
shakespeare = _shared.shakespeare
stories_dir = _shared.stories_dir
tiny_llama = _shared.tiny_llama
tiny_llama_factory = _shared.tiny_llama_factory
tiny_llama_dir = _shared.tiny_llama_dir
wikitext = _shared.wikitext
