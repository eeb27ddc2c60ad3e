"""A run killed with SIGKILL, rerun with the same command, continues after its last finished block and writes
the same bytes as an uninterrupted run; a kill during the final save leaves the previous output intact."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from signround.streaming import output_digests

SIGNROUND = Path(sys.executable).with_name("signround")
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")


def _command(stories_dir: Path, shakespeare: Path, out: Path, iters: int = 10) -> list[str]:
    return [
        str(SIGNROUND), "--model", str(stories_dir), "--group_size", "32", "--iters", str(iters), "--nsamples", "8",
        "--seqlen", "64", "--batch_size", "4", "--dataset", str(shakespeare), "--output_dir", str(out),
    ]  # fmt: skip


def _digests(directory: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(directory.iterdir())}


def _kill_when(command: list[str], appeared, timeout: float = 240) -> None:
    """Start ``command`` and SIGKILL it as soon as ``appeared()`` is true."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        while not appeared():
            if proc.poll() is not None:
                raise AssertionError(f"the run ended before it could be killed:\n{proc.stderr.read()[-3000:]}")
            assert time.monotonic() < deadline, "timed out waiting for the moment to kill"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def uninterrupted_dir(tmp_path_factory, stories_dir, shakespeare) -> Path:
    out = tmp_path_factory.mktemp("full") / "out"
    subprocess.run(_command(stories_dir, shakespeare, out), check=True, capture_output=True, timeout=300)
    assert not (out.parent / ".out.signround-resume").exists(), "a finished run leaves no work directory"
    return out


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_dir) -> dict[str, str]:
    return _digests(uninterrupted_dir)


@pytest.fixture(scope="module")
def uninterrupted_tensors(uninterrupted_dir) -> dict[str, str]:
    return output_digests(uninterrupted_dir, files=False)


def test_killed_after_block_2_resumes_to_identical_bytes(uninterrupted, tmp_path, stories_dir, shakespeare):
    out = tmp_path / "out"
    work = tmp_path / ".out.signround-resume"
    command = _command(stories_dir, shakespeare, out)
    _kill_when(command, lambda: (work / "block-0002.safetensors").exists())
    assert not out.exists(), "nothing is visible at the output path before the final save"

    # another config refuses to resume, naming what changed
    changed = subprocess.run(
        _command(stories_dir, shakespeare, out, iters=11), capture_output=True, text=True, timeout=300
    )
    assert changed.returncode == 2 and "the config differs from the interrupted run" in changed.stderr, changed.stderr[
        -2000:
    ]

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    resumed = [line for line in rerun.stderr.splitlines() if "resuming from" in line]
    assert resumed and "continuing at block" in resumed[0], rerun.stderr[-3000:]
    assert int(resumed[0].rsplit(" ", 1)[1]) >= 2  # at most the block being tuned at the kill is redone
    assert _digests(out) == uninterrupted
    assert not work.exists()


def test_killed_during_the_final_save_keeps_the_previous_output(uninterrupted, tmp_path, stories_dir, shakespeare):
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("an earlier output")
    command = _command(stories_dir, shakespeare, out)

    def saving() -> bool:
        return any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())

    _kill_when(command, saving)
    assert (out / "previous.txt").read_text() == "an earlier output"
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "continuing at block 5" in rerun.stderr  # every block was done: only the save is redone
    assert _digests(out) == uninterrupted


def test_streaming_run_killed_after_block_2_and_during_the_save_resumes_to_identical_tensors(
    uninterrupted_tensors, tmp_path, stories_dir, shakespeare
):
    """``--low_cpu_mem_usage`` writes each block to its shard as it finishes.  Killed after block 2, the rerun
    takes the finished blocks from their shards (not read again); killed again during the save, the next rerun
    only saves.  The tensors equal the in-memory run's."""
    out = tmp_path / "out"
    work = tmp_path / ".out.signround-resume"
    command = [*_command(stories_dir, shakespeare, out), "--low_cpu_mem_usage"]
    _kill_when(command, lambda: (work / "block-0002.safetensors").exists())
    assert (work / "shards" / "block-00002.safetensors").is_file()  # written before the block's resume record
    assert not out.exists()

    def saving() -> bool:
        return any(p.name.startswith(".out.tmp-") for p in tmp_path.iterdir())

    _kill_when(command, saving)
    assert not out.exists()
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "continuing at block 5" in rerun.stderr
    assert "5 finished blocks are in their shards already: not read again" in rerun.stderr
    assert len(list(out.glob("model-*-of-00006.safetensors"))) == 6
    assert output_digests(out, files=False) == uninterrupted_tensors
    assert not work.exists()
