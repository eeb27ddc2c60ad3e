"""One tuned SmolLM2-135M, exported to every format, reloaded from disk, evaluated: the ppl must not depend on the format.

W4G32 *asymmetric* (the only scheme all four formats hold: AWQ is 4-bit asym), SignRound iters 50 on the
accuracy benchmark's calibration set (32 x 256 Shakespeare tokens); each format's folder is loaded back with
``from_pretrained(dir, quantization_config=signround.AutoRoundConfig())`` and evaluated on the accuracy
benchmark's 40 x 512 WikiText windows.  Rows are appended to bench/results/formats.jsonl.

    python bench/formats.py [--iters 50]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from accuracy import CACHE, _calibration, _eval_windows, _evaluate  # noqa: E402

OUT = ROOT / "bench" / "results" / "formats.jsonl"
FORMATS = ["auto_round", "auto_gptq", "auto_awq", "llm_compressor"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import signround
    from signround.fetch import fetch_model
    from signround.layers import quant_linears

    torch.set_num_threads(2)
    fp_dir = fetch_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    model = AutoModelForCausalLM.from_pretrained(fp_dir, dtype=torch.float32)
    ref = CACHE / "fp32_logprobs.safetensors"
    if not ref.exists():
        raise SystemExit("run `python bench/accuracy.py --run fp32` first (it caches the reference log-probs)")
    ar = signround.AutoRound(
        model, tokenizer, bits=4, group_size=32, sym=False, iters=args.iters, dataset=_calibration(tokenizer),
        nsamples=32, seqlen=256, batch_size=8, show_progress=False,
    )  # fmt: skip
    start = time.perf_counter()
    ar.quantize()
    tune_seconds = time.perf_counter() - start
    wins = _eval_windows(tokenizer)
    in_memory_ppl, in_memory_kl = _evaluate(ar.model, wins, ref, None)
    rows = [{"format": "in memory (before packing)", "ppl": in_memory_ppl, "kl": in_memory_kl}]
    with tempfile.TemporaryDirectory() as tmp:
        out = ar.save_quantized(Path(tmp) / "out", format=",".join(FORMATS))
        for fmt in FORMATS:
            folder = out / fmt
            size_mb = sum(p.stat().st_size for p in folder.glob("*.safetensors")) / 2**20
            loaded = AutoModelForCausalLM.from_pretrained(folder, quantization_config=signround.AutoRoundConfig())
            quant_method = json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"]
            ppl, kl = _evaluate(loaded, wins, ref, None)
            rows.append(
                {"format": fmt, "quant_method": quant_method, "quantized_layers": len(quant_linears(loaded)),
                 "safetensors_mb": round(size_mb, 1), "ppl": ppl, "kl": kl}
            )  # fmt: skip
            del loaded
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with OUT.open("a") as f:
        for row in rows:
            row = {**row, "ppl": round(row["ppl"], 4), "kl": round(row["kl"], 5), "iters": args.iters,
                   "tune_seconds": round(tune_seconds, 1), "scheme": "W4G32 asym"}  # fmt: skip
            f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
