"""Our side of the GGUF anchor: SmolLM2-135M GGUF files from signround, scored by llama.cpp itself.

    .venv/bin/python bench/gguf_signround.py --types Q4_0 Q4_K_M --iters 0 50 [--lr 5e-3] [--out ...jsonl]

For each type and iters: ``AutoRound(smollm2, format="gguf:<type>", iters=N)`` with bench/accuracy.py's
calibration (tinyshakespeare, 32 x 256 tokens, batch 8), written to a .gguf, then evaluated by llama.cpp on the same
40 x 512 wikitext-2 windows and fp32 log-probs as bench/gguf_llamacpp.py's llama.cpp rows (its ``Bench`` prepares
and scores both sides, so the rows compare).  iters 0 is llama.cpp's own quantizer with the calibration data as
its importance matrix (byte-identical to ``llama-quantize --imatrix`` for the per-column mean ``x^2`` our engine
measures on the quantized stream; rows dated before that change are ``llama-quantize`` without one); iters > 0 is
SignRound toward the same grids, from that start.  One JSON row per (type, iters), appended, with the commit it
measured; a row already present for the same commit and arguments is skipped.

``--calib wikitext-heldout`` calibrates (importance and tuning alike) on wikitext-2 text that the evaluation never
reads (the test file from twice the evaluated tokens on): a calibration text of the evaluation's domain, to tell
what tuning does when the calibration is like the use from what a shift of domain does (tinyshakespeare).
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import checkout_commit
from gguf_llamacpp import CALIB, CALIB_N, CALIB_SEQLEN, EVAL, EVAL_N, EVAL_SEQLEN, MODEL, Bench, cpu_info

import signround
from signround.fetch import cached_model_path
from signround.tuning.signsgd import default_lr

RESULTS = Path(__file__).resolve().parent / "results" / "gguf_signround.jsonl"


def _key(row: dict) -> tuple:
    """What makes two rows the same measurement: the code (commit), the type, the tuning arguments, the text."""
    overrides = tuple(sorted(row.get("overrides", {}).items()))
    return row.get("commit"), row["type"], row["iters"], row.get("lr"), row.get("calibration", CALIB.name), overrides


def _done(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    return {_key(json.loads(line)) for line in path.read_text().splitlines() if line.strip()}


def heldout_wikitext(model_dir: Path, work: Path) -> Path:
    """The wikitext-2 test text from the character where its ``2 x EVAL_N x EVAL_SEQLEN``-th token starts (the
    evaluation reads the first ``EVAL_N x EVAL_SEQLEN`` tokens only), written to ``work``."""
    from transformers import AutoTokenizer

    text = EVAL.read_text(encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)["offset_mapping"]
    path = work / "wikitext2_test_heldout.txt"
    path.write_text(text[offsets[2 * EVAL_N * EVAL_SEQLEN][0] :], encoding="utf-8")
    return path


def parse_override(item: str) -> tuple[str, object]:
    """``--set KEY=VALUE``: the value as a Python literal where it is one, else the string."""
    key, sep, value = item.partition("=")
    if not sep:
        raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=["Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K", "Q6_K"])
    parser.add_argument("--iters", nargs="+", type=int, default=[0, 50])
    parser.add_argument("--lr", type=float, default=None, help="SignRound's learning rate (default: signround's)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf-llamacpp"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--calib", choices=["tinyshakespeare", "wikitext-heldout"], default="tinyshakespeare",
        help="calibration text (default: the accuracy protocol's); wikitext-heldout: see above",
    )  # fmt: skip
    parser.add_argument(
        "--concat", action="store_true",
        help="join the calibration text into one token stream cut in consecutive chunks (dataset ':concat=True'), "
        "so --set nsamples=N can take more samples than the text's long-enough paragraphs (106 for tinyshakespeare)",
    )  # fmt: skip
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE",
        help="further AutoRound arguments, e.g. enable_norm_bias_tuning=False (Python literals; recorded in the row)",
    )  # fmt: skip
    args = parser.parse_args()
    overrides = dict(parse_override(item) for item in args.set)
    torch.set_num_threads(args.threads)
    model_dir = cached_model_path("smollm2-135m")
    bench = Bench(args.work, args.threads)
    bench.prepare(model_dir)
    done = _done(args.out)
    commit = checkout_commit()
    calib = CALIB if args.calib == "tinyshakespeare" else heldout_wikitext(model_dir, args.work)
    for type_name in args.types:
        for iters in args.iters:
            lr = (args.lr if args.lr is not None else default_lr(iters, 4)) if iters else None  # < 1000 iters: any bits
            recorded = {key: repr(value) for key, value in overrides.items()}
            dataset, calibration = (
                (f"{calib}:concat=True", f"{calib.name}:concat=True") if args.concat else (str(calib), calib.name)
            )
            measured = {"commit": commit, "type": type_name, "iters": iters, "lr": lr, "calibration": calibration}
            key = _key({**measured, **({"overrides": recorded} if recorded else {})})
            if commit and not commit.endswith("+") and key in done:
                print(f"skip {type_name} iters={iters}: already in {args.out} for {commit}")
                continue
            start = time.perf_counter()
            protocol = {"nsamples": CALIB_N, "seqlen": CALIB_SEQLEN, "batch_size": 8}  # --set may change these
            ar = signround.AutoRound(
                str(model_dir), format=f"gguf:{type_name.lower()}", iters=iters, lr=args.lr, dataset=dataset,
                dtype=torch.float32, show_progress=False, **{**protocol, **overrides},
            )  # fmt: skip
            tag = f"iters{iters}" + (f"-lr{args.lr:g}" if args.lr is not None and iters else "")
            tag += ("" if calib == CALIB else f"-{args.calib}") + ("-concat" if args.concat else "")
            tag += "".join(f"-{key}={value}" for key, value in overrides.items())
            out_dir = args.work / f"signround-{type_name}-{tag}"
            ar.quantize_and_save(out_dir)
            seconds = time.perf_counter() - start
            (path,) = out_dir.glob("*.gguf")
            named = args.work / f"signround-{type_name}-{tag}.gguf"  # its own name for the score files
            named.unlink(missing_ok=True)
            named.symlink_to(path)
            scored = bench.evaluate(named, check_calib=False)
            losses = [(first, final) for first, final in ar.result.report.block_losses if first is not None]
            row = {
                "tool": f"signround {signround.__version__}" if hasattr(signround, "__version__") else "signround",
                "model": MODEL, "type": type_name, "iters": iters, "lr": lr, "calibration": calibration,
                **({"overrides": recorded} if overrides else {}),
                "file_bytes": path.stat().st_size,
                "ppl": scored["ppl"], "kl": scored["kl"], "n_windows": scored.get("n_windows"),
                **{key: scored[key] for key in ("entropy", "ref_entropy", "window_nll") if key in scored},
                "tokens_match": scored.get("tokens_match", scored.get("checks")),
                "blocks_improved": sum(final < first for first, final in losses), "blocks": len(losses),
                "quantize_seconds": round(seconds, 1), "cpu": cpu_info(),
                "commit": commit, "command": shlex.join(sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            }  # fmt: skip
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{type_name} iters={iters}: {path.stat().st_size / 1e6:.1f} MB ppl {row['ppl']:.3f} kl {row['kl']:.5f}"
            )


if __name__ == "__main__":
    main()
