"""Whole-model decode on a CUDA GPU: a Llama-shaped model in fp16 vs its W4G128 layers on each CUDA backend.

The issue's GPU figure is "Marlin / ExLlamaV2 / Triton decode vs fp16".  No checkpoint reaches the lent GPU machine
(no network), and decode speed does not depend on the weight values, so the model is built from a config with
random weights (``--shape``: the layer sizes of Llama-3-8B by default) and its decoder Linear layers are quantized
by RTN (4-bit, group 128, symmetric, our ``quantize``), then installed on each backend with ``install_quantized``,
as a loaded checkpoint would be.

* decode: greedy, batch 1, a 64-token prompt, then ``--new-tokens`` steps one at a time with the KV cache, eager
  (no CUDA graphs, as plain ``generate`` runs); tokens/s of those steps, best of ``--repeats``;
* weight bytes: every buffer and parameter the quantized layers keep on the run device (a GPTQModel kernel's
  included), as a fraction of the same layers in fp16;
* agreement: the logits of the 64-token prompt against the ``torch`` reference backend (max |diff| / max |ref|,
  and the share of equal argmax).

A backend that cannot run (package missing, kernel build failure) gets a row saying why.

    python bench/gpu_decode.py [--shape llama3-8b] [--backends torch,marlin,exllamav2,triton] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import copy
import inspect
import sys
import time

import torch

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama3-1b": (2048, 8192, 16, 32, 8, 128256),
    "tiny": (256, 512, 2, 4, 2, 1024),  # for a CPU smoke run of this script
}


def build_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in fp16 directly: an 8B model in fp32 would need 32 GB first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    return model.eval()


def cache_names(model) -> tuple[str, str]:
    """(forward keyword, output attribute) of the KV cache: transformers 5.24 renamed ``past_key_values`` to
    ``cache``; the lent machine's transformers may be older than ours."""
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    return name, name


@torch.inference_mode()
def decode_tps(model, prompt: torch.Tensor, new_tokens: int) -> float:
    kw, attr = cache_names(model)
    out = model(prompt, use_cache=True)
    cache, token = getattr(out, attr), out.logits[:, -1:].argmax(-1)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, use_cache=True, **{kw: cache})
        cache, token = getattr(out, attr), out.logits[:, -1:].argmax(-1)
    if prompt.is_cuda:
        torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - start)


def layer_bytes(layers, device: torch.device) -> int:
    """Bytes the layers keep on ``device``: their buffers and parameters, plus those of a GPTQModel kernel layer,
    which the marlin / exllamav2 wrappers hold outside the module tree (their checkpoint tensors move to CPU)."""
    seen, total = set(), 0
    for m in layers:
        kernel = getattr(m, "kernel", None)
        modules = [m] + ([kernel] if isinstance(kernel, torch.nn.Module) else [])
        for t in (t for mod in modules for t in [*mod.buffers(), *mod.parameters()]):
            if t.device == device and t.numel() and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def main(argv: list[str] | None = None) -> int:
    from signround.kernels import get_backend
    from signround.layers import install_quantized
    from signround.quant.int import quantize
    from signround.schemes import LayerSpec

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--backends", default="torch,marlin,exllamav2,triton")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"bench/gpu_decode.py needs a CUDA GPU; torch {torch.__version__} sees none. Nothing to do.")
        return 0
    dtype, spec, packing = torch.float16, LayerSpec(bits=4, group_size=128, sym=True), "gptq"
    t0 = time.perf_counter()
    base = build_model(args.shape, args.device, dtype)
    names = [n for n, m in base.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    names = [f"model.layers.{n}" for n in names]
    quantized = {n: quantize(base.get_submodule(n).weight, spec) for n in names}
    fp16_bytes = layer_bytes((base.get_submodule(n) for n in names), base.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{device_name} | torch {torch.__version__} | {args.shape} random weights, {len(names)} Linear layers "
          f"W4G128 sym RTN | fp16 | built in {time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    g = torch.Generator(device=args.device).manual_seed(1)
    prompt = torch.randint(0, base.config.vocab_size, (1, 64), device=args.device, generator=g)
    print("variant\tdecode tok/s\tvs fp16\tlayer bytes / fp16\tmax rel logit diff vs torch\targmax agreement\tnote")
    fp16_tps = max(decode_tps(base, prompt, args.new_tokens) for _ in range(args.repeats))
    print(f"fp16\t{fp16_tps:.1f}\t1.00\t1.000\t-\t-\t", flush=True)
    reference_logits = None
    for name in args.backends.split(","):
        try:
            backend = get_backend(name)
            first = base.get_submodule(names[0])
            reason = backend.reject_reason(spec, packing, args.device, dtype, first.in_features, first.out_features)
            if reason:
                raise RuntimeError(reason)
            t0 = time.perf_counter()
            model = copy.deepcopy(base)
            installed = install_quantized(model, quantized, packing, backend=name, dtype=dtype)
            if args.device == "cuda":
                torch.cuda.synchronize()
            built = time.perf_counter() - t0
            with torch.inference_mode():
                logits = model(prompt).logits.float()
            tps = max(decode_tps(model, prompt, args.new_tokens) for _ in range(args.repeats))
        except Exception as exc:  # a backend that cannot build or run gets a row, not a crash
            print(f"W4G128 {name}\t-\t-\t-\t-\t-\t{type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        if name == "torch":
            reference_logits = logits
        if reference_logits is not None:
            diff = float((logits - reference_logits).abs().max() / reference_logits.abs().max())
            agree = float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean())
            agreement = f"{diff:.2e}\t{agree:.3f}"
        else:
            agreement = "(torch not yet run)\t-"
        print(
            f"W4G128 {name}\t{tps:.1f}\t{tps / fp16_tps:.2f}\t{layer_bytes(installed.values(), base.device) / fp16_bytes:.3f}\t"
            f"{agreement}\tinstalled in {built:.1f}s",
            flush=True,
        )
        del model, installed
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
