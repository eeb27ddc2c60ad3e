"""Where a block's tuning time goes: SmolLM2-135M's first blocks tuned under torch.profiler, per-op shares.

    .venv/bin/python bench/profile_tune.py [--blocks 2] [--iters 20] [--bits 4 --group-size 32 | --gguf q5_0] [--no-amp]
    python3 bench/profile_tune.py --device cuda --model DIR --calib FILE [--nsamples 128 --seqlen 2048]   # a GPU
    .venv/bin/python bench/profile_tune.py --blocks 1 --iters 10 --ops-per-iteration   # ops one iteration dispatches

The calibration of bench/accuracy.py (tinyshakespeare, 32 x 256 tokens, batch 8) unless --nsamples / --seqlen say
otherwise.  On a GPU (``--device cuda``: blocks tuned there, as ``device_map=0``) the profiler also records the
kernels, and a second table sorts by their time.  Prints the wall time of the
walk split into phases (the loop's iterations, the candidate judging, everything else: input capture, targets,
start search), the ops with the largest self CPU time, and the FLOP bound of the iterations: one block's forward
+ backward is ``6 x tokens x weights`` multiply-adds' worth of matmul FLOPs (forward 2, backward 4), against this
CPU's measured matmul peak in the loop's dtype (``--peak`` only measures that).  Nothing is written: the figures
belong to this machine and moment (name the CPU flags next to any of them).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import CALIB, _calibration

from signround.models import find_blocks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeat: int = 10, device: str = "cpu") -> float:
    """Measured GFLOP/s of a square ``n x n`` matmul in ``dtype`` on this CPU or ``device`` (the loop's matmuls
    are of this order: tokens x hidden x intermediate)."""
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    a @ b
    _sync(a.device)
    start = time.perf_counter()
    for _ in range(repeat):
        a @ b
    _sync(a.device)
    return 2 * n**3 * repeat / (time.perf_counter() - start) / 1e9


def plain_step_ms(block: torch.nn.Module, hidden: torch.Tensor, kwargs: dict, dtype: torch.dtype, repeat: int) -> float:
    """Milliseconds of one forward + backward of the unquantized block (weights trainable, in ``dtype``) on one
    batch: what any tuner pays per step before quantizing anything, the floor of an iteration."""
    import copy

    from signround.tuning.block import block_output, cast_floats

    plain = copy.deepcopy(block).to(hidden.device, dtype)
    for param in plain.parameters():
        param.requires_grad_(True)
    hidden, kwargs = cast_floats(hidden, dtype), cast_floats(kwargs, dtype)

    def step() -> None:
        block_output(plain(hidden, **kwargs)).float().square().mean().backward()

    step()
    _sync(hidden.device)
    start = time.perf_counter()
    for _ in range(repeat):
        step()
    _sync(hidden.device)
    return (time.perf_counter() - start) / repeat * 1e3


def ops_per_iteration(load, plan, ids: torch.Tensor, options, top: int) -> None:
    """The aten ops one tuning iteration dispatches, by name: the difference of two whole walks (fresh models
    from ``load``) at ``iters`` and ``2 x iters``, divided by the extra iterations, so that input capture, start
    search and judging cancel: the mean over iterations ``n+1 .. 2n`` (an iteration that improves the best step
    also packs its codes, so early iterations cost more ops).  Deterministic on any CPU: on a GPU nearly every op that is not a view is a kernel
    launch, which the host pays for while small kernels leave the GPU idle (docs/benchmarks.md, the H200 profile).
    Eager only: under torch.compile the counts depend on which walk traces and compiles, not on the loop."""
    import collections
    import dataclasses

    from signround.tuning import engine

    def counts(iters: int) -> collections.Counter:
        model = load()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            engine.run(model, plan, ids, None, dataclasses.replace(options, iters=iters))
        return collections.Counter({e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::")})

    n = options.iters
    options = dataclasses.replace(options, enable_torch_compile=False)
    low, high = counts(n), counts(2 * n)
    blocks = len(find_blocks(load())[1])
    per = {k: (high[k] - low[k]) / (n * blocks) for k in high if high[k] != low[k]}
    views = {"aten::view", "aten::as_strided", "aten::slice", "aten::reshape", "aten::permute", "aten::transpose",
             "aten::unsqueeze", "aten::squeeze", "aten::expand", "aten::detach", "aten::t", "aten::_unsafe_view",
             "aten::alias", "aten::select", "aten::resolve_conj", "aten::resolve_neg", "aten::to", "aten::empty",
             "aten::empty_strided", "aten::empty_like", "aten::lift_fresh", "aten::result_type",
             # composites: their kernels are counted under the ops they call (copy_, fill_, zero_, mm ...)
             "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::zeros", "aten::zeros_like",
             "aten::full", "aten::full_like", "aten::linear", "aten::matmul", "aten::new_zeros",
             "aten::new_empty"}  # fmt: skip
    work = sum(v for k, v in per.items() if k not in views)
    print(f"aten ops per iteration of one block: {sum(per.values()):.0f}, of which {work:.0f} not views, "
          f"allocations or composites (about the kernels a GPU would launch)")  # fmt: skip
    for key, value in sorted(per.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{value:9.1f}  {key}{'  (view / allocation / composite)' if key in views else ''}")


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from signround.fetch import fetch_model
    from signround.schemes import LayerSpec, gguf_spec_fields, resolve_plan
    from signround.tuning import block as block_mod
    from signround.tuning import engine
    from signround.tuning.block import TuneOptions, fast_bf16

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--gguf", metavar="TYPE", help="tune toward a GGUF type (e.g. q5_0) instead of the integer grid")
    p.add_argument("--no-amp", action="store_true")
    p.add_argument(
        "--compile", choices=["auto", "on", "off"], default="auto", help="enable_torch_compile None / True / False"
    )
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peak", action="store_true", help="only measure the matmul peak (float32 and bfloat16)")
    p.add_argument("--device", default="cpu", help="where blocks are tuned: cpu (default) or cuda")
    p.add_argument("--model", type=Path, help="model directory (default: the fetched SmolLM2-135M)")
    p.add_argument("--calib", type=Path, help="calibration text (default: ../shared/data/tinyshakespeare.txt)")
    p.add_argument(
        "--ops-per-iteration", action="store_true", help="count the aten ops of one iteration (two walks) and stop"
    )
    p.add_argument("--nsamples", type=int, default=32)
    p.add_argument("--seqlen", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.peak:
        for dtype in (torch.float32, torch.bfloat16):
            print(f"matmul peak {dtype}: {matmul_peak(dtype, device=args.device):.0f} GFLOP/s")
        return

    fp_dir = args.model or fetch_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(fp_dir)

    def load():
        """The model cut to its first ``--blocks`` blocks."""
        model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
        del find_blocks(model)[1][args.blocks :]
        model.config.num_hidden_layers = args.blocks
        return model

    model = load()
    path, blocks = find_blocks(model)
    if args.calib or (args.nsamples, args.seqlen) != (32, 256):
        from signround.data import chunk_token_ids

        text = (args.calib or CALIB).read_text()
        stream = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
        ids = chunk_token_ids(stream, args.seqlen, args.nsamples)
    else:
        ids = _calibration(tokenizer)
    if args.gguf:
        spec = LayerSpec(**gguf_spec_fields(args.gguf.lower()))
    else:
        spec = LayerSpec(bits=args.bits, group_size=args.group_size, sym=True)
    plan = resolve_plan(engine.quantizable_layers(model), spec)
    options = TuneOptions(
        iters=args.iters,
        batch_size=8,
        show_progress=False,
        amp=not args.no_amp,
        enable_torch_compile={"auto": None, "on": True, "off": False}[args.compile],
        device=None if device.type == "cpu" else str(device),
    )

    if args.ops_per_iteration:
        ops_per_iteration(load, plan, ids, options, args.top)
        return

    # Phase timers around the loop and the judging (wrapping the module functions the walk calls).
    phases = {"loop iterations": 0.0, "candidate judging": 0.0}
    per_block: list[float] = []  # each block's loop + judging: the first ones also pay for any compiling

    def timed(fn, key):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[key] += time.perf_counter() - start
                if key == "loop iterations":
                    per_block.append(time.perf_counter() - start)

        return wrapper

    judging = block_mod._full_loss
    block_mod._full_loss = timed(judging, "candidate judging")
    loop = block_mod._signsgd_loop
    block_mod._signsgd_loop = timed(loop, "loop iterations")

    from signround.tuning.inputs import capture_block_inputs

    loop_dtype = torch.bfloat16 if options.amp and fast_bf16(device) else torch.float32
    with torch.no_grad():
        first = capture_block_inputs(model, blocks[0], ids[: options.batch_size], None).placed(device, device)
    hidden, kwargs = first.batch(torch.arange(options.batch_size, device=device))
    floor_ms = plain_step_ms(blocks[0], hidden, kwargs, loop_dtype, repeat=10)
    del first, hidden, kwargs

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        engine.run(model, plan, ids, None, options)
        _sync(device)
        wall = time.perf_counter() - start
    phases["loop iterations"] -= phases["candidate judging"]  # (the judging runs inside the loop function)
    phases["everything else"] = wall - sum(phases.values())

    dtype = loop_dtype
    block = model.get_submodule(path)[0]
    weights = sum(m.weight.numel() for n, m in block.named_modules() if f"{path}.0.{n}" in plan.layers)
    tokens = options.batch_size * ids.shape[1]
    flops = 6 * tokens * weights * args.iters * args.blocks
    peak = matmul_peak(dtype, device=args.device)
    print(f"wall {wall:.1f} s for {args.blocks} blocks x {args.iters} iters, loop dtype {dtype}")
    for key, seconds in phases.items():
        print(f"  {key:18s} {seconds:7.2f} s  {100 * seconds / wall:5.1f} %")
    if args.iters and per_block:  # iters 0: no loop, only the start (optimised RTN / the GGUF search)
        loop_s = phases["loop iterations"]
        steady = sorted(per_block[len(per_block) // 2 :])[len(per_block[len(per_block) // 2 :]) // 2]
        print(f"per block (loop + judging): {', '.join(f'{t:.2f}' for t in per_block)} s; steady {steady:.2f} s")
        print(
            f"steady {1e3 * steady / args.iters:.1f} ms per iteration (judging included) against {floor_ms:.1f} ms for a "
            f"forward + backward of the unquantized block on one batch ({steady * 1e3 / args.iters / floor_ms:.2f}x)"
        )
        print(
            f"matmul FLOPs of the iterations {flops / 1e9:.0f} G: {flops / loop_s / 1e9:.0f} GFLOP/s achieved against a "
            f"{dtype} matmul peak of {peak:.0f} GFLOP/s ({100 * flops / loop_s / 1e9 / peak:.0f} %); "
            f"{tokens * args.iters * args.blocks / loop_s:.0f} tokens/s through one block"
        )
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=48))
    if device.type == "cuda":
        launches = sum(e.count for e in table if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx"))
        print(f"kernel launches: {launches} ({launches / max(1, args.iters * args.blocks):.0f} per iteration)")
        print(table.table(sort_by="self_device_time_total", row_limit=args.top, max_name_column_width=48))


if __name__ == "__main__":
    main()
