"""CPU inference speed: SmolLM2-135M fp32 vs W4G32 on the torch and torch_int4 backends, in one run.

* decode: greedy, batch 1, a 64-token prompt, then 128 new tokens one at a time with the KV cache; tokens/s of
  those 128 steps (the prompt's prefill is not timed);
* prefill: one forward of 4 x 512 tokens (no cache), tokens/s;
* weight bytes: bytes of every buffer of the quantized layers (checkpoint tensors + any repacked copy), as a
  fraction of the same layers in fp16;
* agreement: max |logits - torch backend's| / max |logits| and the share of equal argmax on 4 x 512 tokens.

Quantization is plain RTN (speed does not depend on how the codes were chosen).  Each variant is timed
``--repeats`` times, best kept; rows go to bench/results/speed.jsonl.

    python bench/speed.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from accuracy import EVAL  # noqa: E402

OUT = ROOT / "bench" / "results" / "speed.jsonl"


@torch.inference_mode()
def _decode_tps(model, prompt: torch.Tensor, new_tokens: int) -> float:
    out = model(prompt, use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return new_tokens / (time.perf_counter() - start)


@torch.inference_mode()
def _prefill_tps(model, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    model(batch, use_cache=False)
    return batch.numel() / (time.perf_counter() - start)


def _weight_bytes(model) -> tuple[int, int]:
    from signround.layers import quant_linears

    used = fp16 = 0
    for layer in quant_linears(model).values():
        used += sum(b.numel() * b.element_size() for name, b in layer.named_buffers() if name != "bias")
        fp16 += layer.in_features * layer.out_features * 2
    return used, fp16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import signround
    from signround.fetch import fetch_model
    from signround.layers import quant_linears

    torch.set_num_threads(args.threads)
    fp_dir = fetch_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    ids = tokenizer(EVAL.read_text()[:20000], return_tensors="pt").input_ids[0]
    prompt, batch = ids[:64].unsqueeze(0), ids[: 4 * 512].reshape(4, 512)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ar = signround.AutoRound(str(fp_dir), tokenizer, bits=4, group_size=32, sym=True, iters=0,
                                 disable_opt_rtn=True, show_progress=False)  # fmt: skip
        ckpt = ar.quantize_and_save(Path(tmp) / "w4g32", format="auto_round")
        del ar
        variants = {"fp32": lambda: AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)}
        for backend in ("torch", "torch_int4"):
            variants[f"W4G32 {backend}"] = lambda b=backend: AutoModelForCausalLM.from_pretrained(
                ckpt, quantization_config=signround.AutoRoundConfig(backend=b)
            )
        reference_logits = None
        for name, load in variants.items():
            model = load().eval()
            decode = max(_decode_tps(model, prompt, 128) for _ in range(args.repeats))
            prefill = max(_prefill_tps(model, batch) for _ in range(args.repeats))
            with torch.inference_mode():
                logits = model(batch).logits.float()
            row = {"variant": name, "decode_tok_s": round(decode, 2), "prefill_tok_s": round(prefill, 1)}
            if quant_linears(model):
                used, fp16 = _weight_bytes(model)
                row.update(quant_layer_bytes=used, fraction_of_fp16=round(used / fp16, 3))
            if name == "W4G32 torch":
                reference_logits = logits
            elif reference_logits is not None:
                row["max_rel_logit_diff_vs_torch"] = round(
                    float((logits - reference_logits).abs().max() / reference_logits.abs().max()), 5
                )
                row["argmax_agreement_vs_torch"] = round(
                    float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean()), 4
                )
            rows.append(row)
            del model
    fp32 = rows[0]
    with OUT.open("a") as f:
        for row in rows:
            row.update(
                decode_vs_fp32=round(row["decode_tok_s"] / fp32["decode_tok_s"], 2),
                prefill_vs_fp32=round(row["prefill_tok_s"] / fp32["prefill_tok_s"], 2),
                threads=args.threads, torch=torch.__version__, cpu=platform.processor() or platform.machine(),
            )  # fmt: skip
            f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
