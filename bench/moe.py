"""Mixture-of-experts tuning: signround against Intel's auto-round 0.16.1 on one tiny-but-not-trivial MoE.

The model is a random Qwen3-MoE built from a config (8 experts, top-2, hidden 256, moe_intermediate 512, vocab 512
= the stories260K tokenizer; ``--layers`` decoder blocks), saved in float32 to a temporary directory that both
tools load in float32.  Calibration: tinyshakespeare tokenized without special tokens, the first ``nsamples``
consecutive ``seqlen``-token chunks, handed to both tools as the same token ids (signround: a LongTensor
``[n, seqlen]``; auto-round: a list of ``[1, seqlen]`` tensors, as bench/reference_autoround.py does).  Both run
W4G32 sym (W4A16 with group size 32) with ``iters``, ``nsamples``, ``seqlen``, ``batch_size`` equal, everything
else at each tool's defaults except ``enable_torch_compile=False`` for auto-round (compiling costs about a minute
per block on 2 cores; bench/reference_autoround.py does the same).

Timed: the whole ``quantize()`` call of each tool, in this process (ours) and in a subprocess of ``.venv-ref``
(this same file with ``--worker``; it imports nothing from signround), one after the other on the same machine.
Sizes: every ``*.safetensors`` file of the saved ``auto_round`` checkpoint against the fp32 model's.  Routing:
tokens per expert when the calibration set runs through the fp model (the same for both tools), and what
signround's report counted on its fp stream.

    .venv/bin/python bench/moe.py                        # iters 50, 2 blocks; `make bench-moe`
    .venv/bin/python bench/moe.py --iters 2 --layers 2   # a smoke run

A markdown table is printed; one JSON line per tool is appended to bench/results/moe.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
TOKENIZER = SHARED / "models" / "stories260K"
CALIB = SHARED / "data" / "tinyshakespeare.txt"
REF_PYTHON = ROOT / ".venv-ref" / "bin" / "python"
OUT = ROOT / "bench" / "results" / "moe.jsonl"


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*.safetensors"))


def _cpu_flags() -> str:
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags.update(f for f in line.split(":", 1)[1].split() if f.startswith(("avx512", "amx")))
        return " ".join(sorted(flags)) or "none"
    except OSError:
        return "unknown"


# -- the reference, in .venv-ref ------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    """Intel's auto-round on the model and calibration ids the parent wrote; prints one JSON line."""
    import auto_round
    from auto_round import AutoRound
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    calib = load_file(str(args.calib))["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.fp_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.fp_dir)
    ar = AutoRound(
        model, tokenizer, bits=4, group_size=32, sym=True, iters=args.iters, nsamples=calib.shape[0],
        seqlen=calib.shape[1], batch_size=args.batch_size, dataset=[row[None].clone() for row in calib],
        enable_torch_compile=False,
    )  # fmt: skip
    start = time.perf_counter()
    ar.quantize()
    seconds = time.perf_counter() - start
    ar.save_quantized(str(args.out), format="auto_round")
    row = {
        "tool": f"auto-round {auto_round.__version__}",
        "quantize_s": round(seconds, 1),
        "ckpt_bytes": _dir_bytes(args.out),
        "amp": bool(getattr(ar, "amp", None)),
        "torch": torch.__version__,
    }
    print("RESULT " + json.dumps(row), flush=True)


# -- the bench, in .venv ---------------------------------------------------------------------------------------------
def make_model(layers: int, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen3_moe", hidden_size=256, intermediate_size=512, moe_intermediate_size=512, num_experts=8,
        num_experts_per_tok=2, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        vocab_size=512, max_position_embeddings=1024, tie_word_embeddings=False, norm_topk_prob=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def calibration(tokenizer, nsamples: int, seqlen: int) -> torch.Tensor:
    ids = tokenizer(CALIB.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < nsamples * seqlen:
        raise SystemExit(f"{CALIB} has {ids.numel()} tokens, fewer than {nsamples} x {seqlen}")
    return ids[: nsamples * seqlen].reshape(nsamples, seqlen).long()


def routed_tokens(model, calib: torch.Tensor) -> dict[str, int]:
    """``layer.expert -> tokens routed to it`` when ``calib`` runs through ``model`` (its routers' top-k)."""
    counts: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if type(module).__name__.endswith("TopKRouter"):

            def hook(mod, _args, out, name=name):
                top_index = out[2]
                per = torch.bincount(top_index.flatten(), minlength=mod.num_experts)
                for e, n in enumerate(per.tolist()):
                    counts[f"{name}.{e}"] = counts.get(f"{name}.{e}", 0) + n

            hooks.append(module.register_forward_hook(hook))
    if not hooks:
        raise SystemExit("no router found: the model is not the expected Qwen3-MoE")
    with torch.no_grad():
        for start in range(0, calib.shape[0], 8):
            model(calib[start : start + 8])
    for h in hooks:
        h.remove()
    return counts


def ours(fp_dir: Path, tokenizer, calib: torch.Tensor, out: Path, args) -> dict:
    import signround
    from signround import AutoRound

    ar = AutoRound(
        str(fp_dir), tokenizer, bits=4, group_size=32, sym=True, iters=args.iters, nsamples=calib.shape[0],
        seqlen=calib.shape[1], batch_size=args.batch_size, dataset=calib, show_progress=False,
    )  # fmt: skip
    start = time.perf_counter()
    ar.quantize()
    seconds = time.perf_counter() - start
    ar.save_quantized(out, format="auto_round")
    report = ar.result.report
    return {
        "tool": f"signround {signround.__version__}",
        "quantize_s": round(seconds, 1),
        "ckpt_bytes": _dir_bytes(out),
        "amp": bool(ar.config.amp),
        "experts_with_tokens": f"{report.experts_on_data}/{len(report.expert_tokens)}",
        "quantized_layers": len(report.quantized),
    }


def reference(fp_dir: Path, calib_file: Path, out: Path, args) -> dict:
    cmd = [
        str(REF_PYTHON), str(Path(__file__).resolve()), "--worker", "--fp_dir", str(fp_dir), "--calib",
        str(calib_file), "--out", str(out), "--iters", str(args.iters), "--batch_size", str(args.batch_size),
        "--threads", str(args.threads),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"auto-round worker failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no_reference", action="store_true", help="signround only")
    parser.add_argument("--results", type=Path, default=OUT)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--fp_dir", help=argparse.SUPPRESS)
    parser.add_argument("--calib", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if not args.no_reference and not REF_PYTHON.exists():
        raise SystemExit("the reference venv is missing: run `make venv-ref` (or pass --no_reference)")

    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    calib = calibration(tokenizer, args.nsamples, args.seqlen)
    with tempfile.TemporaryDirectory(prefix="signround-moe-") as tmp:
        tmp = Path(tmp)
        fp_dir = tmp / "fp"
        model = make_model(args.layers)
        counts = routed_tokens(model, calib)
        model.save_pretrained(fp_dir)
        tokenizer.save_pretrained(fp_dir)
        del model
        calib_file = tmp / "calib.safetensors"
        save_file({"input_ids": calib.contiguous()}, str(calib_file))
        fp_bytes = _dir_bytes(fp_dir)
        rows = [ours(fp_dir, tokenizer, calib, tmp / "ours", args)]
        if not args.no_reference:
            rows.append(reference(fp_dir, calib_file, tmp / "ref", args))
    common = {
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "model": f"qwen3_moe random, {args.layers} blocks, 8 experts top-2, hidden 256, moe_intermediate 512",
        "scheme": "W4G32 sym",
        "iters": args.iters,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "fp32_bytes": fp_bytes,
        "experts_routed_fp": f"{sum(1 for n in counts.values() if n > 0)}/{len(counts)}",
        "min_tokens_per_expert_fp": min(counts.values()),
        "cpu_flags": _cpu_flags(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        for row in rows:
            f.write(json.dumps({**common, **row}) + "\n")
    print(
        f"\n{common['model']}; W4G32 sym, iters {args.iters}, nsamples {args.nsamples} x seqlen {args.seqlen}, "
        f"batch {args.batch_size}, {args.threads} threads; experts routed by the fp model on the calibration set: "
        f"{common['experts_routed_fp']} (fewest tokens: {common['min_tokens_per_expert_fp']})\n"
    )
    print("| tool | quantize() s | checkpoint MB | fp32 MB | size / fp32 | size / bf16 | amp | experts with tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        size = row["ckpt_bytes"]
        print(
            f"| {row['tool']} | {row['quantize_s']} | {size / 1e6:.2f} | {fp_bytes / 1e6:.2f} | "
            f"{size / fp_bytes:.3f} | {2 * size / fp_bytes:.3f} | {row['amp']} | "
            f"{row.get('experts_with_tokens', common['experts_routed_fp'] + ' (fp model)')} |"
        )
    if len(rows) == 2:
        print(f"\nsignround / auto-round quantize() time: {rows[0]['quantize_s'] / rows[1]['quantize_s']:.2f}")


if __name__ == "__main__":
    main()
