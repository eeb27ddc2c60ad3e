"""Tuning-time ratio against the reference, as adjacent pairs.

This VM's speed drifts by tens of percent within an hour, so one run of each tool far apart says little.
Each round runs signround's row (bench/accuracy.py) and then auto-round 0.16.1's default run of the same width and
iterations (bench/reference_autoround.py, in .venv-ref) back to back on the same setting; the ratio of each pair
and the median over rounds are printed and appended to bench/results/time_pairs.jsonl with both tools' ppl and KL.

    python bench/time_pair.py --rounds 2                       # W4G32 iters 50
    python bench/time_pair.py --rounds 1 --bits 2              # W2G32 iters 50
    python bench/time_pair.py --rounds 1 --iters 200           # the reference's default recipe length
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "results" / "time_pairs.jsonl"
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"


def _last_row(path: Path) -> dict:
    return json.loads(path.read_text().strip().splitlines()[-1])


def _ours(results: Path, bits: int, iters: int) -> dict:
    env_file = results / "ours.jsonl"
    name = f"signround-w{bits}" + ("" if iters == 50 else f"-iters{iters}")
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "accuracy.py"), "--run", name, "--results", str(env_file)], check=True
    )
    return _last_row(env_file)


def _reference(results: Path, bits: int, iters: int) -> dict:
    out = results / "ref.jsonl"
    subprocess.run(
        [str(REF_PYTHON), str(ROOT / "bench" / "reference_autoround.py"), "--bits", str(bits), "--iters", str(iters),
         "--out", str(out)],
        check=True,
    )  # fmt: skip
    return _last_row(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bits", type=int, choices=(4, 3, 2), default=4)
    parser.add_argument("--iters", type=int, choices=(50, 200), default=50)
    args = parser.parse_args()
    if not REF_PYTHON.exists():
        raise SystemExit("the reference venv is missing: run `make venv-ref` first")
    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            ours, ref = _ours(Path(tmp), args.bits, args.iters), _reference(Path(tmp), args.bits, args.iters)
            ratio = ours["tune_seconds"] / ref["tune_seconds"]
            ratios.append(ratio)
            row = {
                "round": i,
                "bits": args.bits,
                "iters": args.iters,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "signround_s": ours["tune_seconds"],
                "signround_ppl": ours["ppl"],
                "signround_kl": ours.get("kl"),
                "reference_s": ref["tune_seconds"],
                "reference_ppl": ref["ppl"],
                "reference_kl": ref.get("kl"),
                "commit": ours.get("commit"),
                "cpu_flags": ours.get("cpu", {}).get("cpu_flags"),
                "ratio": round(ratio, 3),
            }
            print(json.dumps(row), flush=True)
            with OUT.open("a") as f:
                f.write(json.dumps(row) + "\n")
    print(
        f"signround / auto-round W{args.bits} iters {args.iters} tuning time: pairs {[round(r, 3) for r in ratios]}, median {statistics.median(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
