"""Whole-model decode on a CUDA GPU: a Llama-shaped model in fp16 vs its W4G128 layers on each CUDA backend.

The issue's GPU figure is "Marlin / ExLlamaV2 / Triton decode vs fp16".  No checkpoint reaches the lent GPU machine
(no network), and decode speed does not depend on the weight values, so the model is built from a config with
random weights (``--shape``: the layer sizes of Llama-3-8B by default) and its decoder Linear layers are quantized
by RTN (4-bit, group 128, symmetric, our ``quantize``), then installed on each backend with ``install_quantized``,
as a loaded checkpoint would be.

* decode: greedy, batch 1, a 64-token prompt, then ``--new-tokens`` steps one at a time with the KV cache;
  tokens/s of those steps, best of ``--repeats``, two ways:
  - eager, with transformers' dynamic cache, as plain ``generate`` runs;
  - one CUDA graph replay per step, with a static cache: no Python and no launch cost, so the kernels' own time
    (on CPU the same static-cache step runs eagerly, which checks that code path and its tokens);
* weight bytes: every buffer and parameter the quantized layers keep on the run device (a GPTQModel kernel's
  included), as a fraction of the same layers in fp16;
* agreement: the logits of the 64-token prompt against the ``torch`` reference backend (max |diff| / max |ref|,
  and the share of equal argmax).

A backend that cannot run (package missing, kernel build failure) gets a row saying why.

    python bench/gpu_decode.py [--shape llama3-8b] [--backends torch,marlin,exllamav2,triton] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import inspect
import sys
import time
from dataclasses import dataclass

import torch
from gpu_kernels import device_nbytes  # bench/ is the script's folder, so on sys.path

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "llama3-8b": (4096, 14336, 32, 32, 8, 128256),
    "llama3-1b": (2048, 8192, 16, 32, 8, 128256),
    "tiny": (256, 512, 2, 4, 2, 1024),  # for a CPU smoke run of this script
}


def build_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, inter, layers, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):  # built in fp16 directly: an 8B model in fp32 would need 32 GB first
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def cache_keyword(model) -> str:
    """The KV cache's forward keyword (and output attribute): transformers 5.24 renamed ``past_key_values`` to
    ``cache``; the lent machine's transformers may be older than ours."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def eager_decode(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    """Tokens/s of greedy decode with transformers' dynamic cache, and the ``new_tokens`` tokens it chose."""
    kw = cache_keyword(model)
    out = model(prompt, use_cache=True)
    cache, token = getattr(out, kw), out.logits[:, -1:].argmax(-1)
    tokens = []
    _sync(prompt.device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        out = model(token, use_cache=True, **{kw: cache})
        cache, token = getattr(out, kw), out.logits[:, -1:].argmax(-1)
        tokens.append(token)
    _sync(prompt.device)
    return new_tokens / (time.perf_counter() - start), torch.cat(tokens, dim=1)


WARMUP_STEPS = 2  # eager steps before a graph is captured (on a side stream, as CUDA graphs need)


@torch.inference_mode()
def static_decode(model, prompt: torch.Tensor, new_tokens: int, graph: bool) -> tuple[float, torch.Tensor]:
    """Greedy decode with a static KV cache, each step one replay of a CUDA graph (``graph``) or an eager call.

    Eager decode of a large model on a GPU is bound by Python and kernel launches, the same for every variant;
    replaying one captured step removes both, leaving the kernels' own time.  The step (forward, argmax, token
    write) reads and writes only fixed buffers: the cache advances its position in a tensor of its own.  The
    tokens returned follow ``WARMUP_STEPS`` warm-up tokens, so they equal ``eager_decode``'s from that index on.
    """
    from transformers import StaticCache

    kw = cache_keyword(model)
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + WARMUP_STEPS + new_tokens + 1)
    token = model(prompt, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1)

    def step() -> None:
        token.copy_(model(token, use_cache=True, **{kw: cache}).logits[:, -1:].argmax(-1))

    run = step
    if graph:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                step()
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            step()
        run = captured.replay
    else:
        for _ in range(WARMUP_STEPS):
            step()
    tokens = torch.empty(1, new_tokens, dtype=token.dtype, device=token.device)
    _sync(prompt.device)
    start = time.perf_counter()
    for i in range(new_tokens):
        run()
        tokens[:, i : i + 1].copy_(token)
    _sync(prompt.device)
    return new_tokens / (time.perf_counter() - start), tokens


@dataclass
class Timing:
    eager_tps: float
    static_tps: float | None  # None: the static-cache / graph step failed (``note`` says why)
    note: str

    def row(self, fp16: Timing) -> str:
        eager = f"{self.eager_tps:.1f}\t{self.eager_tps / fp16.eager_tps:.2f}"
        if self.static_tps is None or fp16.static_tps is None:
            return f"{eager}\t-\t-"
        return f"{eager}\t{self.static_tps:.1f}\t{self.static_tps / fp16.static_tps:.2f}"


def time_variant(model, prompt: torch.Tensor, new_tokens: int, repeats: int, graph: bool) -> Timing:
    """Best of ``repeats`` for eager and for static-cache (graph) decode, and whether the two chose the same tokens
    (they need not: the static cache attends over a padded, masked length, which can flip a near tie)."""
    mode = "graph" if graph else "static"
    eager_tps, eager_tokens = 0.0, None
    for _ in range(repeats):
        tps, eager_tokens = eager_decode(model, prompt, new_tokens + WARMUP_STEPS)
        eager_tps = max(eager_tps, tps)
    try:
        static_tps, static_tokens = 0.0, None
        for _ in range(repeats):
            tps, static_tokens = static_decode(model, prompt, new_tokens, graph)
            static_tps = max(static_tps, tps)
    except Exception as exc:  # a kernel that cannot be captured in a graph gets a note, not a crash
        return Timing(eager_tps, None, f"{mode}: {type(exc).__name__}: {str(exc)[:200]}")
    same = eager_tokens[:, WARMUP_STEPS:] == static_tokens
    first_diff = int((~same[0]).nonzero()[0]) if not bool(same.all()) else new_tokens
    return Timing(eager_tps, static_tps, f"{mode} tokens = eager's for {first_diff}/{new_tokens}")


@contextlib.contextmanager
def triton_decode_option(option: str):
    """``triton+unpack_once``: our Triton backend with its decode tiles (16 rows or fewer) loading each packed word
    once, the candidate that ``bench/gpu_kernels.py --triton-tiles`` times per layer, here over a whole model."""
    if not option:
        yield
        return
    from signround.kernels import triton as triton_backend

    default_tiles = triton_backend.default_tiles

    def tiles(m: int, group_size: int, dtype: torch.dtype = torch.float16):
        chosen = default_tiles(m, group_size, dtype)
        return dataclasses.replace(chosen, unpack_once=True) if m <= 16 else chosen

    triton_backend.default_tiles = tiles
    try:
        yield
    finally:
        triton_backend.default_tiles = default_tiles


def main(argv: list[str] | None = None) -> int:
    from signround.kernels import select
    from signround.layers import install_quantized
    from signround.quant.int import quantize
    from signround.schemes import LayerSpec

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="llama3-8b", choices=sorted(SHAPES))
    parser.add_argument("--backends", default="torch,marlin,exllamav2,triton,triton+unpack_once")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--untimed",
        default="torch",
        help="backends run for logits and bytes only: the torch reference decodes an 8B model at about 6 tok/s "
        "(H100, 2026-11-26), which would cost a loan about a minute for a figure nobody ships",
    )
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    variants = [(variant, *variant.partition("+")[::2]) for variant in args.backends.split(",")]  # name, option
    for variant, name, option in variants:
        if option and (name, option) != ("triton", "unpack_once"):
            parser.error(f"unknown variant {variant!r}: a backend name, or 'triton+unpack_once'")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(f"bench/gpu_decode.py needs a CUDA GPU; torch {torch.__version__} sees none. Nothing to do.")
        return 0
    dtype, spec, packing = torch.float16, LayerSpec(bits=4, group_size=128, sym=True), "gptq"
    t0 = time.perf_counter()
    base = build_model(args.shape, args.device, dtype)
    names = [n for n, m in base.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
    names = [f"model.layers.{n}" for n in names]
    quantized = {n: quantize(base.get_submodule(n).weight, spec) for n in names}
    fp16_bytes = device_nbytes((base.get_submodule(n) for n in names), base.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{device_name} | torch {torch.__version__} | {args.shape} random weights, {len(names)} Linear layers "
          f"W4G128 sym RTN | fp16 | built in {time.perf_counter() - t0:.0f}s", flush=True)  # fmt: skip
    g = torch.Generator(device=args.device).manual_seed(1)
    prompt = torch.randint(0, base.config.vocab_size, (1, 64), device=args.device, generator=g)
    graph = args.device == "cuda"  # elsewhere the static-cache step runs eagerly: a check of the same code path
    print(
        "variant\teager tok/s\tvs fp16\t" + ("graph" if graph else "static") + " tok/s\tvs fp16\t"
        "layer bytes / fp16\tmax rel logit diff vs torch\targmax agreement\tnote"
    )
    fp16 = time_variant(base, prompt, args.new_tokens, args.repeats, graph)
    print(f"fp16\t{fp16.row(fp16)}\t1.000\t-\t-\t{fp16.note}", flush=True)
    reference_logits = None
    for variant, name, option in variants:
        try:
            first = base.get_submodule(names[0])  # refused before the model is copied, with the reason
            select(spec, packing, args.device, dtype, first.in_features, first.out_features, requested=name)
            t0 = time.perf_counter()
            model = copy.deepcopy(base)
            installed = install_quantized(model, quantized, packing, backend=name, dtype=dtype)
            _sync(base.device)
            built = time.perf_counter() - t0
            untimed = variant in args.untimed.split(",")
            with triton_decode_option(option):
                with torch.inference_mode():
                    logits = model(prompt).logits.float()
                timing = None if untimed else time_variant(model, prompt, args.new_tokens, args.repeats, graph)
        except Exception as exc:  # a backend that cannot build or run gets a row, not a crash
            print(f"W4G128 {variant}\t-\t-\t-\t-\t-\t-\t-\t{type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        if variant == "torch":
            reference_logits = logits
        if reference_logits is not None:
            diff = float((logits - reference_logits).abs().max() / reference_logits.abs().max())
            agree = float((logits.argmax(-1) == reference_logits.argmax(-1)).float().mean())
            agreement = f"{diff:.2e}\t{agree:.3f}"
        else:
            agreement = "(torch not yet run)\t-"
        fraction = device_nbytes(installed.values(), base.device) / fp16_bytes
        speed, note = (timing.row(fp16), timing.note) if timing else ("-\t-\t-\t-", "not timed (--untimed)")
        print(f"W4G128 {variant}\t{speed}\t{fraction:.3f}\t{agreement}\tinstalled in {built:.1f}s; {note}", flush=True)
        del model, installed
        if args.device == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
