"""GGUF anchor benchmark, llama.cpp side: SmolLM2-135M quantized by llama.cpp 0.3.36 itself, scored by llama.cpp.

Rows (one JSON line per (type, imatrix), appended to ``--out``; rows already there are skipped):
* ``f32``: llama.cpp's ``convert_hf_to_gguf.py --outtype f32`` of the fp32 checkpoint (the baseline);
* each ``--types`` entry without importance matrix: ``llama_model_quantize`` (llama-cpp-python) of the f32 file
  at that file type (through integration_tests/llamacpp_worker.py), plus a check that the built ``llama-quantize``
  binary writes a byte-identical file;
* each ``--types`` entry with importance matrix: ``llama-imatrix`` (built from the sdist's source into
  /work/wheels/llama-tools) on the f32 file over the calibration text of bench/accuracy.py (tinyshakespeare,
  tokens without special tokens, the first 32 chunks of 256), then ``llama-quantize --imatrix``.

Evaluation (bench/accuracy.py's protocol): wikitext-2 test tokenized whole by the Hugging Face tokenizer, the first
40 non-overlapping 512-token windows; llama.cpp computes the logits of those exact ids (a fresh KV cache per window,
bench/gguf_llama_eval_worker.py under .venv-llama); ppl = exp(mean NLL), kl = mean KL(p_fp32 || p_gguf) over all
positions against the Hugging Face fp32 model's log-probs (computed here once with torch, cached as float16).
``tokens_match``: llama.cpp's tokenizer gives the Hugging Face ids on the whole evaluation text;
``tokens_match_windows``: on the evaluated 40 x 512 ids (the logits are computed from the Hugging Face ids either
way); ``calib_tokens_match`` (imatrix rows): on the whole calibration text, which llama-imatrix tokenizes itself.

    .venv/bin/python bench/gguf_llamacpp.py --types Q4_0 Q4_K_M Q3_K_M Q2_K Q6_K --imatrix --no-imatrix \
        --out bench/results/gguf_llamacpp.jsonl --threads 2

Needs no network: the model must have been fetched (``signround fetch-model smollm2-135m``), .venv-llama must hold
llama-cpp-python 0.3.36, and the imatrix rows need the built tools (see ``build_tools_hint``). Intermediate files go
to ``--work`` (default /tmp/gguf-llamacpp; ~2 GB of reference log-probs plus the GGUF files).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
CALIB = SHARED / "data" / "tinyshakespeare.txt"
EVAL = SHARED / "data" / "wikitext2_test.txt"
RESULTS = ROOT / "bench" / "results" / "gguf_llamacpp.jsonl"
VENV_PY = ROOT / ".venv" / "bin" / "python"
LLAMA_PY = ROOT / ".venv-llama" / "bin" / "python"
WORKER = ROOT / "bench" / "gguf_llama_eval_worker.py"
CONVERT_WORKER = ROOT / "integration_tests" / "llamacpp_worker.py"
# the llama-cpp-python sdist: where `make venv-llama` unpacks it, else a wheel cache next to the checkout
SDIST = next(
    (
        d
        for d in (
            ROOT / ".venv-llama" / "src" / "llama_cpp_python-0.3.36",
            ROOT.parent / "wheels" / "llama_cpp_python-0.3.36",
        )
        if d.is_dir()
    ),
    ROOT / ".venv-llama" / "src" / "llama_cpp_python-0.3.36",
)
LLAMA_CPP_DIR = SDIST / "vendor" / "llama.cpp"
TOOLS = ROOT.parent / "wheels" / "llama-tools"  # llama-imatrix / llama-quantize built from SDIST (see build_tools_hint)
BIN = TOOLS / "build" / "bin"
TOOL = "llama.cpp 0.3.36"
MODEL = "smollm2-135m"
TYPES = ["Q4_0", "Q4_K_M", "Q3_K_M", "Q2_K", "Q6_K"]
CALIB_SEQLEN, CALIB_N = 256, 32
EVAL_SEQLEN, EVAL_N = 512, 40

build_tools_hint = f"""\
cmake -S {LLAMA_CPP_DIR} -B {TOOLS}/build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \\
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \\
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_OPENSSL=OFF
cmake --build {TOOLS}/build --target llama-imatrix llama-perplexity llama-quantize -j2"""

_SIMD = ("sse", "ssse3", "avx", "fma", "f16c", "amx", "vnni", "bmi", "popcnt")


def cpu_info() -> dict:
    """The CPU's model name and its SIMD-relevant flags (from /proc/cpuinfo)."""
    name, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = value.split()
    except OSError:
        pass
    return {"cpu": name, "cpu_flags": [f for f in flags if f.startswith(_SIMD)], "n_cpu": os.cpu_count()}


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run(cmd: list[str], log: Path | None = None, env: dict | None = None) -> str:
    """Run a command (output to ``log`` if given), fail loudly; return the command as one shell line."""
    line = shlex.join(str(c) for c in cmd)
    _log(f"$ {line}")
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    full_env.update(env or {})
    if log is None:
        subprocess.run([str(c) for c in cmd], check=True, env=full_env)
    else:
        with log.open("w") as f:
            rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, env=full_env).returncode
        if rc:
            raise SystemExit(f"command failed ({rc}), see {log}: {line}")
    return line


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _rows(path: Path) -> dict:
    rows = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[_row_key(row["type"], bool(row["imatrix"]), row.get("calib_n", CALIB_N))] = row
    return rows


def _row_key(qtype: str, imatrix: bool, calib_n: int) -> tuple:
    """What a llama.cpp row measures: the type, and for an importance-matrix row how many calibration chunks."""
    return (qtype, imatrix, calib_n if imatrix else None)


class Bench:
    """One model's llama.cpp side: its f32 file, importance matrix, evaluation windows and fp32 log-probs, kept in
    ``work``.  SmolLM2 on wikitext with tinyshakespeare calibration unless told otherwise (bench/gguf_k256.py)."""

    def __init__(
        self,
        work: Path,
        threads: int,
        model: str = MODEL,
        eval_text: Path = EVAL,
        calib_text: Path = CALIB,
        calib_n: int = CALIB_N,
    ) -> None:
        self.work, self.threads, self.calib_n = work, threads, calib_n
        self.model, self.eval_text, self.calib_text = model, eval_text, calib_text
        work.mkdir(parents=True, exist_ok=True)
        self.f32 = work / f"{model}-f32.gguf"
        self.windows = work / "eval_windows.npy"
        self.eval_ids = work / "eval_ids.npy"
        self.calib_ids = work / "calib_ids.npy"
        self.ref = work / "fp32_logprobs.npy"
        self.ref_meta = work / "fp32_logprobs.json"
        # the protocol's importance matrix keeps its old name; another chunk count gets its own file
        self.imatrix = work / ("imatrix.gguf" if calib_n == CALIB_N else f"imatrix-n{calib_n}.gguf")
        self.commands: dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ reference side
    def prepare(self, model_dir: Path) -> dict:
        """Token ids (HF tokenizer) and the fp32 model's log-probs on the evaluation windows, computed once."""
        if self.ref_meta.exists() and self.ref.exists() and self.windows.exists():
            return json.loads(self.ref_meta.read_text())
        import numpy as np
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from signround.data import chunk_token_ids
        from signround.eval.ppl import tokenize_file, windows

        torch.set_num_threads(self.threads)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        ids = tokenize_file(tokenizer, self.eval_text)
        wins = windows(ids, EVAL_SEQLEN, EVAL_N)
        calib = tokenizer(self.calib_text.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
        chunk_token_ids(calib, CALIB_SEQLEN, self.calib_n)  # raises if the text is too short
        np.save(self.eval_ids, ids.numpy().astype(np.int32))
        np.save(self.calib_ids, calib.numpy().astype(np.int32))
        np.save(self.windows, wins.numpy().astype(np.int32))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        vocab = model.config.vocab_size
        tmp = self.ref.with_suffix(".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(wins.shape[0], EVAL_SEQLEN, vocab))
        nll, count = 0.0, 0
        _log(f"fp32 log-probs of {wins.shape[0]} x {EVAL_SEQLEN} tokens -> {self.ref}")
        with torch.inference_mode():
            for start in range(0, wins.shape[0], 4):
                batch = wins[start : start + 4]
                logp = torch.log_softmax(model(batch).logits.float(), dim=-1)
                nll -= logp[:, :-1].gather(-1, batch[:, 1:, None]).sum().item()
                count += batch[:, 1:].numel()
                out[start : start + batch.shape[0]] = logp.half().numpy()
        out.flush()
        del out
        tmp.rename(self.ref)
        meta = {
            "hf_fp32_ppl": math.exp(nll / count),
            "n_windows": int(wins.shape[0]),
            "vocab": int(vocab),
            "torch": torch.__version__,
            "hf_tokens_eval": int(ids.numel()),
            "hf_tokens_calib": int(calib.numel()),
        }
        self.ref_meta.write_text(json.dumps(meta))
        _log(f"HF fp32 ppl {meta['hf_fp32_ppl']:.3f}")
        return meta

    # ------------------------------------------------------------------------------------------ llama.cpp side
    def convert(self, model_dir: Path) -> None:
        tmp = self.work / f"{self.model}-f32.tmp.gguf"
        cmd = [VENV_PY, CONVERT_WORKER, "convert", LLAMA_CPP_DIR, "f32", model_dir, tmp]
        self.commands["convert"] = f"{shlex.join(str(c) for c in cmd)}  # then renamed to {self.f32.name}"
        if not self.f32.exists():
            _run(cmd, self.work / "convert.log")
            tmp.rename(self.f32)

    def quantize_api(self, qtype: str, out: Path) -> str:
        """llama-cpp-python's ``llama_model_quantize`` (default params, ``nthread``) via llamacpp_worker.py."""
        jobs, results = self.work / f"jobs-{qtype}.json", self.work / f"jobs-{qtype}.result.json"
        job = {"src": str(self.f32), "out": str(out), "ftype": qtype.lower(), "nthread": self.threads}
        jobs.write_text(json.dumps([{**job, "both_readers": False}]))
        line = _run([LLAMA_PY, CONVERT_WORKER, "quantize", jobs, results], self.work / f"quantize-{qtype}.log")
        result = json.loads(results.read_text())[0]
        if not result["ok"]:
            raise SystemExit(f"llama_model_quantize failed for {qtype}:\n{result['error']}")
        return f"{line}  # jobs: {json.dumps([job])}"

    def quantize_bin(self, qtype: str, out: Path, imatrix: Path | None) -> str:
        cmd = [BIN / "llama-quantize"]
        if imatrix is not None:
            cmd += ["--imatrix", imatrix]
        return _run([*cmd, self.f32, out, qtype, str(self.threads)], self.work / f"llama-quantize-{out.stem}.log")

    def make_imatrix(self) -> None:
        tmp = self.imatrix.with_suffix(".tmp.gguf")
        # BOS off: the Hugging Face calibration ids carry no special tokens (llama-imatrix would otherwise put BOS
        # in front of the text and in place of the first token of every chunk; the converted file says false
        # already, the override makes it explicit).
        cmd = [
            BIN / "llama-imatrix", "-m", self.f32, "-f", self.calib_text, "-c", str(CALIB_SEQLEN), "-b", str(CALIB_SEQLEN),
            "--chunks", str(self.calib_n), "-t", str(self.threads), "-ngl", "0", "--no-ppl",
            "--override-kv", "tokenizer.ggml.add_bos_token=bool:false", "-o", tmp,
        ]  # fmt: skip
        self.commands["imatrix"] = f"{shlex.join(str(c) for c in cmd)}  # then renamed to {self.imatrix.name}"
        if not self.imatrix.exists():
            _run(cmd, self.imatrix_log)
            tmp.rename(self.imatrix)

    @property
    def imatrix_log(self) -> Path:
        return self.imatrix.with_suffix(".log")

    def evaluate(self, gguf: Path, check_calib: bool) -> dict:
        result = self.work / f"{gguf.stem}.eval.json"
        cmd = [
            LLAMA_PY, WORKER, "--model", gguf, "--windows", self.windows, "--ref", self.ref,
            "--threads", str(self.threads), "--out", result, "--check-text", self.eval_text, self.eval_ids,
        ]  # fmt: skip
        if check_calib:
            cmd += ["--check-text", self.calib_text, self.calib_ids]
        line = _run(cmd, self.work / f"{gguf.stem}.eval.log")
        return {**json.loads(result.read_text()), "eval_command": line}


def _prefix_match(check: dict, n: int) -> bool:
    """Whether llama.cpp's ids equal the Hugging Face ones on the first ``n`` tokens (the evaluated windows)."""
    return check["match"] or (check["first_mismatch"] is not None and check["first_mismatch"] >= n)


# "[  2/ 272] token_embd.weight - [576, 49152, 1, 1], type = f32, converting to q8_0 .."; with an imatrix a
# "====== ... did not find weights for ..." line can come between "f32, " and "converting to".
_TENSOR_LINE = re.compile(
    r"\[\s*\d+/\s*\d+\]\s+\S+\s+- \[[^\]]*\], type =\s+(\w+),\s*(?:={6}[^\n]*\n)?(?:converting to (\w+))?"
)


def tensor_types(log: Path) -> dict[str, int]:
    """How many tensors llama.cpp's quantizer wrote in each type, from its per-tensor log lines."""
    types: dict[str, int] = {}
    for src, dst in _TENSOR_LINE.findall(log.read_text(errors="replace")):
        types[dst or src] = types.get(dst or src, 0) + 1
    return dict(sorted(types.items()))


def _imatrix_log_facts(log: Path) -> dict:
    """What llama-imatrix says it did (chunks, context, tokens) from its log."""
    facts = {}
    if log.exists():
        for line in log.read_text(errors="replace").splitlines():
            if "computing over" in line or "tokenizing the input" in line or "tokenization took" in line:
                facts.setdefault("imatrix_log", []).append(line.strip())
            if "add_bos_token" in line:
                facts.setdefault("imatrix_log", []).append(line.strip())
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=TYPES, help="llama-quantize type names (f32 row always)")
    parser.add_argument("--imatrix", dest="imatrix", action="store_true", default=None, help="rows with imatrix")
    parser.add_argument("--no-imatrix", dest="no_imatrix", action="store_true", help="rows without imatrix")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("GGUF_LLAMACPP_WORK", "/tmp/gguf-llamacpp")))
    parser.add_argument("--keep", action="store_true", help="keep the quantized GGUF files in --work")
    parser.add_argument(
        "--calib-n", type=int, default=CALIB_N,
        help=f"calibration chunks of {CALIB_SEQLEN} tokens for llama-imatrix (default {CALIB_N}, the protocol's)",
    )  # fmt: skip
    args = parser.parse_args()
    variants = [v for v, on in ((False, args.no_imatrix), (True, args.imatrix)) if on] or [False, True]
    argv = shlex.join([".venv/bin/python", "bench/gguf_llamacpp.py", *sys.argv[1:]])

    from signround.fetch import cached_model_path

    missing = [str(p) for p in (LLAMA_PY, CONVERT_WORKER, LLAMA_CPP_DIR / "convert_hf_to_gguf.py") if not p.exists()]
    model_dir = cached_model_path(MODEL)
    if model_dir is None:
        missing.append(f"the {MODEL} checkpoint (run: signround fetch-model {MODEL})")
    if missing:
        print(f"skipped: missing {', '.join(missing)}", flush=True)
        return
    tools_ok = all((BIN / t).exists() for t in ("llama-imatrix", "llama-quantize"))
    if True in variants and not tools_ok:
        print(f"imatrix rows skipped: {BIN}/llama-imatrix or llama-quantize not built; build with:\n{build_tools_hint}")
        variants = [v for v in variants if not v]

    done = _rows(args.out)
    todo = []
    for key in [_row_key("F32", False, args.calib_n)] + [
        _row_key(t.upper(), v, args.calib_n) for t in args.types for v in variants
    ]:
        if key in done:
            _log(f"{key[0]} imatrix={key[1]}: already in {args.out}, skipped")
        elif key not in todo:
            todo.append(key)
    if not todo:
        return

    bench = Bench(args.work, args.threads, calib_n=args.calib_n)
    meta = bench.prepare(model_dir)
    bench.convert(model_dir)
    cpu = cpu_info()
    for qtype, imatrix, _calib_n in todo:
        _log(f"--- {qtype} imatrix={imatrix}")
        row: dict = {"tool": TOOL, "model": MODEL, "type": qtype, "imatrix": imatrix}
        commands = [argv, bench.commands["convert"]]
        start = time.perf_counter()
        if qtype == "F32":
            gguf, row["quantizer"] = bench.f32, "convert_hf_to_gguf.py --outtype f32"
        elif not imatrix:
            gguf = args.work / f"{MODEL}-{qtype}.gguf"
            commands.append(bench.quantize_api(qtype, gguf))
            row["quantizer"] = "llama_cpp.llama_model_quantize (default params)"
            if tools_ok:  # the built binary must write the same file
                other = args.work / f"{MODEL}-{qtype}-bin.gguf"
                commands.append(bench.quantize_bin(qtype, other, None))
                row["llama_quantize_binary_identical"] = _sha256(other) == _sha256(gguf)
                other.unlink()
        else:
            bench.make_imatrix()
            commands.append(bench.commands["imatrix"])
            gguf = args.work / f"{MODEL}-{qtype}-{bench.imatrix.stem}.gguf"
            commands.append(bench.quantize_bin(qtype, gguf, bench.imatrix))
            row["quantizer"] = "llama-quantize --imatrix (built from the sdist)"
            row.update(_imatrix_log_facts(bench.imatrix_log), calib_n=args.calib_n)
        if qtype != "F32":
            log = f"quantize-{qtype}.log" if not imatrix else f"llama-quantize-{gguf.stem}.log"
            row["tensor_types"] = tensor_types(args.work / log)
        quant_seconds = time.perf_counter() - start
        ev = bench.evaluate(gguf, check_calib=imatrix)
        checks = {c["text"]: c for c in ev["token_checks"]}
        row.update(
            file_bytes=gguf.stat().st_size,
            ppl=round(ev["ppl"], 4),
            kl=round(ev["kl"], 6),
            n_windows=ev["n_windows"],
            window=ev["window"],
            tokens_match=checks[EVAL.name]["match"],
            tokens_match_windows=_prefix_match(checks[EVAL.name], ev["n_windows"] * ev["window"]),
            token_check=checks[EVAL.name],
        )
        if imatrix:
            row.update(calib_tokens_match=checks[CALIB.name]["match"], calib_token_check=checks[CALIB.name])
            row["imatrix_calibration"] = f"{CALIB.name}, -c {CALIB_SEQLEN} --chunks {args.calib_n}, no BOS"
        row.update(
            hf_fp32_ppl=round(meta["hf_fp32_ppl"], 4),
            quantize_seconds=round(quant_seconds, 1),
            eval_seconds=ev["eval_seconds"],
            threads=args.threads,
            llama_cpp_python=ev["llama_cpp_python"],
            system_info=ev["system_info"],
            **cpu,
            command=argv,
            commands=[*commands, ev["eval_command"]],
            date=datetime.datetime.now().isoformat(timespec="seconds"),
        )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        _log(f"{qtype} imatrix={imatrix}: {row['file_bytes'] / 1e6:.1f} MB ppl {row['ppl']:.3f} kl {row['kl']:.4f}")
        if gguf != bench.f32 and not args.keep:
            gguf.unlink()


if __name__ == "__main__":
    main()
