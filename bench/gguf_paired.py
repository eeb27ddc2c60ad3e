"""Two GGUF anchor rows compared window by window: is a perplexity gap larger than the windows' spread?

    .venv/bin/python bench/gguf_paired.py --a gguf_signround.jsonl:type=Q4_K_M,iters=0 \
        --b gguf_signround.jsonl:type=Q4_K_M,iters=50

Each selector is ``FILE:KEY=VALUE,...`` (FILE under bench/results/); the newest row of FILE whose fields equal
those values (compared as text) and which carries ``window_nll`` (rows scored by bench/gguf_llama_eval_worker.py
since it reports them) is taken.  Both rows must cover the same windows.  Printed: the ppl ratio b / a, the mean
per-token NLL difference, and its 95 % interval from the spread of the 40 windows' differences (a paired
t-interval over windows: tokens inside one window are not independent, windows nearly are).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
T_975 = {39: 2.023}  # Student's t, two-sided 95 %, by degrees of freedom (the anchor's 40 windows)


def select(selector: str) -> dict:
    """The newest row matching ``FILE:KEY=VALUE,...`` that has per-window NLLs."""
    name, _, conditions = selector.partition(":")
    wanted = dict(item.split("=", 1) for item in conditions.split(",") if item)
    rows = [json.loads(line) for line in (RESULTS / name).read_text().splitlines() if line.strip()]
    matches = [r for r in rows if "window_nll" in r and all(str(r.get(k)) == v for k, v in wanted.items())]
    if not matches:
        raise SystemExit(f"no row of {name} with {wanted} carries window_nll")
    return matches[-1]


def compare(a: dict, b: dict) -> dict:
    """Paired per-window comparison of two rows' NLLs (each window: 511 scored tokens)."""
    na, nb = np.asarray(a["window_nll"]), np.asarray(b["window_nll"])
    if na.shape != nb.shape:
        raise SystemExit(f"rows cover different windows: {na.shape} vs {nb.shape}")
    tokens = round(na.sum() / math.log(a["ppl"]))  # the scored tokens: ppl = exp(sum of window NLLs / tokens)
    diff = (nb - na) * na.size / tokens  # per window, as a contribution to the mean per-token NLL difference
    mean = float(diff.mean())
    half = T_975.get(na.size - 1, 1.96) * float(diff.std(ddof=1)) / math.sqrt(na.size)
    return {
        "ppl_ratio": math.exp(mean),
        "nll_diff": mean,
        "interval_95": (mean - half, mean + half),
        "windows_b_lower": int((nb < na).sum()),
        "windows": int(na.size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--a", required=True)
    parser.add_argument("--b", required=True)
    args = parser.parse_args()
    a, b = select(args.a), select(args.b)
    c = compare(a, b)
    lo, hi = c["interval_95"]
    print(f"a: ppl {a['ppl']:.3f} kl {a['kl']:.5f} entropy {a.get('entropy', float('nan')):.4f}  ({args.a})")
    print(f"b: ppl {b['ppl']:.3f} kl {b['kl']:.5f} entropy {b.get('entropy', float('nan')):.4f}  ({args.b})")
    print(f"fp32 entropy {a.get('ref_entropy', float('nan')):.4f}")
    print(
        f"ppl b / a = {c['ppl_ratio']:.4f}; NLL difference {c['nll_diff']:+.5f} nats/token, 95 % interval "
        f"[{lo:+.5f}, {hi:+.5f}] (ppl ratio {math.exp(lo):.4f} .. {math.exp(hi):.4f}); "
        f"b lower on {c['windows_b_lower']} of {c['windows']} windows"
    )


if __name__ == "__main__":
    main()
