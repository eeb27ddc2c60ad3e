"""Tuning time of signround and Intel auto-round 0.16.1 on one GPU, side by side (a lent GPU machine; never CI).

The device machine has no network and a 64 MiB working-tree limit, so SmolLM2-135M's weights cannot travel: the
model is SmolLM2-135M's architecture (its config.json and tokenizer, carried) with random weights from
transformers' own initialisation, seed 0, built once and saved so both tools load the same file.  Tuning cost
does not depend on the weights' values (same shapes, same iterations, no early stop in either tool), so the
times compare; the weights' error figures would not, so none are reported here (the accuracy rows are the CPU
ones of docs/benchmarks.md).

Both tools get the same calibration ids (tinyshakespeare, no special tokens, consecutive chunks), W{bits}G32 sym,
batch 8, seed 42, device_map=0 (the reference's default: accelerator 0), their default amp (bf16 on the GPU) and
their default ``enable_torch_compile`` unless --compile is given; only ``quantize()`` is timed, in a fresh
process per run, after a CUDA warm-up matmul.

    here:    python bench/gpu_tune_pair.py prepare --model-src ~/.cache/signround/models/smollm2-135m
    device:  bash bench/gpu_tune.sh                 (carry [".gpucache/tune"], timeout_s 560)
    smoke on the CPU:  python bench/gpu_tune_pair.py build --layers 2 && \
                       python bench/gpu_tune_pair.py run --tool ours --iters 2 --nsamples 8 --seqlen 64 --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# ignored by git; named in the device call's carry (GPU_TUNE_CARRY: elsewhere, for the CPU test of this script)
CARRY = Path(os.environ.get("GPU_TUNE_CARRY", ROOT / ".gpucache" / "tune"))
MODEL_DIR = Path("/tmp/gpu-tune-model")
CARRIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")


def prepare(model_src: Path) -> None:
    """Here: copy SmolLM2's config and tokenizer, the calibration text and auto-round's wheels into CARRY."""
    CARRY.mkdir(parents=True, exist_ok=True)
    for name in CARRIED_FILES:
        if (model_src / name).exists():
            shutil.copy2(model_src / name, CARRY / name)
    shutil.copy2(ROOT.parent / "shared" / "data" / "tinyshakespeare.txt", CARRY / "tinyshakespeare.txt")
    print(f"prepared {CARRY}: {sorted(p.name for p in CARRY.iterdir())}")


def build(layers: int | None, model_dir: Path = MODEL_DIR) -> None:
    """Random weights in SmolLM2's shapes, seed 0, saved once (fp32 safetensors) for both tools."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(CARRY)
    if layers:
        config.num_hidden_layers = layers
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(CARRY).save_pretrained(model_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"built {model_dir}: {config.num_hidden_layers} blocks, {n / 1e6:.1f} M parameters")


def _calibration(tokenizer, nsamples: int, seqlen: int):
    ids = tokenizer((CARRY / "tinyshakespeare.txt").read_text(), add_special_tokens=False, return_tensors="pt")
    ids = ids.input_ids[0]
    if ids.numel() < nsamples * seqlen:
        raise SystemExit(f"calibration text has {ids.numel()} tokens, fewer than {nsamples} x {seqlen}")
    return ids[: nsamples * seqlen].reshape(nsamples, seqlen).long()


def run(args) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    calib = _calibration(tokenizer, args.nsamples, args.seqlen)
    device_map = 0 if args.device == "cuda" else "cpu"
    if args.device == "cuda":  # CUDA context and cuBLAS handles before the clock starts, for both tools alike
        x = torch.randn(1024, 1024, device="cuda")
        (x @ x).sum().item()
        torch.cuda.reset_peak_memory_stats()
    common = dict(
        bits=args.bits, group_size=32, sym=True, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
        batch_size=8, seed=42, device_map=device_map,
    )  # fmt: skip
    if args.compile is not None:
        common["enable_torch_compile"] = args.compile == "on"
    if args.tool == "ours":
        import signround

        tool = f"signround {getattr(signround, '__version__', '')}".strip()
        ar = signround.AutoRound(model, tokenizer, dataset=calib, show_progress=False, **common)
    else:
        import auto_round
        from auto_round import AutoRound

        tool = f"auto-round {auto_round.__version__}"
        ar = AutoRound(model, tokenizer, dataset=[row[None].clone() for row in calib], **common)
    start = time.perf_counter()
    ar.quantize()
    if args.device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {
        "tool": tool,
        "bits": args.bits,
        "iters": args.iters,
        "nsamples": args.nsamples,
        "seqlen": args.seqlen,
        "batch_size": 8,
        "compile": args.compile or "default",
        "tune_seconds": round(seconds, 1),
        # tokens through one block's forward + backward per second, over the whole quantize() (caching included)
        "block_tokens_per_s": round(args.iters * 8 * args.seqlen * model.config.num_hidden_layers / seconds),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "blocks": model.config.num_hidden_layers,
        "weights": "random (SmolLM2-135M shapes, seed 0)",
    }
    if args.device == "cuda":
        row["gpu"] = torch.cuda.get_device_name(0)
        row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if args.tool == "ours":
        losses = [(a, b) for a, b in ar.result.report.block_losses if a is not None]
        row["blocks_improved"] = sum(b < a for a, b in losses)
        row["blocks_tuned"] = len(losses)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--model-src", type=Path, required=True)
    b = sub.add_parser("build")
    b.add_argument("--layers", type=int, help="fewer blocks than SmolLM2's 30 (a shorter pair, a smoke run)")
    b.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    r = sub.add_parser("run")
    r.add_argument("--tool", choices=("ours", "reference"), required=True)
    r.add_argument("--bits", type=int, default=4)
    r.add_argument("--iters", type=int, default=50)
    r.add_argument("--nsamples", type=int, default=32)
    r.add_argument("--seqlen", type=int, default=256)
    r.add_argument("--compile", choices=("on", "off"), help="enable_torch_compile (default: each tool's default)")
    r.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    r.add_argument("--out", type=Path)
    r.add_argument("--model-dir", type=Path, default=MODEL_DIR)
    args = parser.parse_args()
    if args.cmd == "prepare":
        prepare(args.model_src.expanduser())
    elif args.cmd == "build":
        build(args.layers, args.model_dir)
    else:
        row = run(args)
        line = json.dumps(row)
        print(line, flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
