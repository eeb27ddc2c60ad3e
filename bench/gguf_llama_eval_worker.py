"""Scores one GGUF file with llama.cpp itself, for bench/gguf_llamacpp.py (runs under .venv-llama; never imports signround).

    .venv-llama/bin/python bench/gguf_llama_eval_worker.py --model F.gguf --windows IDS.npy --ref FP_LOGPROBS.npy \
        --threads 2 --out RESULT.json [--check-text EVAL.txt EVAL_IDS.npy] [--check-text CALIB.txt CALIB_IDS.npy]

* ``--windows``: int32 ``[n, L]`` token ids (the Hugging Face tokenizer's, as bench/accuracy.py evaluates them);
  each window is evaluated from a fresh KV cache through ``llama_cpp.Llama`` with ``logits_all``;
* ``--ref``: float16 ``[n, L, vocab]`` log-probs of the fp32 Hugging Face model on the same windows, memmapped and
  read one window at a time;
* ppl = exp(mean NLL of tokens 1..L-1 of every window); kl = mean over all ``n * L`` positions of
  KL(p_fp || p_gguf), as bench/accuracy.py computes them; ``entropy`` / ``ref_entropy``: the mean entropy (nats)
  of the file's / the fp32 model's next-token distributions over the same positions (a file flatter than fp32 shows
  a higher one: on a text where fp32 is over-confident, flatter can mean a lower ppl at a higher KL);
  ``window_nll``: each window's summed NLL, so two files' ppl can be compared window by window (paired);
* ``--check-text TEXT IDS``: tokenizes TEXT with llama.cpp's tokenizer (no BOS, special tokens not parsed, as the
  Hugging Face tokenizer does for these texts) and compares with the 1-D ids IDS; reports the outcome.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time
from pathlib import Path

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    s = x - m
    return s - np.log(np.exp(s).sum(axis=-1, keepdims=True))


def _check_tokens(llm, text_path: str, ids_path: str) -> dict:
    expected = np.load(ids_path).astype(np.int64).reshape(-1)
    got = np.asarray(llm.tokenize(Path(text_path).read_bytes(), add_bos=False, special=False), dtype=np.int64)
    n = min(len(got), len(expected))
    diff = np.nonzero(got[:n] != expected[:n])[0]
    return {
        "text": Path(text_path).name,
        "n_hf": len(expected),
        "n_llama": len(got),
        "match": bool(len(got) == len(expected) and diff.size == 0),
        "first_mismatch": int(diff[0]) if diff.size else (None if len(got) == len(expected) else int(n)),
        "n_mismatch_positions": int(diff.size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--windows", required=True)
    parser.add_argument("--ref", required=True)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    parser.add_argument("--check-text", nargs=2, action="append", default=[], metavar=("TEXT", "IDS"))
    args = parser.parse_args()

    import llama_cpp

    quiet = llama_cpp.llama_log_callback(lambda *_: None)  # kept referenced while llama.cpp may call it
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    wins = np.load(args.windows).astype(np.int64)
    ref = np.load(args.ref, mmap_mode="r")
    n, length = wins.shape
    if ref.shape[:2] != (n, length):
        raise SystemExit(f"reference log-probs {ref.shape} do not fit the windows {wins.shape}")
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=length,
        n_batch=length,
        n_ubatch=length,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_gpu_layers=0,
        logits_all=True,
        verbose=False,
    )
    if llm.n_vocab() != ref.shape[2]:
        raise SystemExit(f"llama.cpp vocabulary {llm.n_vocab()} != reference vocabulary {ref.shape[2]}")
    checks = [_check_tokens(llm, text, ids) for text, ids in args.check_text]
    memory = llama_cpp.llama_get_memory(llm._ctx.ctx)
    nll, count, kl_sum, kl_count = 0.0, 0, 0.0, 0
    entropy, ref_entropy, window_nll = 0.0, 0.0, []
    start = time.perf_counter()
    for w in range(n):
        llm.reset()
        llama_cpp.llama_memory_clear(memory, True)  # a fresh KV cache for every window
        llm.eval(wins[w].tolist())
        logq = _log_softmax(np.array(llm.scores[:length], dtype=np.float64))
        window_nll.append(-float(logq[np.arange(length - 1), wins[w, 1:]].sum()))
        nll += window_nll[-1]
        count += length - 1
        r = np.asarray(ref[w], dtype=np.float64)
        p = np.exp(r)  # the fp32 probabilities, used by KL and by their entropy alike
        kl_sum += float((p * (r - logq)).sum())
        entropy -= float((np.exp(logq) * logq).sum())
        ref_entropy -= float((p * r).sum())
        kl_count += length
    seconds = time.perf_counter() - start
    result = {
        "ppl": float(np.exp(nll / count)),
        "kl": kl_sum / kl_count,
        "entropy": entropy / kl_count,
        "ref_entropy": ref_entropy / kl_count,
        "window_nll": window_nll,
        "n_windows": int(n),
        "window": int(length),
        "n_vocab": int(llm.n_vocab()),
        "token_checks": checks,
        "eval_seconds": round(seconds, 1),
        "threads": args.threads,
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
    }
    Path(args.out).write_text(json.dumps(result))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
