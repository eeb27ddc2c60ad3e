"""Run GGUF files in llama.cpp (llama-cpp-python) and report token ids and logits as JSON.

Runs under the llama venv, which has llama-cpp-python and numpy but neither torch nor signround:

    .venv-llama/bin/python integration_tests/gguf_llama_worker.py JOBS.json OUT.json

``JOBS.json`` is a list of ``{"gguf": path, "prompts": [str, ...], "special_prompts": [str, ...], "logits_ids":
[int, ...]}``.  For each job the output list holds ``{"ids": [[int, ...] per prompt], "special_ids": [...],
"logits": [[float, ...] per position of logits_ids], "n_vocab": int, "chat_template": str | None}``.  Prompts are tokenized the way llama.cpp
tokenizes a user prompt by default: special tokens added as the file's ``add_bos`` / ``add_eos`` say
(``add_bos=True`` in llama-cpp-python means "add_special"), special-token text left as text; ``special_prompts``
the same but with special-token text parsed (as transformers always does).  Logits come from one evaluation of
``logits_ids`` with every position kept, with an f32 KV cache so only the weights' arithmetic differs from an
f32 reference.  One process serves all jobs so llama.cpp's start-up is paid once.
"""

from __future__ import annotations

import json
import sys

import llama_cpp


def run_job(job: dict) -> dict:
    """Load one file (CPU, 2 threads, context just long enough) and tokenize / evaluate as ``job`` asks."""
    ids = job["logits_ids"]
    llm = llama_cpp.Llama(
        model_path=job["gguf"],
        n_ctx=max(64, len(ids) + 8),
        n_batch=max(64, len(ids)),
        n_threads=2,
        logits_all=True,
        type_k=0,  # GGML_TYPE_F32: an f16 KV cache would round K and V on top of the weights
        type_v=0,
        verbose=False,
    )
    tokens = [llm.tokenize(p.encode("utf-8"), add_bos=True, special=False) for p in job["prompts"]]
    special = [llm.tokenize(p.encode("utf-8"), add_bos=True, special=True) for p in job.get("special_prompts", [])]
    llm.reset()
    llm.eval(ids)
    logits = llm.scores[: len(ids)].tolist()
    template = llm.metadata.get("tokenizer.chat_template")
    return {
        "ids": tokens,
        "special_ids": special,
        "logits": logits,
        "n_vocab": llm.n_vocab(),
        "chat_template": template,
    }


def main(argv: list[str]) -> int:
    jobs_path, out_path = argv
    with open(jobs_path, encoding="utf-8") as f:
        jobs = json.load(f)
    results = [run_job(job) for job in jobs]
    with open(out_path, "w", encoding="utf-8") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
