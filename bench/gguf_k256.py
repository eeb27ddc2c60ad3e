"""The GGUF anchor on a model whose every row is a multiple of 256, so that a "K" file is K-quants throughout.

    .venv/bin/python bench/gguf_k256.py --types Q4_K_M Q3_K_M Q2_K [--iters 50]

Why: SmolLM2's 576-wide rows are not a multiple of 256, so llama.cpp stores most of its tensors in legacy types even
in a K file; here every tensor llama.cpp quantizes is a K type.  The model is trained here (no hub): a 4-layer Llama,
hidden 256, MLP 768, untied head, stories260K's 512-token vocabulary, on the first 90 % of tinyshakespeare
(seed 0, fixed schedule; cached in ``--work``).  Evaluation: 40 x 512 windows of the held-out last 10 %;
calibration (llama-imatrix and signround alike): 32 x 256 tokens of the training part.  Per type, four files
scored by llama.cpp (bench/gguf_llamacpp.py's ``Bench``): (a) ``llama-quantize``, (a') ``llama-quantize --imatrix``,
(b) signround iters 0, (c) signround tuned; plus, for (b) and (c), the tensor-by-tensor activation-weighted error
against (a') under llama-imatrix's importance (bench/gguf_tensor_error.py).  One JSON row per file, appended to
bench/results/gguf_k256.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import checkout_commit
from gguf_llamacpp import BIN, CALIB, CALIB_N, CALIB_SEQLEN, Bench, cpu_info
from gguf_tensor_error import compare, importance_of, tensors_of

import signround

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "models" / "stories260K"
RESULTS = ROOT / "bench" / "results" / "gguf_k256.jsonl"
MODEL = "tiny-k256"
SHAPE = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4}
TRAIN = {"steps": 200, "batch": 16, "seqlen": 256, "lr": 3e-3, "warmup": 20, "seed": 0}
SPLIT = 0.9


def split_text(work: Path) -> tuple[Path, Path]:
    """tinyshakespeare's first 90 % (training and calibration) and last 10 % (evaluation), as files in ``work``."""
    text = CALIB.read_text()
    cut = int(len(text) * SPLIT)
    train, held = work / "tinyshakespeare-train.txt", work / "tinyshakespeare-heldout.txt"
    train.write_text(text[:cut])
    held.write_text(text[cut:])
    return train, held


def train_model(out: Path, train_text: Path) -> dict:
    """Train the tiny model once (AdamW, linear warm-up then cosine decay, random 256-token crops); returns the
    training facts.  Saved atomically: a killed run leaves no half model."""
    facts = out / "training.json"
    if facts.exists():
        return json.loads(facts.read_text())
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    ids = torch.tensor(tokenizer(train_text.read_text(), add_special_tokens=False).input_ids)
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size, max_position_embeddings=512, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **SHAPE,
    )  # fmt: skip
    torch.manual_seed(TRAIN["seed"])
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAIN["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    steps, warmup = TRAIN["steps"], TRAIN["warmup"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    generator = torch.Generator().manual_seed(TRAIN["seed"])
    start, loss = time.perf_counter(), float("nan")
    model.train()
    for step in range(steps):
        at = torch.randint(0, ids.numel() - TRAIN["seqlen"] - 1, (TRAIN["batch"],), generator=generator)
        batch = torch.stack([ids[a : a + TRAIN["seqlen"]] for a in at.tolist()])
        loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"train step {step}: loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    done = {**TRAIN, **SHAPE, "final_train_loss": round(loss.item(), 4), "seconds": round(time.perf_counter() - start)}
    (tmp / "training.json").write_text(json.dumps(done))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return done


def tensor_types(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in tensors_of(path).values():
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return dict(sorted(counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=["Q4_K_M", "Q3_K_M", "Q2_K"])
    parser.add_argument("--iters", type=int, default=50, help="SignRound iterations of the (c) files")
    parser.add_argument("--work", type=Path, default=Path("/tmp/gguf-k256"))
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    train_text, held_text = split_text(args.work)
    model_dir = args.work / MODEL
    training = train_model(model_dir, train_text)
    bench = Bench(args.work, args.threads, model=MODEL, eval_text=held_text, calib_text=train_text)
    meta = bench.prepare(model_dir)
    bench.convert(model_dir)
    bench.make_imatrix()
    importance = importance_of(bench.imatrix)
    f32 = bench.evaluate(bench.f32, check_calib=False)
    print(f"f32: HF ppl {meta['hf_fp32_ppl']:.3f}, llama.cpp ppl {f32['ppl']:.3f}")
    for type_name in args.types:
        files: dict[str, Path] = {}
        seconds: dict[str, float] = {}
        for variant, imatrix in (("a", None), ("a'", bench.imatrix)):
            files[variant] = args.work / f"{MODEL}-{type_name}-{'imatrix' if imatrix else 'plain'}.gguf"
            if not files[variant].exists():
                bench.quantize_bin(type_name, files[variant], imatrix)
        for variant, iters in (("b", 0), ("c", args.iters)):
            out_dir = args.work / f"signround-{type_name}-iters{iters}"
            start = time.perf_counter()
            ar = signround.AutoRound(
                str(model_dir), format=f"gguf:{type_name.lower()}", iters=iters, nsamples=CALIB_N,
                seqlen=CALIB_SEQLEN, batch_size=8, dataset=str(train_text), dtype=torch.float32, show_progress=False,
            )  # fmt: skip
            shutil.rmtree(out_dir, ignore_errors=True)
            ar.quantize_and_save(out_dir)
            seconds[variant] = round(time.perf_counter() - start, 1)
            (path,) = out_dir.glob("*.gguf")
            files[variant] = args.work / f"signround-{type_name}-iters{iters}.gguf"
            files[variant].unlink(missing_ok=True)
            files[variant].symlink_to(path)
        for variant, path in files.items():
            scored = bench.evaluate(path, check_calib=False)
            row = {
                "model": MODEL, "type": type_name, "variant": variant, "file_bytes": path.stat().st_size,
                "ppl": scored["ppl"], "kl": scored["kl"], "tensor_types": tensor_types(path),
                "f32_ppl": f32["ppl"], "hf_fp32_ppl": meta["hf_fp32_ppl"], "training": training,
                "cpu": cpu_info(), "commit": checkout_commit(), "command": shlex.join(sys.argv), "llama_quantize": str(BIN / "llama-quantize"),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            }  # fmt: skip
            if variant in ("b", "c"):
                per_tensor = compare(bench.f32, path, files["a'"], importance)
                row.update(
                    iters=0 if variant == "b" else args.iters, quantize_seconds=seconds[variant],
                    k_tensors=len(per_tensor), lower_than_imatrix=sum(r["ours"] < r["llama"] for r in per_tensor),
                    error_ratio_total=sum(r["ours"] for r in per_tensor) / sum(r["llama"] for r in per_tensor),
                )  # fmt: skip
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            extra = f" K tensors lower {row['lower_than_imatrix']}/{row['k_tensors']}" if "k_tensors" in row else ""
            print(
                f"{type_name} ({variant}): {row['file_bytes'] / 1e6:.2f} MB ppl {row['ppl']:.3f} kl {row['kl']:.5f}{extra}"
            )


if __name__ == "__main__":
    main()
