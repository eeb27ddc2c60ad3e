"""Intel auto-round 0.16.1's own GGUF files on the GGUF anchor, scored by llama.cpp exactly as our rows are.

    .venv/bin/python bench/gguf_reference.py --types Q4_K_M --iters 0 50 [--out ...jsonl]

What the anchor's "(c) <= (b)" asks of SignRound (tuned not above optimised RTN in perplexity) is asked here of the
reference implementation on the same protocol: ``AutoRound(smollm2, scheme="gguf:<type>", iters=N)`` with
bench/accuracy.py's calibration (tinyshakespeare without special tokens, the first 32 consecutive chunks of 256
tokens, handed over pre-tokenized, batch 8), everything else at the reference's defaults (its learning rate
``1 / iters``, its optimised RTN at ``iters=0``), saved with ``quantize_and_save(format="gguf:<type>")``.  The
.gguf is then scored by bench/gguf_llamacpp.py's ``Bench`` on the same 40 x 512 wikitext-2 windows and fp32
log-probs as bench/gguf_signround.py's rows.

The quantizing half runs in the reference venv (``make venv-ref``; this script calls itself there with
``--produce``), the scoring half here; the reference never enters the signround venv.  One JSON row per
(type, iters), appended, with the checkout's commit.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REF_PY = ROOT / ".venv-ref" / "bin" / "python"
RESULTS = ROOT / "bench" / "results" / "gguf_reference.jsonl"


def produce(
    type_name: str, iters: int, model_dir: Path, calib_ids: Path, out_dir: Path, threads: int, extra: dict
) -> dict:
    """In the reference venv: quantize and save one GGUF file; return what the row records of the run."""
    import auto_round
    import numpy as np
    import torch
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    ids = torch.from_numpy(np.load(calib_ids).astype(np.int64))
    n, seqlen = 32, 256
    if ids.numel() < n * seqlen:
        raise SystemExit(f"calibration has {ids.numel()} tokens, fewer than {n} x {seqlen}")
    dataset = [row[None].clone() for row in ids[: n * seqlen].reshape(n, seqlen)]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    scheme = f"gguf:{type_name.lower()}"
    ar = AutoRound(
        model, tokenizer, scheme=scheme, iters=iters, nsamples=n, seqlen=seqlen, batch_size=8,
        enable_torch_compile=False, dataset=dataset, **extra,
    )  # fmt: skip
    start = time.perf_counter()
    ar.quantize_and_save(str(out_dir), format=scheme)
    return {
        "tool": f"auto-round {auto_round.__version__}",
        "quantize_seconds": round(time.perf_counter() - start, 1),
        "lr": getattr(ar, "lr", None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=["Q4_K_M"])
    parser.add_argument("--iters", nargs="+", type=int, default=[0, 50])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf-llamacpp"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE",
        help="further AutoRound arguments, e.g. enable_alg_ext=True (Python literals; recorded in the row)",
    )  # fmt: skip
    parser.add_argument(
        "--produce", nargs=6, metavar=("TYPE", "ITERS", "MODEL", "CALIB_IDS", "OUT", "EXTRA_JSON"), help="internal"
    )
    args = parser.parse_args()
    if args.produce:  # in the reference venv: nothing of signround or of the other bench scripts is importable
        type_name, iters, model_dir, calib_ids, out_dir, extra = args.produce
        facts = produce(
            type_name, int(iters), Path(model_dir), Path(calib_ids), Path(out_dir), args.threads, json.loads(extra)
        )
        (Path(out_dir) / "run.json").write_text(json.dumps(facts))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from accuracy import checkout_commit
    from gguf_llamacpp import MODEL, Bench, cpu_info
    from gguf_signround import parse_override

    from signround.fetch import cached_model_path

    if not REF_PY.exists():
        raise SystemExit(f"no {REF_PY}: run `make venv-ref` first")
    model_dir = cached_model_path("smollm2-135m")
    bench = Bench(args.work, args.threads)
    bench.prepare(model_dir)
    commit = checkout_commit()
    extra = dict(parse_override(item) for item in args.set)
    for type_name in args.types:
        for iters in args.iters:
            tag = f"reference-{type_name}-iters{iters}" + "".join(f"-{key}={value}" for key, value in extra.items())
            out_dir = args.work / tag
            subprocess.run(
                [str(REF_PY), __file__, "--threads", str(args.threads), "--produce", type_name, str(iters),
                 str(model_dir), str(bench.calib_ids), str(out_dir), json.dumps(extra)],
                check=True,
            )  # fmt: skip
            facts = json.loads((out_dir / "run.json").read_text())
            (path,) = out_dir.rglob("*.gguf")
            named = args.work / f"{tag}.gguf"
            named.unlink(missing_ok=True)
            named.symlink_to(path)
            scored = bench.evaluate(named, check_calib=False)
            row = {
                **facts, "model": MODEL, "type": type_name, "iters": iters,
                **({"overrides": {key: repr(value) for key, value in extra.items()}} if extra else {}),
                "file_bytes": path.stat().st_size,
                "ppl": scored["ppl"], "kl": scored["kl"], "n_windows": scored.get("n_windows"),
                **{key: scored[key] for key in ("entropy", "ref_entropy", "window_nll") if key in scored}, "cpu": cpu_info(),
                "commit": commit, "command": shlex.join(sys.argv),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            }  # fmt: skip
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{type_name} iters={iters}: {row['file_bytes'] / 1e6:.1f} MB ppl {row['ppl']:.3f} kl {row['kl']:.5f}"
            )


if __name__ == "__main__":
    main()
