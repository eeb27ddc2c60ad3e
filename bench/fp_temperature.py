"""Is the fp32 model over-confident on the evaluation text?  Its perplexity with its logits divided by T.

    .venv/bin/python bench/fp_temperature.py [--temperatures 0.9 0.95 1 1.05 1.1 1.2] [--work /tmp/gguf-llamacpp]

Reads the fp32 log-probs and windows that bench/gguf_llamacpp.py's ``Bench.prepare`` cached (the GGUF anchor's 40
x 512 wikitext-2 windows; it prepares them when missing) and prints, per temperature ``T``, the perplexity of
``log_softmax(logp / T)`` (``T = 1``: the model itself).  Where some ``T > 1`` scores a lower perplexity than
``T = 1``, a uniform flattening of the model's distributions lowers perplexity on this text although it moves
every distribution away from the model's (KL > 0): a quantized file whose error happens to flatten can score a
lower perplexity than one closer to the model, which is why the GGUF anchor is read in KL as well as perplexity.
The output is one JSON row, appended to ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import checkout_commit
from gguf_llamacpp import MODEL, Bench, cpu_info

from signround.fetch import cached_model_path

RESULTS = Path(__file__).resolve().parent / "results" / "fp_temperature.jsonl"


def perplexities(logprobs: np.ndarray, windows: torch.Tensor, temperatures: list[float]) -> dict[float, float]:
    """exp(mean NLL of tokens 1..L-1 of every window) under ``log_softmax(logprobs / T)``, one window at a time."""
    nll, count = dict.fromkeys(temperatures, 0.0), 0
    for w in range(windows.shape[0]):
        logp = torch.from_numpy(np.asarray(logprobs[w], dtype=np.float32))[:-1]
        target = windows[w, 1:, None]
        for t in temperatures:
            nll[t] -= torch.log_softmax(logp / t, dim=-1).gather(-1, target).sum().item()
        count += target.shape[0]
    return {t: math.exp(nll[t] / count) for t in temperatures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--temperatures", nargs="+", type=float, default=[0.9, 0.95, 1.0, 1.05, 1.1, 1.2])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf-llamacpp"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench = Bench(args.work, args.threads)
    bench.prepare(cached_model_path("smollm2-135m"))
    windows = torch.from_numpy(np.load(bench.windows).astype(np.int64))
    ppl = perplexities(np.load(bench.ref, mmap_mode="r"), windows, args.temperatures)
    row = {
        "model": MODEL, "text": bench.eval_text.name, "n_windows": int(windows.shape[0]),
        "ppl_by_temperature": {f"{t:g}": round(p, 3) for t, p in ppl.items()},
        "cpu": cpu_info(), "commit": checkout_commit(), "command": shlex.join(sys.argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    for t, p in ppl.items():
        print(f"T={t:g}: ppl {p:.3f}")


if __name__ == "__main__":
    main()
