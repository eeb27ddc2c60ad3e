"""Intel's auto-round 0.16.1 on exactly the bench/accuracy.py setting, so tuning time can be quoted as a ratio.

Runs in the separate reference venv (``make venv-ref``), never in the signround one, and imports nothing
from signround.  The protocol is copied from bench/accuracy.py:

* model: the fp32 SmolLM2-135M copy that ``signround fetch-model smollm2-135m`` puts in
  ``$SIGNROUND_CACHE/models`` (default ``~/.cache/signround/models``);
* calibration: tinyshakespeare tokenized without special tokens, consecutive 256-token chunks, first 32,
  handed to auto-round pre-tokenized as a list of ``[1, 256]`` input-id tensors (its documented "list of
  tokenized samples" input; it does not re-tokenize or re-sample them: a hook on the embedding checks
  that exactly these rows, in this order, went through the model);
* ``AutoRound(model, tokenizer, bits=B, group_size=32, sym=True, iters=I, nsamples=32, seqlen=256,
  batch_size=8, enable_torch_compile=False)``, everything else at the reference's defaults (seed 42,
  lr = 1/iters, and on a bf16-capable CPU amp=True: the model is cast to bf16 for tuning);
* only ``quantize()`` is timed; peak RSS is read right after it (before evaluation), as in accuracy.py;
* evaluation of the in-memory fake-quantized model (auto-round writes quantize-dequantized weights into
  each Linear), cast back to fp32 so the forward pass is fp32 as in accuracy.py: wikitext-2 test tokenized
  whole with the tokenizer defaults, non-overlapping 512-token windows, first 40, ppl = exp(mean NLL) and
  the mean KL(p_fp32 || p_quant) against the fp32 log-probs that ``accuracy.py --run fp32`` cached.

    .venv-ref/bin/python bench/reference_autoround.py --bits 4 --iters 50 --out bench/results/reference.jsonl
    .venv-ref/bin/python bench/reference_autoround.py --bits 4 --iters 0 [--disable_opt_rtn] --out ...
    .venv-ref/bin/python bench/reference_autoround.py --bits 4 --iters 2 --smoke --out /tmp/ref-smoke.jsonl

--smoke (4 calibration samples, the first 2 decoder blocks only, 2 evaluation windows) only shows that the
script runs end to end; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CALIB = SHARED / "data" / "tinyshakespeare.txt"
EVAL = SHARED / "data" / "wikitext2_test.txt"
CACHE = Path(os.environ.get("SIGNROUND_BENCH_CACHE", "/tmp/signround-bench"))
REF_LOGPROBS = CACHE / "fp32_logprobs.safetensors"


def _model_dir() -> Path:
    root = os.environ.get("SIGNROUND_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "signround"
    return base / "models" / "smollm2-135m"


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _calibration(tokenizer, seqlen: int, n: int):
    """accuracy.py's calibration: whole text, no special tokens, first n consecutive seqlen chunks: [n, seqlen]."""
    ids = tokenizer(CALIB.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < n * seqlen:
        raise SystemExit(f"calibration text has {ids.numel()} tokens, fewer than {n} x {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen).long()


def _eval_windows(tokenizer, seqlen: int, n: int):
    """signround.eval.ppl.windows(tokenize_file(...)): whole file with tokenizer defaults, first n windows."""
    import torch

    ids = torch.as_tensor(tokenizer(EVAL.read_text(encoding="utf-8"), verbose=False)["input_ids"], dtype=torch.long)
    ids = ids.reshape(-1)
    n = min(n, ids.numel() // seqlen)
    return ids[: n * seqlen].reshape(n, seqlen).clone()


def _evaluate(model, wins, ref_path: Path) -> tuple[float, float]:
    """ppl and mean KL vs the cached fp32 log-probs: the math of accuracy.py's _evaluate (batches of 4 windows).

    The reference rows are read per batch (``ref[start:start+len(batch)]``) instead of loading the 2 GB file
    whole, which is the same numbers and lets --smoke score fewer windows.
    """
    import torch
    from safetensors import safe_open

    nll, count, kl_sum, kl_count = 0.0, 0, 0.0, 0
    with safe_open(str(ref_path), framework="pt") as f, torch.inference_mode():
        ref = f.get_slice("logprobs")
        if ref.get_shape()[0] < wins.shape[0] or ref.get_shape()[1] != wins.shape[1]:
            raise SystemExit(f"cached fp32 log-probs have shape {ref.get_shape()}, windows {tuple(wins.shape)}")
        for start in range(0, wins.shape[0], 4):
            batch = wins[start : start + 4]
            logp = torch.log_softmax(model(batch).logits.float(), dim=-1)
            nll -= logp[:, :-1].gather(-1, batch[:, 1:, None]).sum().item()
            count += batch[:, 1:].numel()
            r = ref[start : start + batch.shape[0]].float()
            kl_sum += (r.exp() * (r - logp)).sum().item()
            kl_count += batch.numel()
    return math.exp(nll / count), kl_sum / kl_count


def run(args) -> dict:
    import auto_round
    import torch
    import transformers
    from auto_round import AutoRound
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    nsamples, n_windows = (4, 2) if args.smoke else (32, 40)
    model_dir = Path(args.model).expanduser() if args.model else _model_dir()
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"no model at {model_dir}: run `.venv/bin/signround fetch-model smollm2-135m` first")
    if not REF_LOGPROBS.exists():
        raise SystemExit(f"no {REF_LOGPROBS}: run `.venv/bin/python bench/accuracy.py --run fp32` first")

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    calib = _calibration(tokenizer, 256, nsamples)
    pad = tokenizer.pad_token_id
    if pad is not None and bool((calib == pad).any()):
        raise SystemExit("calibration holds the pad token: auto-round would mask it out of the loss")
    dataset = [row[None].clone() for row in calib]  # list of [1, 256] input-id tensors

    seen: list = []  # every input_ids batch the model's embedding sees during quantize()
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))

    kwargs = dict(
        bits=args.bits, group_size=32, sym=True, iters=args.iters, nsamples=nsamples, seqlen=256, batch_size=8,
        enable_torch_compile=False, dataset=dataset,
    )  # fmt: skip
    if args.disable_opt_rtn:
        kwargs["disable_opt_rtn"] = True
    if args.no_amp:
        kwargs["amp"] = False
    if args.smoke:  # only the first two decoder blocks (a list of lists: taken as block names, not regexes)
        kwargs["to_quant_block_names"] = [["model.layers.0", "model.layers.1"]]
    ar = AutoRound(model, tokenizer, **kwargs)
    start = time.perf_counter()
    qmodel, _ = ar.quantize()
    tune_seconds = time.perf_counter() - start
    peak = _peak_rss_mb()
    hook.remove()

    if seen:
        got = torch.cat([s.reshape(-1, s.shape[-1]).to("cpu") for s in seen])
        calib_ok = got.shape == calib.shape and bool(torch.equal(got, calib))
        if not calib_ok:
            raise SystemExit(f"auto-round did not use the given calibration: saw {tuple(got.shape)} ids")
    else:
        calib_ok = None  # plain RTN (disable_opt_rtn) runs no calibration forward at all

    tuned_dtype = str(next(qmodel.parameters()).dtype).replace("torch.", "")
    qmodel = qmodel.float().eval()  # bf16 qdq weights (amp) -> fp32 exactly; the forward then runs in fp32
    n_quant = sum(1 for m in qmodel.modules() if isinstance(m, torch.nn.Linear) and getattr(m, "bits", 16) < 16)
    wins = _eval_windows(tokenizer, 512, n_windows)
    ppl, kl = _evaluate(qmodel, wins, REF_LOGPROBS)
    row = {
        "tool": f"auto-round {auto_round.__version__}",
        "bits": args.bits,
        "iters": args.iters,
        "disable_opt_rtn": bool(args.disable_opt_rtn),
        "tune_seconds": round(tune_seconds, 1),
        "peak_rss_mb": round(peak, 1),
        "ppl": round(ppl, 3),
        "kl": round(kl, 5),
        "amp": not args.no_amp,
        "tuned_dtype": tuned_dtype,
        "quantized_linears": n_quant,
        "calib_samples_seen": 0 if not seen else int(sum(s.reshape(-1, s.shape[-1]).shape[0] for s in seen)),
        "calib_verified": calib_ok,
        "nsamples": nsamples,
        "eval_windows": int(wins.shape[0]),
        "eval": "in-memory fake-quant (qdq) weights, fp32 forward",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }
    if args.smoke:
        row["smoke"] = True
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--iters", type=int, required=True, help="0 = the reference's (optimised) RTN")
    parser.add_argument("--disable_opt_rtn", action="store_true", help="with --iters 0: plain RTN")
    parser.add_argument("--no_amp", action="store_true", help="amp=False: tune in fp32 instead of the default bf16")
    parser.add_argument(
        "--smoke", action="store_true", help="check the script end to end: 4 samples, first 2 blocks, 2 eval windows"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (accuracy.py uses 2)")
    parser.add_argument("--model", help="model directory (default: the signround cache's smollm2-135m)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "reference.jsonl")
    args = parser.parse_args()
    row = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
