"""Tensor by tensor: signround's GGUF blocks against ``llama-quantize --imatrix``'s, on every K-type tensor.

    .venv/bin/python bench/gguf_tensor_error.py --types Q4_K_M Q3_K_M Q2_K Q6_K [--iters 0 50]

Why: SmolLM2's 576-wide rows are not a multiple of 256, so in its "K" files llama.cpp stores most tensors in legacy
types; a whole-file perplexity then says little about the K-quant blocks themselves.  This compares them directly:
for each tensor the (a') file stores in a K type, the activation-weighted reconstruction error
``sum_ij imatrix_j (w_ij - q_ij)^2`` of llama.cpp's blocks and of ours (the ``signround-<type>-iters<N>.gguf`` files
bench/gguf_signround.py leaves in ``--work``), with ``imatrix_j`` llama-imatrix's own per-column mean ``x^2`` (the
objective llama.cpp's quantizer minimises) and ``w`` the f32 file's weights.  Both files are dequantized by gguf-py.
Needs bench/gguf_llamacpp.py's work directory (f32 file, imatrix) and the llama-quantize binary it builds.  One JSON
row per (type, iters) with the per-tensor ratios, appended to bench/results/gguf_tensor_error.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType as Q
from gguf.quants import dequantize

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_llamacpp import BIN, MODEL, cpu_info

RESULTS = Path(__file__).resolve().parent / "results" / "gguf_tensor_error.jsonl"
K_TYPES = {Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K}


def tensors_of(path: Path) -> dict:
    return {t.name: t for t in GGUFReader(path).tensors}


def _weights(t) -> np.ndarray:
    """The tensor as float32 ``[rows, cols]`` (gguf-py's row-major numpy order)."""
    return dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1, int(t.shape[0]))


def importance_of(path: Path) -> dict[str, np.ndarray]:
    """llama-imatrix's per-column mean ``x^2`` per weight name (``in_sum2 / counts``)."""
    tensors = tensors_of(path)
    out = {}
    for name, t in tensors.items():
        if name.endswith(".in_sum2"):
            weight = name[: -len(".in_sum2")]
            out[weight] = np.asarray(t.data, dtype=np.float64) / float(tensors[weight + ".counts"].data[0])
    return out


def compare(f32: Path, ours: Path, theirs: Path, importance: dict[str, np.ndarray]) -> list[dict]:
    """Per K-type tensor of ``theirs``: both files' weighted errors (the types must agree tensor by tensor)."""
    ref, mine, llama = tensors_of(f32), tensors_of(ours), tensors_of(theirs)
    rows = []
    for name, t in llama.items():
        if t.tensor_type not in K_TYPES:
            continue
        if mine[name].tensor_type != t.tensor_type:
            raise SystemExit(
                f"{name}: {ours.name} stores {mine[name].tensor_type.name}, llama.cpp {t.tensor_type.name}"
            )
        w = _weights(ref[name]).astype(np.float64)
        imp = importance.get(name)  # llama-imatrix collects no output.weight: weigh its columns alike
        weighted = imp is not None
        imp = np.ones(w.shape[1]) if imp is None else imp
        err_ours = float((((w - _weights(mine[name])) ** 2) * imp).sum())
        err_llama = float((((w - _weights(t)) ** 2) * imp).sum())
        rows.append(
            {"tensor": name, "type": t.tensor_type.name, "ours": err_ours, "llama": err_llama, "imatrix": weighted}
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K", "Q6_K"])
    parser.add_argument("--iters", nargs="+", type=int, default=[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf-llamacpp"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    f32, imatrix = args.work / f"{MODEL}-f32.gguf", args.work / "imatrix.gguf"
    for needed in (f32, imatrix, BIN / "llama-quantize"):
        if not needed.exists():
            raise SystemExit(f"missing {needed}: run bench/gguf_llamacpp.py --imatrix first (it builds and keeps them)")
    importance = importance_of(imatrix)
    for type_name in args.types:
        theirs = args.work / f"{MODEL}-{type_name}-imatrix-kept.gguf"
        if not theirs.exists():
            cmd = [str(BIN / "llama-quantize"), "--imatrix", str(imatrix), str(f32), str(theirs), type_name, "2"]
            subprocess.run(cmd, check=True, capture_output=True)
        for iters in args.iters:
            ours = args.work / f"signround-{type_name}-iters{iters}.gguf"
            if not ours.exists():
                print(f"skip {type_name} iters={iters}: no {ours} (bench/gguf_signround.py writes it)")
                continue
            per_tensor = compare(f32, ours, theirs, importance)
            total_ours, total_llama = sum(r["ours"] for r in per_tensor), sum(r["llama"] for r in per_tensor)
            row = {
                "model": MODEL, "type": type_name, "iters": iters, "k_tensors": len(per_tensor),
                "ours_lower": sum(r["ours"] < r["llama"] for r in per_tensor),
                "error_ratio_total": total_ours / total_llama,
                "error_ratio_median": float(np.median([r["ours"] / r["llama"] for r in per_tensor])),
                "error_ratio_max": max(r["ours"] / r["llama"] for r in per_tensor),
                "per_tensor": per_tensor, "cpu": cpu_info(), "command": shlex.join(sys.argv),
            }  # fmt: skip
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{type_name} iters={iters}: {row['ours_lower']}/{row['k_tensors']} K tensors lower than llama.cpp's; "
                f"error ratio total {row['error_ratio_total']:.4f} median {row['error_ratio_median']:.4f} "
                f"max {row['error_ratio_max']:.4f}"
            )


if __name__ == "__main__":
    main()
