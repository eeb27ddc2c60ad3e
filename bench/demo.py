"""`make demo`: quantize SmolLM2-135M-Instruct inside from_pretrained, compare with fp32, save, reload, generate.

Runs on 2 CPU cores in a few minutes: W4, group 32, sym, SignRound with the settings below, calibrated on
tinyshakespeare; perplexity on the first windows of WikiText-2 test.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import signround
from signround.eval.ppl import perplexity
from signround.fetch import fetch_model
from signround.layers import quant_linears

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"
PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def _generate(model, tokenizer) -> str:
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=30, do_sample=False)
    return tokenizer.decode(out[0, ids.input_ids.shape[1] :], skip_special_tokens=True).strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--eval_windows", type=int, default=10)
    p.add_argument("--output_dir", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)

    fp_dir = fetch_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    wikitext = SHARED / "data" / "wikitext2_test.txt"

    fp = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
    fp_ppl = perplexity(fp, tokenizer, wikitext, seqlen=512, max_windows=args.eval_windows)
    fp_text = _generate(fp, tokenizer)
    del fp

    cfg = signround.AutoRoundConfig(
        bits=4, group_size=32, sym=True, iters=args.iters, nsamples=args.nsamples, seqlen=args.seqlen,
        dataset=f"{SHARED / 'data' / 'tinyshakespeare.txt'}:concat=True",
    )  # fmt: skip
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(fp_dir, quantization_config=cfg, dtype=torch.float32)
    tune_s = time.perf_counter() - start
    q_ppl = perplexity(model, tokenizer, wikitext, seqlen=512, max_windows=args.eval_windows)
    q_text = _generate(model, tokenizer)

    out = Path(args.output_dir or tempfile.mkdtemp(prefix="signround-demo-"))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    again = AutoModelForCausalLM.from_pretrained(out)
    probe = torch.randint(0, tokenizer.vocab_size, (1, 32))
    with torch.inference_mode():
        same = torch.equal(model(probe).logits, again(probe).logits)
    layers = quant_linears(again)
    backends = sorted({type(m).__name__ for m in layers.values()})

    size_mb = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 2**20
    print("\n=== signround demo: SmolLM2-135M-Instruct, W4 G32 sym ===")
    print(
        f"tuning (from_pretrained)  : {tune_s:.0f} s, iters={args.iters}, nsamples={args.nsamples}, seqlen={args.seqlen}"
    )
    print(f"wikitext-2 ppl ({args.eval_windows}x512)   : fp32 {fp_ppl:.2f} -> W4G32 {q_ppl:.2f}")
    print(
        f"saved to {out} ({size_mb:.0f} MB safetensors); reloaded: {len(layers)} layers on {backends}, logits identical: {same}"
    )
    print(f"fp32 says : {fp_text}")
    print(f"W4G32 says: {q_text}")
    if args.output_dir is None:
        shutil.rmtree(out, ignore_errors=True)
    if not same:
        raise SystemExit("reloaded model differs from the in-memory quantized model")


if __name__ == "__main__":
    main()
