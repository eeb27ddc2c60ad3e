"""Tuning with several devices on a GPU machine: one card vs a block split between the card and the host.

No checkpoint reaches the lent GPU machine, and neither placement nor speed depends on the weight values, so a
Llama built from a config with random weights is tuned: ``--blocks`` decoder blocks of Llama-3-8B's shape (hidden
4096, MLP 14336, 32 heads, 8 KV heads; a small vocabulary, the embedding and head are not tuned), in bf16 (fp32 for
``--tiny``), on the host as a loaded model is.  Random token ids are the calibration data.  Three runs of the same
model and data:

* ``one card``: ``device_map="cuda:0"``, each block moved whole to the card (the plain path);
* ``hooks, one card``: a dict ``device_map`` placing every layer on cuda:0 through accelerate's hooks, the several-
  device machinery without a real split; its tensors must equal the first run's bit for bit;
* ``split``: ``device_map=("cuda:0", "cpu")`` with ``max_memory`` giving the card ``--gpu-share`` of what a block's
  tuning needs (signround.placement's estimate), so accelerate's plan puts the block's first layers on the card and
  the rest on the host.  The host computes its layers with other kernels, so its tensors are compared by agreement
  (the share of equal integer codes), not bit for bit.

Printed per run and block: seconds, peak card memory (``torch.cuda.max_memory_allocated``), the block's loss; for
the split, accelerate's plan; and the estimate of one block's tuning need next to the measured peak of the first run.

    python bench/gpu_multi_device.py [--blocks 2] [--iters 10] [--nsamples 8] [--seqlen 256] [--gpu-share 0.75]
    python bench/gpu_multi_device.py --tiny    # CPU smoke run: a tiny model, "cuda:0" planned but run on the CPU
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts

import torch

SHAPES = {  # hidden, intermediate, heads, kv heads, vocab
    "llama3-8b": (4096, 14336, 32, 8, 1024),
    "tiny": (64, 128, 4, 2, 512),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    p.add_argument("--blocks", type=int, default=2, help="decoder blocks (2-4 keep the run under 5 minutes)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--gpu-share", type=float, default=0.75, help="the card's budget in the split run, as a share "
                   "of one block's estimated tuning need")  # fmt: skip
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: --shape tiny, the card's runs on the CPU")
    args = p.parse_args(argv)
    if args.tiny:
        args.shape, args.blocks, args.iters, args.nsamples, args.seqlen, args.batch_size = "tiny", 2, 2, 4, 32, 2
        args.group_size = 32
    return args


def build_model(shape: str, blocks: int, dtype: torch.dtype = torch.bfloat16):
    """A random Llama of ``shape`` with ``blocks`` decoder blocks, on the host."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    hidden, inter, heads, kv, vocab = SHAPES[shape]
    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=inter, num_hidden_layers=blocks, num_attention_heads=heads,
        num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    # eager attention: its backward is deterministic on CUDA (the hooks-vs-plain check compares bit for bit)
    return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager").eval()


def _card(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


def tune(args: argparse.Namespace, device, max_memory=None) -> tuple[dict, list[tuple[float, int, float]]]:
    """Tune a fresh model on ``device``; (quantized tensors by layer, per block (seconds, peak bytes, loss))."""
    from signround.schemes import LayerSpec, resolve_plan
    from signround.tuning import engine
    from signround.tuning.block import TuneOptions

    model = build_model(args.shape, args.blocks, torch.float32 if args.tiny else torch.bfloat16)
    ids = torch.randint(
        0, SHAPES[args.shape][4], (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(1)
    )
    plan = resolve_plan(engine.quantizable_layers(model), LayerSpec(bits=args.bits, group_size=args.group_size))
    options = TuneOptions(iters=args.iters, batch_size=args.batch_size, device=device, show_progress=False)
    if max_memory is not None:
        options.max_memory = max_memory  # read by signround.placement.Spread (budgets as users pass them)
    card = torch.device(args.device)
    rows: list[tuple[float, int, float]] = []
    last = [time.perf_counter()]

    def on_block(checkpoint) -> None:
        peak = 0
        if _card(card):
            torch.cuda.synchronize(card)
            peak = torch.cuda.max_memory_allocated(card)
            torch.cuda.reset_peak_memory_stats(card)
        now = time.perf_counter()
        loss = checkpoint.report.block_losses[-1][1]
        rows.append((now - last[0], peak, float("nan") if loss is None else loss))
        last[0] = now

    if _card(card):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(card)
    report = engine.run(model, plan, ids, None, options, on_block=on_block)
    return report.quantized, rows


def estimate(args: argparse.Namespace) -> int:
    """signround.placement's estimate of one block's tuning need on the main device (weights, tuning state,
    activations, the cached streams)."""
    from signround import placement

    block = build_model(args.shape, 1, torch.float32 if args.tiny else torch.bfloat16).model.layers[0]
    tokens = args.batch_size * args.seqlen
    streams = torch.empty(
        args.nsamples, args.seqlen, SHAPES[args.shape][0], dtype=block.input_layernorm.weight.dtype, device="meta"
    )
    return placement.tuning_bytes(block, tokens=tokens)[1] + placement.main_reserve(streams, args.batch_size, True)


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size else "-"


def report(name: str, rows: list[tuple[float, int, float]]) -> None:
    for i, (seconds, peak, loss) in enumerate(rows):
        print(f"{name}\tblock {i}\t{seconds:.1f} s\tpeak {_gib(peak)}\tloss {loss:.4g}")
    print(f"{name}\tper block\t{sum(r[0] for r in rows) / max(len(rows), 1):.1f} s (block 0 includes the capture)")


def same(a: dict, b: dict) -> bool:
    return all(
        torch.equal(getattr(qt, p), getattr(b[n], p)) for n, qt in a.items() for p in ("codes", "scales", "zeros")
    )


def agreement(a: dict, b: dict) -> float:
    equal = sum(int((qt.codes == b[n].codes).sum()) for n, qt in a.items())
    return equal / sum(qt.codes.numel() for qt in a.values())


def main(argv: list[str] | None = None) -> int:
    from signround import placement

    args = parse_args(argv)
    physical = placement.physical
    deterministic = torch.are_deterministic_algorithms_enabled()
    if args.tiny:  # the plan names the card; the CPU runs it (as the CPU test suite does)
        placement.physical = lambda device: torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device here: run with --tiny for the CPU smoke run", file=sys.stderr)
        return 2
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        card = args.device
        need = estimate(args)
        print(
            f"shape {args.shape} x {args.blocks} blocks, {args.nsamples} x {args.seqlen} tokens, bs {args.batch_size}, "
            f"{args.iters} iters, W{args.bits}G{args.group_size}; estimated tuning need of a block {_gib(need)}"
        )
        alone, rows = tune(args, "cpu" if args.tiny else card)
        report("one card", rows)
        print(f"one card\testimate {_gib(need)} vs measured peak {_gib(max(r[1] for r in rows))}")
        hooked, rows = tune(args, {"self_attn": card, "mlp": card, "input_layernorm": card})
        report("hooks, one card", rows)
        exact = same(alone, hooked)
        print(f"hooks, one card\ttensors equal to one card's: {exact}")
        if not exact:  # is the plain path itself reproducible here?
            again, _ = tune(args, "cpu" if args.tiny else card)
            print(f"hooks, one card\tcodes agreement {agreement(alone, hooked):.4f}; one card run again equal to "
                  f"itself: {same(alone, again)}")  # fmt: skip
        budgets = {card: int(need * args.gpu_share), "cpu": 2**40}
        planned: list[dict] = []
        real_plan = placement.plan_block

        def recording(*a, **k):
            planned.append(real_plan(*a, **k))
            return planned[-1]

        placement.plan_block = recording
        try:
            split, rows = tune(args, (card, "cpu"), budgets)
        finally:
            placement.plan_block = real_plan
        report("split", rows)
        print(f"split\tplan of block 0: {planned[0] if planned else None}")
        print(f"split\tcodes equal to one card's: {agreement(alone, split):.4f}")
        used = set(planned[0].values()) if planned else set()
        ok = exact and used == {card, "cpu"}
        if args.tiny:
            ok = ok and same(alone, split)  # one device's arithmetic: exactly equal
        print("OK" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        placement.physical = physical
        torch.use_deterministic_algorithms(deterministic)


if __name__ == "__main__":
    sys.exit(main())
