"""CUDA kernel check and timing: marlin / exllamav2 / triton / torch backends on random W4G128 layers vs fp16.

For each layer shape (``in x out``) a random weight is quantized (4-bit, group 128, symmetric, RTN) and built as a
QuantLinear of every backend that can run it; each is compared with the ``torch`` reference backend (max |diff| /
max |ref| over M=1 and M=512 inputs) and timed with CUDA events at M=1 (decode) and M=512 (prefill) against
``F.linear`` with the dense fp16 weight.  A backend that cannot run (package missing, kernel build failure) gets
a row saying why.  Needs a CUDA GPU, plus ``gptqmodel>=7.6,<7.7`` for marlin / exllamav2 (GPTQModel compiles
their CUDA extensions on first use, which can take minutes: the build time is printed) and ``triton`` for triton.

Two things would flatter or hide a kernel at M=1, and both are taken out:
* the L2 cache: a 4096 x 4096 4-bit layer (8 MiB) fits in an H100's 50 MiB L2, so a loop over one layer would
  never read DRAM, as decode does.  Each variant is built as several copies whose bytes together exceed twice the
  L2, called in turn;
* launch cost: back-to-back eager calls measure the slower of the CPU's launches and the GPU's work.  M=1 is also
  timed as one CUDA graph replaying the calls, which is the kernel's own time; eager minus graph is the launch
  cost that a plain ``generate`` pays.

    python bench/gpu_kernels.py [--shapes 4096x4096,4096x11008,11008x4096] [--dtype float16] [--iters 200]
    python bench/gpu_kernels.py --triton-tiles      # our Triton kernel's launch shapes at one row
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

BACKENDS = ("marlin", "exllamav2", "triton", "torch")
BACKEND_HEADER = "shape\tbackend\tmax rel err vs torch\tM=1 us\tspeedup\tM=1 graph us\tspeedup\tM=512 us\tspeedup\tnote"
TILE_HEADER = "shape\tlaunch shape\tM=1 graph us\tspeedup vs F.linear\tmax rel err vs fp32"


def copies_beyond_l2(nbytes: int, device: str) -> int:
    """How many distinct copies of ``nbytes`` of weights to call in turn so that each call reads DRAM, not L2."""
    if torch.device(device).type != "cuda":
        return 1
    l2 = torch.cuda.get_device_properties(torch.device(device)).L2_cache_size
    return max(1, -(-2 * l2 // nbytes))


def with_copies(tensors: tuple[torch.Tensor, ...], device: str) -> list[tuple[torch.Tensor, ...]]:
    """``tensors`` and as many clones of them as make the whole exceed twice the L2 (one on CPU)."""
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    return [tensors] + [tuple(t.clone() for t in tensors) for _ in range(copies_beyond_l2(nbytes, device) - 1)]


def cuda_us(fns: list[Callable[[], object]], iters: int, warmup: int = 10, graph: bool = False) -> float:
    """Mean microseconds per call over ``iters`` calls cycling through ``fns``, timed with CUDA events: eager
    back-to-back calls, or (``graph``) one CUDA graph that holds the same calls, replayed."""
    calls = [fns[i % len(fns)] for i in range(iters)]
    for fn in calls[: max(warmup, len(fns))]:
        fn()
    torch.cuda.synchronize()
    if graph:
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            for fn in calls:
                fn()
        captured.replay()  # warm
        torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    if graph:
        captured.replay()
    else:
        for fn in calls:
            fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / iters


def replay_matches_eager(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> bool:
    """Whether a CUDA graph of ``layer`` captured on other input, replayed on ``x``, gives ``layer(x)``: a kernel
    launched off torch's current stream is not recorded, its replay is empty, and a graph timing of it measures
    nothing (GPTQModel's ExLlamaV2 timed 0.1 us that way before its layer refused capture)."""
    static = torch.randn_like(x)
    layer(static)
    torch.cuda.synchronize()
    captured = torch.cuda.CUDAGraph()
    with torch.cuda.graph(captured):
        out = layer(static)
    static.copy_(x)
    captured.replay()
    return bool(torch.allclose(out, layer(x), rtol=1e-3, atol=1e-3))


def device_nbytes(layers: Iterable[nn.Module], device: torch.device | str) -> int:
    """Bytes of the layers' tensors on ``device``'s type, each tensor once, a GPTQModel kernel's included: the
    marlin / exllamav2 wrappers hold that layer outside the module tree (and move our checkpoint tensors to the
    CPU).  Also ``bench/gpu_decode.py``'s weight-bytes column."""
    device_type = torch.device(device).type
    on_device = {
        t.data_ptr(): t.numel() * t.element_size()
        for layer in layers
        for m in (layer, getattr(layer, "kernel", None))
        if isinstance(m, nn.Module)
        for t in [*m.buffers(), *m.parameters()]
        if t.device.type == device_type and t.numel()
    }
    return sum(on_device.values())


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.float() - ref.float()).abs().max() / ref.float().abs().max())


def bench_shape(in_f: int, out_f: int, dtype: torch.dtype, iters: int, device: str = "cuda") -> list[str]:
    """One row per backend for one layer shape (``device="cpu"`` only checks this code: no CUDA backend runs)."""
    from signround.kernels import get_backend
    from signround.kernels.torch import TorchQuantLinear
    from signround.quant.int import dequantize, quantize
    from signround.schemes import LayerSpec

    spec, packing = LayerSpec(bits=4, group_size=128, sym=True), "gptq"
    g = torch.Generator(device=device).manual_seed(0)
    qt = quantize(torch.randn(out_f, in_f, device=device, generator=g) * 0.02, spec)
    xs = {m: torch.randn(m, in_f, device=device, dtype=dtype, generator=g) for m in (1, 512)}
    dense = dequantize(qt, dtype)
    ref = TorchQuantLinear.from_quantized(qt, packing, None, dtype)
    with torch.no_grad():
        expected = {m: ref(x) for m, x in xs.items()}
        linears = {
            m: [lambda x=x, w=w: F.linear(x, w) for (w,) in with_copies((dense,), device)] for m, x in xs.items()
        }
        base = {m: cuda_us(fns, iters) for m, fns in linears.items()}
        base_graph = cuda_us(linears[1], iters, graph=True)
    rows = [f"{in_f}x{out_f}\tfp16 F.linear\t-\t{base[1]:.1f}\t1.00\t{base_graph:.1f}\t1.00\t{base[512]:.1f}\t1.00\t"]
    for name in BACKENDS:
        unusable = f"{in_f}x{out_f}\t{name}\t" + "-\t" * 7  # a row without figures; its note says why
        try:
            backend = get_backend(name)
        except ValueError as err:
            rows.append(f"{unusable}{err}")
            continue
        if reason := backend.reject_reason(spec, packing, device, dtype, in_f, out_f):
            rows.append(f"{unusable}{reason}")
            continue
        try:
            t0 = time.perf_counter()
            layer = backend.quant_linear.from_quantized(qt, packing, None, dtype)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            built = time.perf_counter() - t0
            copies = copies_beyond_l2(device_nbytes([layer], device), device)
            layers = [layer] + [
                backend.quant_linear.from_quantized(qt, packing, None, dtype) for _ in range(copies - 1)
            ]
            with torch.no_grad():
                err = max(rel_err(layer(x), expected[m]) for m, x in xs.items())
                calls = {m: [lambda x=x, f=f: f(x) for f in layers] for m, x in xs.items()}
                us = {m: cuda_us(fns, iters) for m, fns in calls.items()}
                try:
                    graph_us, graph = cuda_us(calls[1], iters, graph=True), ""
                    if not replay_matches_eager(layer, xs[1]):
                        graph_us, graph = None, "; graph: its replay does not give the eager output (not captured)"
                except Exception as exc:  # a kernel that cannot be captured keeps its eager figures
                    graph_us, graph = None, f"; graph: {type(exc).__name__}: {str(exc)[:120]}"
        except Exception as exc:  # a kernel that fails to build or run gets a row, not a crash
            rows.append(f"{unusable}{type(exc).__name__}: {str(exc)[:200]}")
            continue
        graphed = f"{graph_us:.1f}\t{base_graph / graph_us:.2f}" if graph_us else "-\t-"
        rows.append(
            f"{in_f}x{out_f}\t{name}\t{err:.2e}\t{us[1]:.1f}\t{base[1] / us[1]:.2f}\t{graphed}\t{us[512]:.1f}\t"
            f"{base[512] / us[512]:.2f}\tbuilt in {built:.1f}s, {copies} copies{graph}"
        )
    return rows


def triton_tile_sweep(in_f: int, out_f: int, dtype: torch.dtype, iters: int, device: str = "cuda") -> list[str]:
    """Our Triton kernel at one row (decode) under several launch shapes, against fp16 ``F.linear``: the data for
    ``default_tiles``' decode choice, which was set without a GPU.  Timed as CUDA graph replays (the launch cost,
    the same for every shape, taken out) over copies beyond the L2.  At one row a tile of 64 outputs gives a
    4096-output layer 64 programs, under half of an H100's 132 SMs; narrower tiles, deeper pipelines and loading
    each packed word once (``unpack_once``) are the candidates.  ``device="cpu"`` (under ``TRITON_INTERPRET=1``)
    only checks this code."""
    from signround.kernels.triton import Tiles, dequant_matmul, pack_along_k
    from signround.quant.int import dequantize, quantize
    from signround.schemes import LayerSpec

    spec = LayerSpec(bits=4, group_size=128, sym=True)
    g = torch.Generator(device=device).manual_seed(0)
    qt = quantize(torch.randn(out_f, in_f, device=device, generator=g) * 0.02, spec)
    packed = (pack_along_k(qt.codes, 4), qt.scales.t().contiguous(), qt.zeros.t().to(torch.uint8).contiguous())
    weights = with_copies(packed, device)
    x = torch.randn(1, in_f, device=device, dtype=dtype, generator=g)
    dense = dequantize(qt, dtype)
    with torch.no_grad():
        base = cuda_us([lambda w=w: F.linear(x, w) for (w,) in with_copies((dense,), device)], iters, graph=True)
        expected = F.linear(x.float(), dense.float())
    rows = []
    for block_n in (16, 32, 64, 128):
        for num_stages in (2, 4):
            for unpack_once in (False, True):
                tiles = Tiles(16, block_n, 128, num_warps=4, num_stages=num_stages, unpack_once=unpack_once)
                calls = [lambda w=w, t=tiles: dequant_matmul(x, *w, None, 4, 128, t) for w in weights]
                try:
                    with torch.no_grad():
                        got = calls[0]()
                        us = cuda_us(calls, iters, graph=True)
                except Exception as exc:  # a launch shape the compiler refuses gets a row
                    rows.append(f"{in_f}x{out_f}\t{tiles}\t-\t-\t{type(exc).__name__}: {str(exc)[:120]}")
                    continue
                rows.append(
                    f"{in_f}x{out_f}\tBLOCK_N={block_n} stages={num_stages} unpack_once={unpack_once}\t{us:.1f}\t"
                    f"{base / us:.2f}\t{rel_err(got, expected):.1e}"
                )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096", help="in x out, comma separated")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--triton-tiles", action="store_true", help="only our Triton kernel's launch shapes at M=1")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"bench/gpu_kernels.py needs a CUDA GPU; torch {torch.__version__} sees none. Nothing to do.")
        return 0
    dtype = getattr(torch, args.dtype)
    if args.triton_tiles:
        title, header, rows_for = "triton W4G128 at M=1", TILE_HEADER, triton_tile_sweep
    else:
        title, header, rows_for = "W4G128 sym", BACKEND_HEADER, bench_shape
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {title} | {args.dtype}")
    print(header)
    for shape in args.shapes.split(","):
        in_f, out_f = (int(v) for v in shape.lower().split("x"))
        for row in rows_for(in_f, out_f, dtype, args.iters):
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
