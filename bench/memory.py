"""Peak host memory of quantizing a model larger than it should need: ``low_cpu_mem_usage`` against the default.

A synthetic Llama of TinyLlama-1.1B's shape (hidden 2048, 22 blocks, MLP 5632, vocab 32000; random weights) is
saved once in bf16 (2.2 GB). Each setting then runs in a fresh process:

* ``AutoRound(path, low_cpu_mem_usage=...)``;
* W4G128, ``quantize_and_save``;
* 8 samples x 128 tokens of tinyshakespeare.

The child reports its peak RSS (``ru_maxrss``, which counts the memory-mapped checkpoint pages it touched) and
the sha256 of every file it wrote. The outputs of the two modes must be byte-identical: the low-memory walk
computes exactly what the in-memory one does.

    .venv/bin/python bench/memory.py                 # every setting, table + bench/results/memory.jsonl
    .venv/bin/python bench/memory.py --iters 0 2     # the settings' iters
    .venv/bin/python bench/memory.py --model smollm2-135m --iters 50   # SmolLM2-135M W4G32 (signround fetch-model)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CALIB = SHARED / "data" / "tinyshakespeare.txt"
TOKENIZER = SHARED / "models" / "stories260K"
CACHE = Path(os.environ.get("SIGNROUND_BENCH_CACHE", "/tmp/signround-bench"))
MODEL = CACHE / "llama-1.1b-shaped-bf16"
RESULTS = ROOT / "bench" / "results" / "memory.jsonl"


def build_model() -> Path:
    """The synthetic checkpoint (built once; its tokenizer is stories260K's, vocab padded to 32000)."""
    if (MODEL / "config.json").exists():
        return MODEL
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(MODEL, max_shard_size="1GB")
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(MODEL)
    return MODEL


def _model(name: str) -> tuple[Path, int]:
    """(checkpoint directory, group size) of a benchmark model."""
    if name == "smollm2-135m":
        from signround.fetch import model_dir

        return model_dir(name), 32
    return MODEL, 128


class RssSampler:
    """Samples /proc/self/status every 20 ms: the peak RSS and how it splits into anonymous memory (tensors,
    Python's heap) and file-backed pages (the memory-mapped checkpoint, shared libraries)."""

    FIELDS = ("VmRSS", "RssAnon", "RssFile")

    def __init__(self) -> None:
        self.peak = dict.fromkeys(self.FIELDS, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @classmethod
    def read(cls) -> dict[str, int]:
        values = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in cls.FIELDS:
                values[key] = int(rest.split()[0]) * 1024
        return values

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            now = self.read()
            if now["VmRSS"] > self.peak["VmRSS"]:
                self.peak = now

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def child(args: argparse.Namespace) -> None:
    """One quantization in this process; prints one JSON line."""
    baseline = {"python_bytes": RssSampler.read()["VmRSS"]}
    import signround
    from signround.streaming import output_digests

    baseline["imports_bytes"] = RssSampler.read()["VmRSS"]
    started = time.perf_counter()
    path, group_size = _model(args.model)
    ar = signround.AutoRound(
        str(path), bits=4, group_size=group_size, iters=args.iters, nsamples=8, seqlen=128, batch_size=4,
        dataset=str(CALIB), low_cpu_mem_usage=args.low, show_progress=False,
    )  # fmt: skip
    baseline["loaded_bytes"] = RssSampler.read()["VmRSS"]
    with RssSampler() as sampler:
        out = ar.quantize_and_save(args.out)
    print(
        json.dumps(
            {
                "low_cpu_mem_usage": args.low,
                "iters": args.iters,
                "seconds": round(time.perf_counter() - started, 1),
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                **baseline,
                "sampled_peak": {key: sampler.peak[key] for key in RssSampler.FIELDS},
                "output_bytes": sum(f.stat().st_size for f in Path(out).glob("*.safetensors")),
                "files": output_digests(out),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--low", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--iters", type=int, nargs="+", default=[0, 2])
    p.add_argument("--model", choices=["llama-1.1b", "smollm2-135m"], default="llama-1.1b")
    p.add_argument("--modes", nargs="+", choices=["low", "normal"], default=["low", "normal"], help="settings to run")
    args = p.parse_args()
    if args.child:
        args.iters = args.iters[0]
        args.low = bool(args.low)
        child(args)
        return
    model = build_model() if args.model == "llama-1.1b" else _model(args.model)[0]
    ckpt_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f.startswith(("avx512", "amx"))})
    rows = []
    for iters in args.iters:
        for low in (1 if mode == "low" else 0 for mode in args.modes):
            out = CACHE / f"out-{args.model}-low{low}-iters{iters}"
            cmd = [sys.executable, __file__, "--child", "--low", str(low), "--iters", str(iters), "--out", str(out)]
            cmd += ["--model", args.model]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"{cmd} failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row.update(checkpoint_bytes=ckpt_bytes, model=args.model, cpu_flags=" ".join(flags))
            rows.append(row)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if k != "files"}) + "\n")
    group = _model(args.model)[1]
    print(
        f"{args.model}: checkpoint {ckpt_bytes / 1e9:.2f} GB; W4G{group}, 8 x 128 tokens; CPU flags: {' '.join(flags)}\n"
    )
    print(
        "| low_cpu_mem_usage | iters | peak RSS GB | peak RSS / checkpoint | at the peak: anonymous / file-backed GB "
        "| RSS after imports / after loading GB | seconds | output identical |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        twin = next((r for r in rows if r["iters"] == row["iters"] and r is not row), None)
        same = "-" if twin is None else row["files"] == twin["files"]
        split = row["sampled_peak"]
        print(
            f"| {row['low_cpu_mem_usage']} | {row['iters']} | {row['peak_rss_bytes'] / 1e9:.2f} | "
            f"{row['peak_rss_bytes'] / ckpt_bytes:.2f} | {split['RssAnon'] / 1e9:.2f} / {split['RssFile'] / 1e9:.2f} | "
            f"{row['imports_bytes'] / 1e9:.2f} / {row['loaded_bytes'] / 1e9:.2f} | {row['seconds']} | {same} |"
        )


if __name__ == "__main__":
    main()
