"""Runs inside another tool's venv (never imports signround): make or load a checkpoint with that tool, write logits.

    .venv-interop/bin/python integration_tests/interop_worker.py gptq-logits CKPT OUT.safetensors --loader transformers
    .venv-interop/bin/python integration_tests/interop_worker.py gptq-make FP_DIR OUT_DIR
    .venv-ref/bin/python integration_tests/interop_worker.py autoround-make FP_DIR OUT_DIR [--format auto_awq --asym]
    .venv-ref/bin/python integration_tests/interop_worker.py autoround-logits CKPT OUT.safetensors
    .venv-ref/bin/python integration_tests/interop_worker.py batch JOBS.json RESULTS.json

Logits are computed for ``token_ids()`` (the same ids the tests use) in float32 and saved with safetensors.
``--logits OUT.safetensors`` after a ``*-make`` command also loads the new checkpoint with that tool's loader
(``gptq-logits --loader gptqmodel`` / ``autoround-logits``) in the same process and writes its logits, which
saves a second interpreter start-up (seconds per test).  ``batch`` runs a JSON list of such argument lists in
one process and writes ``[{"argv", "ok", "error"?}, ...]``: a failing job does not stop the others.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import traceback
from pathlib import Path

import torch
from safetensors.torch import save_file


def token_ids() -> torch.Tensor:
    return torch.randint(3, 512, (2, 40), generator=torch.Generator().manual_seed(0))


def _save_logits(model, out: str) -> None:
    with torch.inference_mode():
        logits = model(input_ids=token_ids()).logits.float()
    save_file({"logits": logits.contiguous()}, out)


def gptq_logits(ckpt: str, out: str, loader: str) -> None:
    if loader == "gptqmodel":
        from gptqmodel import BACKEND, GPTQModel

        model = GPTQModel.load(ckpt, device="cpu", backend=BACKEND.TORCH).model  # bf16 / fp16 kernel
    else:
        from transformers import AutoModelForCausalLM, GPTQConfig

        # transformers' own GPTQ path (through gptqmodel); the torch kernel in float32 is its most exact one
        model = AutoModelForCausalLM.from_pretrained(
            ckpt, device_map="cpu", dtype=torch.float32, quantization_config=GPTQConfig(bits=4, backend="torch")
        )
    _save_logits(model, out)


def gptq_make(fp_dir: str, out: str) -> None:
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # 2-core machines otherwise get 1 worker and fail
    from gptqmodel import GPTQModel, QuantizeConfig

    calib = [{"input_ids": ids.tolist(), "attention_mask": [1] * len(ids)} for ids in token_ids().repeat(8, 1)]
    model = GPTQModel.load(fp_dir, QuantizeConfig(bits=4, group_size=32, sym=True, desc_act=False), device="cpu",
                           dtype=torch.float32)  # fmt: skip
    model.quantize(calib, batch_size=4)
    model.save(out)


def autoround_make(fp_dir: str, out: str, fmt: str = "auto_round", sym: bool = True) -> None:
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    calib = [" ".join(["the quick brown fox jumps over the lazy dog"] * 8)] * 8
    ar = AutoRound(
        model, tokenizer, bits=4, group_size=32, sym=sym, iters=2, nsamples=8, seqlen=32, dataset=calib,
        enable_torch_compile=False,  # compiling costs a minute per block on 2 cores and changes nothing here
    )  # fmt: skip
    staging = out + ".staging"
    ar.quantize_and_save(staging, format=fmt)
    # auto-round writes into a sub-directory named after the model and scheme: move that one to ``out``
    (saved,) = {os.path.dirname(p) for p in glob.glob(os.path.join(staging, "**", "config.json"), recursive=True)}
    shutil.move(saved, out)
    shutil.rmtree(staging, ignore_errors=True)


def autoround_logits(ckpt: str, out: str) -> None:
    from transformers import AutoModelForCausalLM

    # transformers' own auto-round integration, backed by Intel's package
    model = AutoModelForCausalLM.from_pretrained(ckpt, device_map="cpu", dtype=torch.float32)
    _save_logits(model, out)


COMMANDS = ["gptq-logits", "gptq-make", "autoround-make", "autoround-logits"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=[*COMMANDS, "batch"])
    parser.add_argument("src", help="batch: a JSON file holding a list of argument lists, one per job")
    parser.add_argument("out", nargs="?", help="batch: where the list of per-job results is written (JSON)")
    parser.add_argument("--loader", choices=["transformers", "gptqmodel"], default="transformers")
    parser.add_argument("--format", default="auto_round", help="autoround-make: auto-round's export format")
    parser.add_argument("--asym", action="store_true", help="autoround-make: sym=False")
    parser.add_argument("--logits", help="*-make: also write the new checkpoint's logits (the tool's own loader)")
    return parser


def run(args: argparse.Namespace) -> None:
    if args.command == "gptq-logits":
        gptq_logits(args.src, args.out, args.loader)
    elif args.command == "gptq-make":
        gptq_make(args.src, args.out)
        if args.logits:
            gptq_logits(args.out, args.logits, "gptqmodel")
    elif args.command == "autoround-make":
        autoround_make(args.src, args.out, args.format, sym=not args.asym)
        if args.logits:
            autoround_logits(args.out, args.logits)
    else:
        autoround_logits(args.src, args.out)


def run_batch(jobs_file: str, results_file: str) -> None:
    """Every job in one interpreter (the tools' imports cost seconds each); a failing job is recorded with its
    traceback and the next one still runs."""
    results = []
    for argv in json.loads(Path(jobs_file).read_text()):
        try:
            run(_parser().parse_args(argv))
            results.append({"argv": argv, "ok": True})
        except Exception:
            results.append({"argv": argv, "ok": False, "error": traceback.format_exc()[-4000:]})
    Path(results_file).write_text(json.dumps(results, indent=1))


def main() -> None:
    args = _parser().parse_args()
    torch.set_num_threads(2)
    if args.command == "batch":
        run_batch(args.src, args.out)
    else:
        run(args)
    print("ok", file=sys.stderr)


if __name__ == "__main__":
    main()
