"""Runs llama.cpp's own tools for test_gguf_mixtures_llamacpp.py (never imports signround).

    .venv/bin/python       llamacpp_worker.py convert LLAMA_CPP_DIR OUTTYPE HF_DIR OUT.gguf [HF_DIR OUT.gguf ...]
    .venv-llama/bin/python llamacpp_worker.py quantize JOBS.json RESULTS.json
    .venv-llama/bin/python llamacpp_worker.py types JOBS.json RESULTS.json

``convert``: llama.cpp's ``convert_hf_to_gguf.py`` (from the llama-cpp-python sdist, with the sdist's own gguf-py)
on each Hugging Face directory, in one process so that torch / transformers load once.  It needs torch and
transformers, so it runs in the project venv.  The script imports ``sentencepiece`` before it checks that the model
has a ``tokenizer.model`` at all; the models here have none (their tokenizers are ``tokenizer.json``), so when
sentencepiece is not installed that probe is made to answer "no such file", which sends the script down its
``tokenizer.json`` path exactly as it would with sentencepiece installed.

``quantize``: ``llama_cpp.llama_model_quantize`` for each job ``{"src", "out", "ftype", "imatrix"}`` (``ftype``
a ``llama-quantize`` name such as ``"q4_k_m"``, mapped through llama_cpp's own ``LLAMA_FTYPE_MOSTLY_*``;
``imatrix``: pass an all-ones importance matrix, which ``q2_k_s`` requires), then reads both files back: per tensor
its shape (``ne`` order), type and bytes, the data section's offset, the file size and ``general.file_type``.  The
input is read with gguf-py's ``GGUFReader``; the output with llama.cpp's own reader (ggml's ``gguf_*`` functions)
and, unless ``"both_readers": false``, also with ``GGUFReader``, and the two must agree (``GGUFReader`` needs ~5 s
per file with SmolLM2's 49K-token vocabulary, so the SmolLM2 outputs use only the fast one).  ``"remove": true``
deletes the quantized file after reading it.

``types``: llama.cpp's type chooser itself on a mock model, without weights or files (``llama_quant_model_from_
metadata`` + ``llama_quant_compute_types``, the hooks ``tests/test-quant-type-selection.cpp`` uses; C++ symbols,
called through ctypes by their mangled names), for each job ``{"desc": {architecture, n_embd, n_ff, n_layer,
n_head, n_head_kv, n_expert, n_embd_head_k, n_embd_head_v}, "tensors": {name: ne}, "ftypes": [name, ...]}``;
tensors are given in llama_model_loader's order (block number, then name) as llama_model_quantize walks them.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import os
import re
import runpy
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def convert(llama_cpp_dir: str, outtype: str, pairs: list[str]) -> None:
    script = Path(llama_cpp_dir) / "convert_hf_to_gguf.py"
    sys.path[:0] = [str(script.parent), str(script.parent / "gguf-py")]  # the sdist's gguf-py, as the script does
    try:
        import sentencepiece  # noqa: F401
    except ImportError:
        import conversion.base

        probe = conversion.base.TextModel._create_vocab_sentencepiece

        def no_tokenizer_model(self):  # type: ignore[no-untyped-def]
            if not (self.dir_model / "tokenizer.model").is_file():
                raise FileNotFoundError(self.dir_model / "tokenizer.model")
            return probe(self)

        conversion.base.TextModel._create_vocab_sentencepiece = no_tokenizer_model
    for hf_dir, out in zip(pairs[::2], pairs[1::2], strict=True):
        sys.argv = [str(script), hf_dir, "--outtype", outtype, "--outfile", out]
        runpy.run_path(str(script), run_name="__main__")


def _trim(ne: list[int]) -> list[int]:
    """Shape without trailing dimensions of 1 (one reader pads ``ne`` to 4 dimensions, the other does not)."""
    while len(ne) > 1 and ne[-1] == 1:
        ne = ne[:-1]
    return ne


def _read_gguf_py(path: str) -> dict[str, Any]:
    """gguf-py's reader (independent of llama.cpp; ~5 s for a file with SmolLM2's 49K-token vocabulary)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    field = reader.fields.get("general.file_type")
    return {
        "tensors": {
            t.name: {
                "ne": _trim([int(d) for d in t.shape]),
                "type": t.tensor_type.name.lower(),
                "nbytes": int(t.n_bytes),
            }
            for t in reader.tensors
        },
        "data_offset": int(reader.data_offset),
        "file_size": os.path.getsize(path),
        "file_type": None if field is None else int(field.parts[field.data[0]][0]),
    }


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _read_ggml(path: str) -> dict[str, Any]:
    """llama.cpp's own GGUF reader (ggml's ``gguf_init_from_file``): the same record as :func:`_read_gguf_py`, fast."""
    _, ggml = _libs()
    ctx = ggml.gguf_init_from_file(path.encode(), _GgufInitParams(True, None))
    if not ctx:
        raise RuntimeError(f"gguf_init_from_file could not read {path}")
    try:
        tensors = {}
        for i in range(ggml.gguf_get_n_tensors(ctx)):
            ne = ggml.gguf_get_tensor_ne(ctx, i)
            tensors[ggml.gguf_get_tensor_name(ctx, i).decode()] = {
                "ne": _trim([int(ne[k]) for k in range(4)]),
                "type": ggml.ggml_type_name(ggml.gguf_get_tensor_type(ctx, i)).decode().lower(),
                "nbytes": int(ggml.gguf_get_tensor_size(ctx, i)),
            }
        key = ggml.gguf_find_key(ctx, b"general.file_type")
        return {
            "tensors": tensors,
            "data_offset": int(ggml.gguf_get_data_offset(ctx)),
            "file_size": os.path.getsize(path),
            "file_type": int(ggml.gguf_get_val_u32(ctx, key)) if key >= 0 else None,
        }
    finally:
        ggml.gguf_free(ctx)


def _read(path: str, both: bool) -> dict[str, Any]:
    """The file read by llama.cpp's reader and, if ``both``, also by gguf-py's, which must agree."""
    record = _read_ggml(path)
    if both and (other := _read_gguf_py(path)) != record:
        raise AssertionError(f"{path}: llama.cpp's and gguf-py's readers disagree:\n{record}\n{other}")
    return record


def _ones_imatrix(src: dict[str, Any]) -> tuple[Any, list[Any]]:
    """An importance matrix of ones (one weight per column and expert) for every tensor with 2 or more dimensions."""
    import llama_cpp

    entries, keep = [], []
    for name, t in src["tensors"].items():
        ne = t["ne"] + [1, 1]
        if len([d for d in t["ne"] if d > 1]) < 2:
            continue
        values = (ctypes.c_float * (ne[0] * ne[2]))(*([1.0] * (ne[0] * ne[2])))
        keep += [values, name.encode()]
        entries.append(llama_cpp.llama_model_imatrix_data(keep[-1], values, ne[0] * ne[2]))
    entries.append(llama_cpp.llama_model_imatrix_data(None, None, 0))
    array = (llama_cpp.llama_model_imatrix_data * len(entries))(*entries)
    keep.append(array)
    return ctypes.cast(array, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), keep


def quantize(jobs_path: str, results_path: str) -> None:
    import llama_cpp

    results, sources = [], {}
    for job in json.loads(Path(jobs_path).read_text()):
        try:
            if job["src"] not in sources:
                sources[job["src"]] = _read_gguf_py(job["src"])
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{job['ftype'].upper()}")
            params.nthread = int(job.get("nthread", 0))
            keep = None
            if job.get("imatrix"):
                params.imatrix, keep = _ones_imatrix(sources[job["src"]])
            start = time.perf_counter()
            rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["out"].encode(), ctypes.byref(params))
            seconds = time.perf_counter() - start
            del keep
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize returned {rc}")
            results.append(
                {
                    **job,
                    "ok": True,
                    "seconds": seconds,
                    "source": sources[job["src"]],
                    "result": _read(job["out"], job.get("both_readers", True)),
                }
            )
            if job.get("remove"):
                os.remove(job["out"])
        except Exception:
            results.append({**job, "ok": False, "error": traceback.format_exc()})
    Path(results_path).write_text(json.dumps(results))


class _Desc(ctypes.Structure):
    _fields_ = [("architecture", ctypes.c_char_p)] + [
        (f, ctypes.c_uint32)
        for f in ("n_embd", "n_ff", "n_layer", "n_head", "n_head_kv", "n_expert", "n_embd_head_k", "n_embd_head_v")
    ]


class _GgmlInitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


@functools.cache
def _libs() -> tuple[Any, Any]:
    """libllama and libggml-base of the installed llama_cpp, with the signatures of what is called here."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    llama = ctypes.CDLL(str(lib_dir / "libllama.so"))
    ggml = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    p = ctypes.c_void_p
    sig = {
        (llama, "_Z31llama_quant_model_from_metadataPK22llama_quant_model_desc"): ([ctypes.POINTER(_Desc)], p),
        (llama, "_Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params"): ([p, p], p),
        (llama, "_Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem"): (
            [p, ctypes.c_int, p, p, ctypes.c_size_t],
            None,
        ),
        (llama, "_Z16llama_quant_freeP19quantize_state_impl"): ([p], None),
        (llama, "llama_model_free"): ([p], None),
        (ggml, "ggml_init"): ([_GgmlInitParams], p),
        (ggml, "ggml_free"): ([p], None),
        (ggml, "ggml_tensor_overhead"): ([], ctypes.c_size_t),
        (ggml, "ggml_new_tensor"): ([p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)], p),
        (ggml, "ggml_set_name"): ([p, ctypes.c_char_p], p),
        (ggml, "ggml_type_name"): ([ctypes.c_int], ctypes.c_char_p),
        (ggml, "gguf_init_from_file"): ([ctypes.c_char_p, _GgufInitParams], p),
        (ggml, "gguf_free"): ([p], None),
        (ggml, "gguf_get_n_tensors"): ([p], ctypes.c_int64),
        (ggml, "gguf_get_tensor_name"): ([p, ctypes.c_int64], ctypes.c_char_p),
        (ggml, "gguf_get_tensor_ne"): ([p, ctypes.c_int64], ctypes.POINTER(ctypes.c_int64)),
        (ggml, "gguf_get_tensor_type"): ([p, ctypes.c_int64], ctypes.c_int),
        (ggml, "gguf_get_tensor_size"): ([p, ctypes.c_int64], ctypes.c_size_t),
        (ggml, "gguf_get_data_offset"): ([p], ctypes.c_size_t),
        (ggml, "gguf_find_key"): ([p, ctypes.c_char_p], ctypes.c_int64),
        (ggml, "gguf_get_val_u32"): ([p, ctypes.c_int64], ctypes.c_uint32),
    }
    for (lib, name), (args, res) in sig.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    return llama, ggml


def _loader_key(name: str) -> tuple[int, str]:
    found = re.match(r"blk\.(\d+)\.", name)
    return (int(found.group(1)) if found else -1, name)


def types(jobs_path: str, results_path: str) -> None:
    import llama_cpp

    quiet = llama_cpp.llama_log_callback(lambda *_: None)  # no fallback warnings; kept referenced while in use
    llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
    llama, ggml = _libs()
    from_metadata = llama._Z31llama_quant_model_from_metadataPK22llama_quant_model_desc
    init = llama._Z16llama_quant_initPK11llama_modelPK27llama_model_quantize_params
    compute = llama._Z25llama_quant_compute_typesP19quantize_state_impl11llama_ftypePP11ggml_tensorP9ggml_typem
    free_qs = llama._Z16llama_quant_freeP19quantize_state_impl
    results = []
    for job in json.loads(Path(jobs_path).read_text()):
        d = job["desc"]
        desc = _Desc(d["architecture"].encode(), *(int(d[f]) for f, _ in _Desc._fields_[1:]))
        model = from_metadata(ctypes.byref(desc))
        params = llama_cpp.llama_model_quantize_default_params()
        qs = init(model, ctypes.addressof(params))
        names = sorted(job["tensors"], key=_loader_key)
        ctx = ggml.ggml_init(_GgmlInitParams(len(names) * ggml.ggml_tensor_overhead() + 1024, None, True))
        tensors = (ctypes.c_void_p * len(names))()
        for k, name in enumerate(names):
            ne = job["tensors"][name]
            tensors[k] = ggml.ggml_new_tensor(ctx, 0, len(ne), (ctypes.c_int64 * len(ne))(*ne))  # 0: GGML_TYPE_F32
            ggml.ggml_set_name(tensors[k], name.encode())
        chosen = {}
        for ftype in job["ftypes"]:
            out = (ctypes.c_int * len(names))()
            compute(qs, getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype.upper()}"), tensors, out, len(names))
            chosen[ftype] = {name: ggml.ggml_type_name(out[k]).decode().lower() for k, name in enumerate(names)}
        results.append(chosen)
        ggml.ggml_free(ctx)
        free_qs(qs)
        llama.llama_model_free(model)
    Path(results_path).write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert")
    c.add_argument("llama_cpp_dir")
    c.add_argument("outtype")
    c.add_argument("pairs", nargs="+", help="HF_DIR OUT.gguf, repeated")
    for command in ("quantize", "types"):
        q = sub.add_parser(command)
        q.add_argument("jobs")
        q.add_argument("results")
    args = parser.parse_args()
    if args.command == "convert":
        if len(args.pairs) % 2:
            parser.error("convert takes HF_DIR OUT.gguf pairs")
        convert(args.llama_cpp_dir, args.outtype, args.pairs)
    elif args.command == "quantize":
        quantize(args.jobs, args.results)
    else:
        types(args.jobs, args.results)


if __name__ == "__main__":
    main()
