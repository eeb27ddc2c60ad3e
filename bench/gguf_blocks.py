"""Where GGUF tuning helps and where it hurts: SmolLM2-135M with its first N blocks in a GGUF type, in memory.

    .venv/bin/python bench/gguf_blocks.py --type q4_0 --blocks 6 --iters 0
    .venv/bin/python bench/gguf_blocks.py --type q4_0 --blocks 6 --iters 50
    .venv/bin/python bench/gguf_blocks.py --int --blocks 6 --iters 50      (W4G32 sym, the integer twin of q4_0)

bench/accuracy.py's calibration (the first 32 x 256 tokens of tinyshakespeare, batch 8) and evaluation (40 x 512
wikitext-2 windows, KL against its cached fp32 log-probs: run ``bench/accuracy.py --run fp32`` once first), plus
the perplexity on the last 20 x 512 tokens of tinyshakespeare (same domain as the calibration, never in it).  The
blocks from N on stay in 16 bit, embeddings and head too, so a row isolates what tuning does to those N blocks;
bench/gguf_signround.py measures whole files in llama.cpp.  One JSON row per run, appended to
bench/results/gguf_blocks.jsonl, with the per-block calibration loss of the start and of the kept result.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import CACHE, CALIB, _eval_windows, _evaluate, checkout_commit

RESULTS = Path(__file__).resolve().parent / "results" / "gguf_blocks.jsonl"


def _held_out_ppl(model, ids: torch.Tensor, n: int = 20, seqlen: int = 512) -> float:
    held = ids[-n * seqlen :].reshape(n, seqlen)
    nll, count = 0.0, 0
    with torch.inference_mode():
        for start in range(0, n, 4):
            batch = held[start : start + 4]
            logp = torch.log_softmax(model(batch).logits.float(), -1)
            nll -= logp[:, :-1].gather(-1, batch[:, 1:, None]).sum().item()
            count += batch[:, 1:].numel()
    return math.exp(nll / count)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import signround
    from signround.data import chunk_token_ids
    from signround.fetch import fetch_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", default="q4_0", help="GGUF block type (legacy types fit SmolLM2's 576-wide rows)")
    p.add_argument("--int", action="store_true", help="W4G32 sym integer grid instead of a GGUF type")
    p.add_argument("--blocks", type=int, default=6, help="quantize blocks 0 .. N-1 only")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--minmax_lr", type=float, default=None)
    p.add_argument(
        "--minmax", choices=["auto", "on", "off"], default="auto",
        help="enable_minmax_tuning: auto (the default: clipping kept where a search placed it), on, off",
    )  # fmt: skip
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument(
        "--fp-inputs", action="store_true",
        help="enable_quanted_input=False: every block tuned on the fp model's inputs (the reference's "
        "disable_quanted_input)",
    )  # fmt: skip
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(2)
    fp_dir = fetch_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
    n_layers = model.config.num_hidden_layers
    later = "|".join(str(i) for i in range(args.blocks, n_layers))
    layer_config = {rf"model\.layers\.({later})\.": {"bits": 16}} if args.blocks < n_layers else None
    ids = tokenizer(CALIB.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    grid = {"bits": 4, "group_size": 32, "sym": True} if args.int else {"scheme": f"gguf:{args.type}"}
    ar = signround.AutoRound(
        model, tokenizer, **grid, iters=args.iters, lr=args.lr, minmax_lr=args.minmax_lr,
        dataset=chunk_token_ids(ids, 256, args.nsamples), nsamples=args.nsamples, seqlen=256, batch_size=8,
        show_progress=False, layer_config=layer_config, low_cpu_mem_usage=False,
        enable_minmax_tuning={"auto": None, "on": True, "off": False}[args.minmax],
        enable_quanted_input=not args.fp_inputs,
    )  # fmt: skip
    start = time.perf_counter()
    ar.quantize()
    seconds = time.perf_counter() - start
    ppl, kl = _evaluate(ar.model, _eval_windows(tokenizer), CACHE / "fp32_logprobs.safetensors", None)
    losses = [(first, final) for first, final in ar.result.report.block_losses if first is not None]
    row = {
        "grid": "int4-g32-sym" if args.int else args.type, "blocks": args.blocks, "iters": args.iters,
        "lr": args.lr, "minmax_lr": args.minmax_lr, "minmax": args.minmax, "nsamples": args.nsamples,
        **({"quanted_input": False} if args.fp_inputs else {}), "ppl": round(ppl, 3),
        "kl": round(kl, 5), "held_out_shakespeare_ppl": round(_held_out_ppl(ar.model, ids), 3),
        "seconds": round(seconds, 1), "block_losses": [(round(a, 6), round(b, 6)) for a, b in losses],
        "commit": checkout_commit(), "command": " ".join(sys.argv),
    }  # fmt: skip
    print(json.dumps(row))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
