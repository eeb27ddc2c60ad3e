"""How unevenly a block's outputs are spread over tokens: why the block loss weighs each token relative to its size.

    .venv/bin/python bench/token_energy.py [--samples 4]

SmolLM2-135M in float32 on the accuracy protocol's calibration text (tinyshakespeare, chunks of 256 tokens); per
decoder block output, the first position's norm next to the median and largest of the others, the share of the
output's energy (sum of squares) on the first positions, and the share on the largest 1 % of tokens.  A block whose
output energy sits on a few tokens has a plain squared error that sits there too.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import _calibration


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from signround.fetch import fetch_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=4, help="calibration chunks of 256 tokens")
    args = parser.parse_args()
    path = fetch_model("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = _calibration(tokenizer)[: args.samples]
    with torch.inference_mode():
        hidden = model(ids, output_hidden_states=True).hidden_states[1:]  # each block's output
    print("| block output | first position's norm | median / largest other norm | energy on first positions "
          "| energy on the largest 1 % of tokens |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|")
    for index, h in enumerate(hidden):
        norm, energy = h.norm(dim=-1), h.square().sum(-1)
        top = max(1, energy.numel() // 100)
        print(
            f"| {index} | {norm[:, 0].mean():.0f} | {norm[:, 1:].median():.0f} / {norm[:, 1:].max():.0f} "
            f"| {energy[:, 0].sum() / energy.sum():.3f} | {energy.flatten().topk(top).values.sum() / energy.sum():.3f} |"
        )


if __name__ == "__main__":
    main()
