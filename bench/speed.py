"""CPU inference speed: SmolLM2-135M fp32 (and bf16) vs W4G32 on the torch, torch_int4 and native backends,
in one run (``--bits 8``: W8 on torch, torch_int8 and native; ``--group-size`` changes the group of 32).

Variants: the dense model in fp32 (the baseline every ratio is against) and in bf16; the W4G32 checkpoint on the
torch reference with the rest of the model (embeddings, tied lm_head, norms) in fp32; on torch_int4 and on
native (the CPU default where a C compiler is present), each with the rest in fp32 and with the rest in bf16
(``dtype=torch.bfloat16`` at load, SmolLM2's own dtype), where the tied lm_head, a fifth of the weights, reads half
the bytes.  A last variant is a different model: lm_head quantized as well (``quant_lm_head=True``, untied from the
embedding), the reference tool's option for the same purpose.

* decode: greedy, batch 1, a 64-token prompt, then 128 new tokens one at a time with the KV cache; tokens/s of
  those 128 steps (the prompt's prefill is not timed);
* prefill: one forward of 4 x 512 tokens (no cache), tokens/s;
* weight bytes: bytes of every resident buffer of the quantized layers (whatever the backend keeps), as a
  fraction of the same layers in fp16;
* agreement: max |logits - torch backend's| / max |logits| and the share of equal argmax on 4 x 512 tokens.

Quantization is plain RTN (speed does not depend on how the codes were chosen).  Each variant is timed
``--repeats`` times, best kept, all variants resident and timed in turn (so that machine drift hits them alike);
rows go to bench/results/speed.jsonl.

    python bench/speed.py [--threads 2] [--repeats 3] [--bits 4]
    python bench/speed.py --crossover      # torch_int4 / torch_int8 per-call paths (kernel vs dense) by rows
    python bench/speed.py --profile        # where a decode step of the bf16-rest torch_int4 model spends its op time
    python bench/speed.py --dtypes         # the int4 and int8 kernels' time per call in bf16 / fp16 / fp32
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
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)  # transformers 5.24 names the KV cache `cache`
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, cache=cache, use_cache=True)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    return new_tokens / (time.perf_counter() - start)


@torch.inference_mode()
def _prefill_tps(model, batch: torch.Tensor) -> float:
    start = time.perf_counter()
    model(batch, use_cache=False)
    return batch.numel() / (time.perf_counter() - start)


def _best_us(call, calls: int) -> float:
    """Microseconds per ``call()``: one warm-up call, then the best of 3 timings of ``calls`` calls."""
    call()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def _weight_bytes(model) -> tuple[int, int]:
    from signround.layers import quant_linears

    used = fp16 = 0
    for layer in quant_linears(model).values():
        used += sum(b.numel() * b.element_size() for name, b in layer.named_buffers() if name != "bias")
        fp16 += layer.in_features * layer.out_features * 2
    return used, fp16


@torch.inference_mode()
def crossover(threads: int) -> None:
    """Time one layer of each SmolLM2 shape on both per-call paths of native and torch_int4 (W4G32) and
    torch_int8 (W8G32), by input rows (bf16 activations): the evidence for each backend's ``DENSE_MIN_ROWS``."""
    from signround.kernels.native import NativeQuantLinear, kernel_problem
    from signround.kernels.torch_int4 import TorchInt4QuantLinear
    from signround.kernels.torch_int8 import TorchInt8QuantLinear
    from signround.quant.int import quantize
    from signround.schemes import LayerSpec

    torch.set_num_threads(threads)
    kernels = [(TorchInt4QuantLinear, 4), (TorchInt8QuantLinear, 8)]
    if kernel_problem() is None:
        kernels[:0] = [(NativeQuantLinear, 4), (NativeQuantLinear, 8)]
    for cls, bits in kernels:
        for i, (out_f, in_f) in enumerate(((1536, 576), (576, 1536), (576, 576))):
            qt = quantize(torch.randn(out_f, in_f) * 0.05, LayerSpec(bits=bits, group_size=32, sym=True))
            layer = cls.from_quantized(qt, "auto_round:auto_gptq", None, torch.bfloat16)
            if i == 0:
                print(
                    f"{cls.backend_name} (W{bits}G32): dense from {layer.dense_min_rows} rows; µs per call, best of 3"
                )
                print(f"{'out x in':>10} {'rows':>5} {'kernel':>9} {'dense':>9} {'dense/kernel':>13}")
            for rows in (1, 2, 4, 8, 16, 32, 48, 64, 128, 256, 512):
                x = torch.randn(rows, in_f, dtype=torch.bfloat16)
                times = {}
                for path, threshold in (("kernel", 1 << 30), ("dense", 0)):
                    layer.dense_min_rows = threshold
                    times[path] = _best_us(lambda: layer(x), max(3, 2000 // rows))  # noqa: B023
                ratio = times["dense"] / times["kernel"]
                print(f"{out_f:>5}x{in_f:<4} {rows:>5} {times['kernel']:>9.0f} {times['dense']:>9.0f} {ratio:>13.2f}")


@torch.inference_mode()
def kernel_dtypes(threads: int) -> None:
    """One decode-sized call (1 row, a 1536x576 SmolLM2 layer) of each CPU kernel per activation dtype:
    ``aten._weight_int4pack_mm_for_cpu`` (W4G32) and ``aten._weight_int8pack_mm`` (one per-channel W8 call), the
    evidence for torch_int4 and torch_int8 computing fp32 and fp16 inputs in bf16."""
    from signround.kernels.torch_int4 import TorchInt4QuantLinear
    from signround.quant.int import quantize
    from signround.schemes import LayerSpec

    torch.set_num_threads(threads)
    qt = quantize(torch.randn(1536, 576) * 0.05, LayerSpec(bits=4, group_size=32, sym=True))
    layer = TorchInt4QuantLinear.from_quantized(qt, "auto_round:auto_gptq", None, torch.bfloat16)
    int8_weight = torch.randint(-128, 128, (1536, 576), dtype=torch.int8)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        x, table, scales = torch.randn(1, 576, dtype=dtype), layer.scales_offsets.to(dtype), torch.rand(1536).to(dtype)
        calls = {
            "int4": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, layer.int4_weight, 32, table),  # noqa: B023
            "int8": lambda: torch.ops.aten._weight_int8pack_mm(x, int8_weight, scales),  # noqa: B023
        }
        times = [f"{name} {_best_us(call, 200):8.1f} µs" for name, call in calls.items()]
        print(f"{dtype!s:>16}: " + " | ".join(times) + " per call")


@torch.inference_mode()
def profile_decode(threads: int, steps: int = 20) -> None:
    """Op-time shares of ``steps`` decode steps (torch.profiler) of W4G32 on torch_int4 with the rest in bf16."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    import signround
    from signround.fetch import fetch_model

    torch.set_num_threads(threads)
    fp_dir = fetch_model("smollm2-135m")
    with tempfile.TemporaryDirectory() as tmp:
        ar = signround.AutoRound(str(fp_dir), None, bits=4, group_size=32, sym=True, iters=0,
                                 disable_opt_rtn=True, show_progress=False)  # fmt: skip
        ckpt = ar.quantize_and_save(Path(tmp) / "w4g32", format="auto_round")
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.bfloat16).eval()
    out = model(torch.arange(3, 67).unsqueeze(0), use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            out = model(token, cache=cache, use_cache=True)
            cache = out.cache
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"{steps} decode steps, {total / steps / 1e3:.2f} ms of op time per step; top ops by self time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]:
        share = e.self_cpu_time_total / total
        print(f"  {e.key:<45} {share:6.1%}  {e.count // steps:>4} calls/step")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crossover", action="store_true", help="only the per-call path tables")
    parser.add_argument("--profile", action="store_true", help="only the decode-step op profile")
    parser.add_argument("--dtypes", action="store_true", help="only the CPU kernels' time per activation dtype")
    parser.add_argument("--bits", type=int, default=4, choices=(2, 3, 4, 8), help="weight bits of the quantized rows")
    parser.add_argument("--group-size", type=int, default=32, help="group size of the quantized rows (-1: per row)")
    args = parser.parse_args()
    if args.crossover:
        crossover(args.threads)
        return
    if args.profile:
        profile_decode(args.threads)
        return
    if args.dtypes:
        kernel_dtypes(args.threads)
        return
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
    w = f"W{args.bits}G{args.group_size}"
    with tempfile.TemporaryDirectory() as tmp:
        ar = signround.AutoRound(str(fp_dir), tokenizer, bits=args.bits, group_size=args.group_size, sym=True, iters=0,
                                 disable_opt_rtn=True, show_progress=False)  # fmt: skip
        ckpt = ar.quantize_and_save(Path(tmp) / "quantized", format="auto_round")
        del ar
        variants = {
            "fp32": lambda: AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32),
            "bf16": lambda: AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.bfloat16),
        }
        from signround.kernels.native import kernel_problem

        fast = ["torch_int8" if args.bits == 8 else "torch_int4"] + (["native"] if kernel_problem() is None else [])
        for backend, dtype in [("torch", torch.float32)] + [
            (b, d) for b in fast for d in (torch.float32, torch.bfloat16)
        ]:
            name = f"{w} {backend}" + (" (bf16 rest)" if dtype == torch.bfloat16 else "")
            variants[name] = lambda b=backend, d=dtype: AutoModelForCausalLM.from_pretrained(
                ckpt, dtype=d, quantization_config=signround.AutoRoundConfig(backend=b)
            )
        if (args.bits, args.group_size) == (4, 32):  # another model: lm_head quantized too (untied from the embedding)
            ar = signround.AutoRound(str(fp_dir), tokenizer, bits=4, group_size=32, sym=True, iters=0,
                                     disable_opt_rtn=True, quant_lm_head=True, show_progress=False)  # fmt: skip
            ckpt_head = ar.quantize_and_save(Path(tmp) / "with-head", format="auto_round")
            del ar
            variants["W4G32 + lm_head W4 native (bf16 rest)"] = lambda: AutoModelForCausalLM.from_pretrained(
                ckpt_head, dtype=torch.bfloat16, quantization_config=signround.AutoRoundConfig(backend="native")
            )
        models = {name: load().eval() for name, load in variants.items()}
        # every variant resident at once, timed in turn `repeats` times: machine drift hits all of them alike
        decode = {name: 0.0 for name in models}
        prefill = {name: 0.0 for name in models}
        for _ in range(args.repeats):
            for name, model in models.items():
                decode[name] = max(decode[name], _decode_tps(model, prompt, 128))
                prefill[name] = max(prefill[name], _prefill_tps(model, batch))
        reference_logits = None
        for name, model in models.items():
            with torch.inference_mode():
                logits = model(batch).logits.float()
            row = {"variant": name, "decode_tok_s": round(decode[name], 2), "prefill_tok_s": round(prefill[name], 1)}
            if quant_linears(model):
                used, fp16 = _weight_bytes(model)
                row.update(quant_layer_bytes=used, fraction_of_fp16=round(used / fp16, 3))
            if name == f"{w} torch":
                reference_logits = logits
            elif reference_logits is not None and "lm_head" not in name:  # same model as the reference only
                row["max_rel_logit_diff_vs_torch"] = round(
                    float((logits - reference_logits).abs().max() / reference_logits.abs().max()), 5
                )
                row["argmax_agreement_vs_torch"] = round(
                    float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean()), 4
                )
            rows.append(row)
        del models
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
