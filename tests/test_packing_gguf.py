"""GGUF file content (signround.packing.gguf, signround.models.gguf_arch), read back without llama.cpp.

Oracles: gguf-py's ``GGUFReader`` (metadata, names, types, shapes, bytes), an independent per-row statement of the
q/k row order, and transformers' GGUF loader, which dequantizes with gguf-py and undoes the q/k order itself, so
its logits must equal those of our own dequantized model.  llama.cpp runs the files in
``integration_tests/test_gguf_llamacpp.py``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from signround.models.gguf_arch import (  # noqa: E402
    bpe_pre_tokenizer,
    check_gguf_supported,
    gguf_hparams,
    llama_rotary_rows,
    spm_add_space_prefix,
)
from signround.packing.gguf import gguf_tensors, gguf_vocab, write_gguf  # noqa: E402
from signround.quant.gguf import GGUFQuantized, dequantize, quantize, to_bytes  # noqa: E402

# per layer kind: the GGUF type a tiny model's weight gets (None: left as a float tensor)
MIX = {
    "q_proj": "q4_k",
    "k_proj": "q6_k",
    "v_proj": "q8_0",
    "o_proj": None,
    "gate_proj": "q4_k",
    "up_proj": "q6_k",
    "down_proj": "q8_0",
    "lm_head": "q6_k",
}


def tiny_config(**overrides) -> LlamaConfig:
    """A Llama whose every matrix has a width that is a multiple of 256 (K-quant super-blocks), GQA 4/2."""
    args = dict(
        vocab_size=512,  # = the stories260K tokenizer
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaConfig(**(args | overrides))


def tiny_weights(config: LlamaConfig, seed: int = 0) -> tuple[LlamaForCausalLM, dict]:
    """A random model and its weights, quantized as ``MIX`` says (norms random too, so their order matters)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim == 1 else 0.08) + (1.0 if p.ndim == 1 else 0.0))
    weights = {}
    for name, value in model.state_dict().items():
        kind = name.split(".")[-2]
        qtype = MIX.get(kind)
        weights[name] = quantize(value, qtype) if qtype and value.ndim == 2 else value.clone()
    return model, weights


def dequantized(weights: dict) -> dict:
    return {k: dequantize(v) if isinstance(v, GGUFQuantized) else v for k, v in weights.items()}


@pytest.fixture(scope="module")
def stories_tokenizer(stories_dir: Path):
    return AutoTokenizer.from_pretrained(stories_dir)


@pytest.fixture(scope="module")
def base():
    """The tiny untied Llama and its mixed-type weights, quantized once for the module (tests copy the dict)."""
    return tiny_weights(tiny_config())


@pytest.fixture(scope="module")
def written(tmp_path_factory, stories_tokenizer, base):
    """The tiny Llama written with f32 floats, and what went in."""
    config = tiny_config()
    model, weights = base
    out = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(out, config, stories_tokenizer, weights, float_type="f32", name="tiny-llama")
    return out, config, model, weights


def _field(reader, key):
    return reader.fields[key].contents()


# ----------------------------------------------------------------------------------------------------------------
# the file read back by gguf-py


def test_metadata(written, stories_tokenizer):
    path, config, _, _ = written
    reader = gguf.GGUFReader(path)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.name") == "tiny-llama"
    expected = {
        "llama.context_length": 128,
        "llama.embedding_length": 256,
        "llama.block_count": 2,
        "llama.feed_forward_length": 512,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 64,
        "llama.vocab_size": 512,
    }
    for key, value in expected.items():
        assert _field(reader, key) == value, key
    assert _field(reader, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(config.rms_norm_eps)
    assert _field(reader, "llama.rope.freq_base") == pytest.approx(10000.0)
    assert "llama.attention.key_length" not in reader.fields  # head_dim is hidden / heads: llama.cpp's default
    assert "llama.rope.scaling.type" not in reader.fields
    assert _field(reader, "general.quantization_version") == gguf.GGML_QUANT_VERSION
    # tokenizer: SentencePiece-style pieces with byte fallback
    assert _field(reader, gguf.Keys.Tokenizer.MODEL) == "llama"
    tokens = _field(reader, gguf.Keys.Tokenizer.LIST)
    assert len(tokens) == 512 and tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[3] == "<0x00>"
    types = _field(reader, gguf.Keys.Tokenizer.TOKEN_TYPE)
    assert types[:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, gguf.TokenType.BYTE]
    assert set(types[259:]) == {gguf.TokenType.NORMAL}
    assert len(_field(reader, gguf.Keys.Tokenizer.SCORES)) == 512
    assert gguf.Keys.Tokenizer.MERGES not in reader.fields
    assert _field(reader, gguf.Keys.Tokenizer.BOS_ID) == 1
    assert _field(reader, gguf.Keys.Tokenizer.EOS_ID) == 2
    assert _field(reader, gguf.Keys.Tokenizer.UNK_ID) == 0
    assert _field(reader, gguf.Keys.Tokenizer.ADD_BOS) is True
    assert _field(reader, gguf.Keys.Tokenizer.ADD_EOS) is False
    assert _field(reader, gguf.Keys.Tokenizer.ADD_PREFIX) is True


def test_tensors_names_types_bytes(written):
    """Every tensor under its GGUF name with the type asked for, quantized bytes = to_bytes() (q/k rows in llama's
    RoPE order), floats as written; nothing extra, nothing missing."""
    path, _, _, weights = written
    reader = gguf.GGUFReader(path)
    got = {t.name: t for t in reader.tensors}
    assert len(got) == len(weights) == 2 * 9 + 3
    to_gguf = {
        "q_proj": "attn_q",
        "k_proj": "attn_k",
        "v_proj": "attn_v",
        "o_proj": "attn_output",
        "gate_proj": "ffn_gate",
        "up_proj": "ffn_up",
        "down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    for hf_name, value in weights.items():
        parts = hf_name.split(".")
        if hf_name == "lm_head.weight":
            gguf_name = "output.weight"
        elif hf_name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif hf_name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            gguf_name = f"blk.{parts[2]}.{to_gguf[parts[-2]]}.weight"
        t = got[gguf_name]
        heads = {"attn_q": 4, "attn_k": 2}.get(gguf_name.split(".")[2] if gguf_name.startswith("blk") else "")
        order = reference_rotary_rows(value.shape[0], heads) if heads else np.arange(value.shape[0])
        assert [int(n) for n in t.shape] == list(reversed(value.shape)), gguf_name  # GGUF lists ne0 (columns) first
        if isinstance(value, GGUFQuantized):
            assert t.tensor_type == gguf.GGMLQuantizationType[value.type_name.upper()], gguf_name
            assert np.array_equal(np.asarray(t.data), to_bytes(value)[order]), gguf_name
        else:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, gguf_name
            assert np.array_equal(np.asarray(t.data), value.numpy()[order]), gguf_name


def reference_rotary_rows(n_rows: int, n_head: int) -> np.ndarray:
    """The q/k row order stated per GGUF row: in a head of width D, GGUF row 2i + s holds HF row s * D/2 + i (HF
    rotates dimension i with i + D/2; llama.cpp's llama arch rotates adjacent rows)."""
    width = n_rows // n_head
    rows = []
    for r in range(n_rows):
        head, within = divmod(r, width)
        i, s = divmod(within, 2)
        rows.append(head * width + s * (width // 2) + i)
    return np.array(rows)


@pytest.mark.parametrize(("n_rows", "n_head"), [(8, 1), (64, 8), (256, 4), (128, 2)])
def test_rotary_rows(n_rows, n_head):
    assert llama_rotary_rows(n_rows, n_head) == reference_rotary_rows(n_rows, n_head).tolist()


def test_transformers_loads_same_logits(written):
    """transformers dequantizes our file with gguf-py and un-permutes q/k: same logits as our dequantized model."""
    path, _, model, weights = written
    ours = copy.deepcopy(model)
    ours.load_state_dict(dequantized(weights))
    theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    assert theirs.config.tie_word_embeddings is False
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
    with torch.no_grad():  # and the check can fail: our weights as HF rows, un-permuted by transformers
        wrong = copy.deepcopy(ours)
        wrong.model.layers[0].self_attn.q_proj.weight.copy_(
            ours.model.layers[0].self_attn.q_proj.weight[torch.tensor(llama_rotary_rows(256, 4))]
        )
        assert float((wrong(ids).logits - b).abs().max()) > 1e-2 * float(a.abs().max())


def test_tied_embeddings(tmp_path, stories_tokenizer, base):
    """Tied and the head equal to the embedding: no output.weight (llama.cpp reuses token_embd, as
    convert_hf_to_gguf writes it); a quantized head is written as output.weight, so it is what runs."""
    config = tiny_config(tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    weights = dict(base[1])
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    names = [t.name for t in gguf_tensors(config, weights)]
    assert "output.weight" not in names and "token_embd.weight" in names
    path = write_gguf(tmp_path / "tied.gguf", config, stories_tokenizer, weights, float_type="f32")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    assert theirs.config.tie_word_embeddings is True
    ours = copy.deepcopy(model)
    ours.load_state_dict(dequantized(weights))
    ids = torch.randint(3, 512, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())
    weights["lm_head.weight"] = quantize(weights["model.embed_tokens.weight"], "q8_0")
    assert "output.weight" in [t.name for t in gguf_tensors(config, weights)]


@pytest.mark.parametrize(("float_type", "ggml", "nbytes"), [("f16", "F16", 2), ("bf16", "BF16", 2), ("f32", "F32", 4)])
def test_float_types(float_type, ggml, nbytes, base):
    config = tiny_config()
    weights = base[1]
    floats = {k: v for k, v in weights.items() if not isinstance(v, GGUFQuantized)}
    by_name = {t.name: t for t in gguf_tensors(config, weights, float_type=float_type)}
    assert by_name["blk.0.attn_norm.weight"].ggml_type == gguf.GGMLQuantizationType.F32  # 1-D: always f32
    out = by_name["blk.0.attn_output.weight"]
    assert out.ggml_type == gguf.GGMLQuantizationType[ggml]
    assert out.data.nbytes == floats["model.layers.0.self_attn.o_proj.weight"].numel() * nbytes
    if float_type == "bf16":  # raw bytes of torch's bfloat16
        expected = floats["model.layers.0.self_attn.o_proj.weight"].to(torch.bfloat16).view(torch.uint8).numpy()
        assert np.array_equal(out.data, expected)


def test_qwen3_head_dim_and_rope(stories_tokenizer):
    from transformers import Qwen3Config

    config = Qwen3Config(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=64,
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0},
    )
    values = dict(gguf_hparams(config))
    assert values["add_key_length"] == values["add_value_length"] == values["add_rope_dimension_count"] == 64
    assert values["add_rope_scaling_type"] == gguf.RopeScalingType.LINEAR and values["add_rope_scaling_factor"] == 2.0
    assert values["add_rope_freq_base"] == 50000.0


def test_llama3_rope_freqs(base):
    """llama3 RoPE scaling becomes llama.cpp's rope_freqs tensor: frequency divisors, 1 for short wavelengths,
    ``factor`` for long ones."""
    config = tiny_config(
        max_position_embeddings=65536,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    by_name = {t.name: t for t in gguf_tensors(config, base[1])}
    freqs = by_name["rope_freqs.weight"].data
    assert freqs.shape == (32,) and freqs.dtype == np.float32
    assert freqs[0] == pytest.approx(1.0) and freqs[-1] == pytest.approx(8.0)
    assert np.all(np.diff(freqs) >= -1e-6)


# ----------------------------------------------------------------------------------------------------------------
# refusals: nothing guessed, nothing dropped, no partial file


def test_unknown_family_raises():
    from transformers import GPT2Config

    with pytest.raises(ValueError, match=r"'gpt2'.*llama, mistral, mixtral, qwen2, qwen2_moe, qwen3, qwen3_moe"):
        check_gguf_supported(GPT2Config())


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type 'yarn'"),
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "rope_type 'dynamic'"),
    ],
)
def test_unsupported_rope_raises(overrides, match):
    with pytest.raises(ValueError, match=match):
        check_gguf_supported(tiny_config(**overrides))


def test_qwen2_sliding_window_raises():
    from transformers import Qwen2Config

    check_gguf_supported(Qwen2Config())
    with pytest.raises(ValueError, match="use_sliding_window"):
        check_gguf_supported(Qwen2Config(use_sliding_window=True, sliding_window=128))


def test_unmapped_and_missing_tensors_raise(base):
    config = tiny_config()
    weights = base[1]
    extra = dict(weights) | {"model.layers.0.self_attn.mystery.weight": torch.zeros(4, 4)}
    with pytest.raises(ValueError, match=r"no GGUF name for model\.layers\.0\.self_attn\.mystery\.weight"):
        list(gguf_tensors(config, extra))
    missing = {k: v for k, v in weights.items() if "layers.1.mlp.up_proj" not in k}
    with pytest.raises(ValueError, match=r"blk\.1\.ffn_up\.weight"):
        list(gguf_tensors(config, missing))
    untied = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match=r"output\.weight"):
        list(gguf_tensors(config, untied))
    # rotary buffers of older checkpoints are skipped on purpose, not an error
    buffers = dict(weights) | {"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(32)}
    assert len(list(gguf_tensors(config, buffers))) == len(weights)


def test_atomic_write(tmp_path, stories_tokenizer, monkeypatch, base):
    """A failure while writing leaves neither the target nor a temporary file; an older target stays intact."""
    config = tiny_config()
    weights = base[1]
    target = tmp_path / "model.gguf"

    def boom(self, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(OSError, match="disk full"):
        write_gguf(target, config, stories_tokenizer, weights)
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        write_gguf(target, config, stories_tokenizer, weights)
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == b"old"
    monkeypatch.undo()
    with pytest.raises(ValueError, match="mystery"):  # refused before any file is created
        write_gguf(target, config, stories_tokenizer, weights | {"mystery.weight": torch.zeros(2, 2)})
    assert target.read_bytes() == b"old"


# ----------------------------------------------------------------------------------------------------------------
# tokenizer metadata


def _byte_level(pre: dict, ignore_merges: bool = False) -> dict:
    return {"pre_tokenizer": pre, "model": {"type": "BPE", "ignore_merges": ignore_merges}}


BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
NO_REGEX = BYTE_LEVEL | {"use_regex": False}
LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def test_bpe_pre_tokenizer_table():
    assert bpe_pre_tokenizer(_byte_level(BYTE_LEVEL)).name == "gpt-2"
    digits = {"type": "Digits", "individual_digits": True}
    assert bpe_pre_tokenizer(_byte_level({"type": "Sequence", "pretokenizers": [digits, BYTE_LEVEL]})).name == "smollm"
    llama3 = {"type": "Sequence", "pretokenizers": [_split(LLAMA3), NO_REGEX]}
    assert bpe_pre_tokenizer(_byte_level(llama3, ignore_merges=True)).name == "llama-bpe"
    with pytest.raises(ValueError, match="ignore_merges=False"):
        bpe_pre_tokenizer(_byte_level(llama3, ignore_merges=False))
    qwen2 = {"type": "Sequence", "pretokenizers": [_split(LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")), NO_REGEX]}
    assert bpe_pre_tokenizer(_byte_level(qwen2)).name == "qwen2"


@pytest.mark.parametrize(
    ("pre", "match"),
    [
        ({"type": "Sequence", "pretokenizers": [_split(r"\s+"), NO_REGEX]}, "none of the known"),
        ({"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, NO_REGEX]}, "Whitespace"),
        (BYTE_LEVEL | {"add_prefix_space": True}, "add_prefix_space"),
        ({"type": "Digits", "individual_digits": True}, "not byte-level"),
        (NO_REGEX, "splits like 'nothing'"),
    ],
)
def test_bpe_pre_tokenizer_refuses(pre, match):
    with pytest.raises(ValueError, match=match):
        bpe_pre_tokenizer(_byte_level(pre))


def test_spm_space_prefix(stories_dir):
    data = json.loads((stories_dir / "tokenizer.json").read_text())
    assert spm_add_space_prefix(data) is True
    replace_only = data | {"normalizer": data["normalizer"]["normalizers"][1]}
    assert spm_add_space_prefix(replace_only) is False
    metaspace = data | {
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False},
    }
    assert spm_add_space_prefix(metaspace) is True
    with pytest.raises(ValueError, match="does not pre-split"):
        spm_add_space_prefix(data | {"pre_tokenizer": {"type": "Whitespace"}})


def test_vocab_scores_follow_merges(stories_tokenizer):
    """Each piece scores minus the rank of the first merge making it, so llama.cpp's highest-score-first merging
    is HF's lowest-rank-first; vocab rows past the tokenizer are UNUSED padding."""
    vocab = gguf_vocab(stories_tokenizer, 520)
    data = json.loads(stories_tokenizer.backend_tokenizer.to_str())
    ranks = {}
    for rank, (a, b) in enumerate(data["model"]["merges"]):
        ranks.setdefault(a + b, rank)
    for piece, rank in ranks.items():
        assert vocab.scores[vocab.tokens.index(piece)] == -rank
    assert vocab.tokens[512:] == [f"[PAD{i}]" for i in range(512, 520)]
    assert set(vocab.token_types[512:]) == {gguf.TokenType.UNUSED}
    assert (vocab.model, vocab.pre, vocab.add_bos, vocab.add_eos) == ("llama", "default", True, False)
    with pytest.raises(ValueError, match="vocab_size is 500"):
        gguf_vocab(stories_tokenizer, 500)


def test_vocab_refuses_other_models():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>"))
    with pytest.raises(ValueError, match="BPE tokenizers only; this one is 'WordLevel'"):
        gguf_vocab(PreTrainedTokenizerFast(tokenizer_object=word_level), 2)


def _tiny_qwen3_moe(**overrides):
    from transformers import Qwen3MoeConfig

    from signround.models import unfuse_experts

    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=3, num_experts_per_tok=2,
        norm_topk_prob=True, **overrides,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    unfuse_experts(model)
    return config, model.state_dict()


def test_qwen3_moe_experts_are_stacked_in_expert_order_with_one_type():
    """llama.cpp's ffn_*_exps: our per-expert Linear weights stacked [n_expert, out, in], expert i at index i; the
    plan gives every expert the stacked tensor's type."""
    from signround.packing.gguf import planned_types

    config, weights = _tiny_qwen3_moe()
    weights = {k: quantize(v, "q8_0") if "experts" in k else v for k, v in weights.items()}
    by_name = {t.name: t for t in gguf_tensors(config, weights, float_type="f32")}
    down = by_name["blk.0.ffn_down_exps.weight"]
    from gguf import GGMLQuantizationType

    assert down.data.shape[0] == 3 and down.ggml_type == int(GGMLQuantizationType.Q8_0)
    for i in range(3):
        assert np.array_equal(down.data[i], to_bytes(weights[f"model.layers.0.mlp.experts.{i}.down_proj.weight"]))
    assert "blk.0.ffn_gate_inp.weight" in by_name and by_name["blk.0.ffn_gate_inp.weight"].data.shape == (3, 64)
    shapes = {k: tuple(v.shape) for k, v in _tiny_qwen3_moe()[1].items()}
    types = planned_types(config, shapes, "q4_k_m", tied=False)
    experts = [types[f"model.layers.0.mlp.experts.{i}.up_proj.weight"] for i in range(3)]
    assert len(set(experts)) == 1 and "model.layers.0.mlp.experts.up_proj.weight" not in types


def test_moe_export_refuses_missing_experts_and_what_llama_cpp_cannot_run():
    config, weights = _tiny_qwen3_moe()
    del weights["model.layers.0.mlp.experts.1.gate_proj.weight"]
    with pytest.raises(ValueError, match=r"experts\.gate_proj\.weight needs experts 0\.\.1; found \[0, 2\]"):
        list(gguf_tensors(config, weights))
    from transformers import Qwen3MoeConfig

    check_gguf_supported(Qwen3MoeConfig(norm_topk_prob=True))
    with pytest.raises(ValueError, match=r"always renormalises the top-k expert weights.*norm_topk_prob=False"):
        check_gguf_supported(Qwen3MoeConfig(norm_topk_prob=False))
    with pytest.raises(ValueError, match=r"no dense-MLP layers.*mlp_only_layers=\[0\]"):
        check_gguf_supported(Qwen3MoeConfig(norm_topk_prob=True, mlp_only_layers=[0]))
    from transformers import Qwen2MoeConfig

    check_gguf_supported(Qwen2MoeConfig(norm_topk_prob=False))
    with pytest.raises(ValueError, match=r"qwen2moe does not renormalise.*norm_topk_prob=True"):
        check_gguf_supported(Qwen2MoeConfig(norm_topk_prob=True))
