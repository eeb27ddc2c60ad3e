"""GGUF output end to end on stories260K: each layer is planned toward the type llama-quantize gives it, the file
holds exactly the tuned blocks, the untuned embedding gets llama.cpp's quantizer, and transformers loads it back."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import signround
from signround.models.gguf_arch import llama_rotary_rows
from signround.quant import gguf
from signround.quant.dispatch import from_tensors, to_tensors
from signround.quant.gguf_mixtures import mixture

gguf_py = pytest.importorskip("gguf", reason="GGUF export needs gguf-py (pip install gguf)")


@pytest.fixture(scope="module")
def q4_k_m(stories_dir, shakespeare, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf") / "out"
    ar = signround.AutoRound(
        str(stories_dir), format="gguf:q4_k_m", iters=0, nsamples=4, seqlen=32, dataset=str(shakespeare),
        dtype=torch.float32, show_progress=False,
    )  # fmt: skip
    ar.quantize_and_save(out, format="gguf:q4_k_m")
    (path,) = out.glob("*.gguf")
    return ar, path


def test_the_format_sets_the_scheme_and_each_layer_gets_the_type_llama_quantize_gives_it(q4_k_m):
    ar, _path = q4_k_m
    assert ar.config.scheme == "GGUF:Q4_K_M"
    plan = ar.result.plan
    types = {name: spec.data_type for name, spec in plan.layers.items()}
    # 64-wide rows fit no 256-block: q4_k falls back to q5_0, q6_k to q8_0; attn_v gets q6_k on llama.cpp's "more
    # bits" layers (i < n/8, i >= 7n/8, (i - n/8) % 3 == 2 in integers: blocks 2 and 4 of 5)
    assert types["model.layers.0.self_attn.q_proj"] == "gguf:q5_0"
    v_types = [types[f"model.layers.{i}.self_attn.v_proj"] for i in range(5)]
    assert v_types == ["gguf:q5_0", "gguf:q5_0", "gguf:q8_0", "gguf:q5_0", "gguf:q8_0"]
    # 172-wide rows fit no block of 32: llama.cpp keeps them in f16, and the plan says so
    reasons = {s.name: s.reason for s in plan.skipped}
    assert "model.layers.0.mlp.down_proj" not in plan.layers
    assert "stores it as f16" in reasons["model.layers.0.mlp.down_proj"]
    assert all(isinstance(q, gguf.GGUFQuantized) for q in ar.result.report.quantized.values())


def test_the_file_holds_the_tuned_blocks_and_llama_cpps_quantization_of_the_embedding(q4_k_m):
    ar, path = q4_k_m
    reader = gguf_py.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    assert int(reader.fields["general.file_type"].parts[-1][0]) == mixture("q4_k_m").file_type
    quantized = ar.result.report.quantized
    heads = ar.model.config.num_attention_heads
    for block in range(ar.model.config.num_hidden_layers):
        for hf, name in (("self_attn.q_proj", "attn_q"), ("self_attn.v_proj", "attn_v"), ("mlp.up_proj", "ffn_up")):
            q = quantized[f"model.layers.{block}.{hf}"]
            expected = gguf.to_bytes(q)
            if name == "attn_q":  # llama.cpp's rotary row order
                expected = expected[llama_rotary_rows(expected.shape[0], heads)]
            t = tensors[f"blk.{block}.{name}.weight"]
            assert int(t.tensor_type) == q.type.ggml_type
            assert bytes(t.data.tobytes()) == bytes(expected.tobytes()), f"blk.{block}.{name}"
        assert tensors[f"blk.{block}.ffn_down.weight"].tensor_type == gguf_py.GGMLQuantizationType.F16
    # the tied embedding is the output matrix too (no output.weight), quantized by llama.cpp's own q8_0 quantizer
    assert "output.weight" not in tensors
    emb = ar.model.get_input_embeddings().weight.detach().float()
    embd = tensors["token_embd.weight"]
    assert embd.tensor_type == gguf_py.GGMLQuantizationType.Q8_0
    assert bytes(embd.data.tobytes()) == bytes(gguf.to_bytes(gguf.quantize(emb, "q8_0")).tobytes())


def test_transformers_loads_the_file_back_to_the_model_that_was_quantized(q4_k_m):
    ar, path = q4_k_m
    model = ar.model
    emb = model.get_input_embeddings().weight
    ids = ar.tokenizer("Once upon a time, there was a little girl", return_tensors="pt").input_ids
    with torch.no_grad():
        original = emb.detach().clone()
        emb.copy_(gguf.dequantize(gguf.quantize(original.float(), "q8_0")))  # what the file's embedding holds
        try:
            ours = model(ids).logits
        finally:
            emb.copy_(original)
        back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)(ids).logits
    # the f16 ffn_down is the only rounding the file adds; an unquantized embedding would differ by ~0.1
    assert torch.allclose(back, ours, atol=2e-3 * ours.abs().max().item())


def test_gguf_results_round_trip_through_the_resume_files(stories_q_proj):
    w, _x = stories_q_proj
    q = gguf.quantize(w, "q5_0")
    tensors, description = to_tensors(q)
    back = from_tensors(dict(tensors), json.loads(json.dumps(description)))
    assert bytes(gguf.to_bytes(back).tobytes()) == bytes(gguf.to_bytes(q).tobytes())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"format": "gguf:q4_k_m", "iters": 0, "scheme": "W2A16"}, "use scheme='GGUF:Q4_K_M'"),
        ({"format": "gguf:q4_k_x", "iters": 0}, "unknown GGUF format 'gguf:q4_k_x'"),
        ({"format": "gguf:q4_k_m,auto_round", "iters": 0}, "written on its own"),
        ({"scheme": "gguf:q4_k_m", "format": "auto_gptq", "iters": 0}, "only format='gguf:<type>' writes"),
        ({"scheme": "gguf:q2_k", "format": "gguf:q4_k_m", "iters": 0}, "different GGUF types"),
    ],
)
def test_bad_gguf_requests_fail_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        signround.AutoRoundConfig(**kwargs)


def test_a_scheme_alone_picks_its_gguf_format_and_layer_config_takes_gguf_types():
    config = signround.AutoRoundConfig(
        scheme="gguf:q4_k_m", iters=0, layer_config={"v_proj": {"data_type": "gguf:q8_0"}, "k_proj": "gguf:q6_k"}
    )
    assert config.format == "gguf:q4_k_m"
    assert config.default_spec().data_type == "gguf:q4_k"
    assert (config.default_spec().bits, config.default_spec().group_size, config.default_spec().sym) == (4, 32, False)


def test_a_family_llama_cpp_cannot_run_is_refused_before_calibration(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=2, vocab_size=128))
    ar = signround.AutoRound(model, None, format="gguf:q4_0", iters=0, dataset=["never read"])
    with pytest.raises(ValueError, match="gpt2"):
        ar.quantize()


def test_signround_tunes_toward_the_gguf_grid_from_llama_cpps_own_quantization(stories_dir, shakespeare, tmp_path):
    """The start of every block is llama.cpp's quantizer (byte-identical to what iters=0 writes), tuning moves
    the loss below it, and the file holds the tuned blocks, not the start."""
    kwargs = dict(
        format="gguf:q4_0", nsamples=8, seqlen=32, batch_size=4, dataset=str(shakespeare), dtype=torch.float32,
        show_progress=False,
    )  # fmt: skip
    rtn = signround.AutoRound(str(stories_dir), iters=0, **kwargs)
    rtn.quantize()
    tuned = signround.AutoRound(str(stories_dir), iters=8, **kwargs)
    tuned.quantize_and_save(tmp_path / "out")
    losses = tuned.result.report.block_losses
    assert all(final <= start for start, final in losses)
    assert sum(final < start for start, final in losses) >= 4, losses  # SignSGD found better roundings
    changed = 0
    for name, q in tuned.result.report.quantized.items():
        start = rtn.result.report.quantized[name]
        assert isinstance(q, gguf.GGUFQuantized) and q.type_name == start.type_name
        changed += not torch.equal(q.codes, start.codes)
    assert changed >= len(tuned.result.report.quantized) // 2
    (path,) = (tmp_path / "out").glob("*.gguf")
    tensors = {t.name: t for t in gguf_py.GGUFReader(path).tensors}
    q = tuned.result.report.quantized["model.layers.3.mlp.up_proj"]
    assert bytes(tensors["blk.3.ffn_up.weight"].data.tobytes()) == bytes(gguf.to_bytes(q).tobytes())


def test_low_cpu_mem_usage_writes_the_same_gguf_file(stories_dir, shakespeare, tmp_path):
    """Under low_cpu_mem_usage (the CLI's default) the blocks are read from the checkpoint at their turn and the
    embedding and head load as separate tensors: the file is still byte for byte the in-memory run's (tied output
    included)."""
    files = []
    for low in (False, True):
        ar = signround.AutoRound(
            str(stories_dir), format="gguf:q4_k_m", iters=2, nsamples=4, seqlen=32, batch_size=2,
            dataset=str(shakespeare), low_cpu_mem_usage=low, show_progress=False,
        )  # fmt: skip
        ar.quantize_and_save(tmp_path / f"low{low}")
        (path,) = (tmp_path / f"low{low}").glob("*.gguf")
        files.append(path.read_bytes())
    assert files[0] == files[1]
    names = {t.name for t in gguf_py.GGUFReader(tmp_path / "lowTrue" / path.name).tensors}
    assert "output.weight" not in names


def test_a_qwen3_moe_is_tuned_per_expert_and_written_as_llama_cpp_s_stacked_experts(stories_dir, shakespeare, tmp_path):
    """Qwen3-MoE to GGUF: each expert is its own tuned Linear, planned at its stacked tensor's type; the file holds
    ffn_{gate,up,down}_exps [n_expert, out, in] with expert i's tuned blocks at index i (llama.cpp runs such files:
    integration_tests/test_gguf_llamacpp.py)."""
    from transformers import AutoTokenizer, Qwen3MoeConfig

    config = Qwen3MoeConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ar = signround.AutoRound(
        model, AutoTokenizer.from_pretrained(stories_dir), format="gguf:q4_k_m", iters=2, nsamples=4, seqlen=32,
        dataset=str(shakespeare), show_progress=False, low_cpu_mem_usage=False,
    )  # fmt: skip
    ar.quantize_and_save(tmp_path / "out")
    quantized = ar.result.report.quantized
    (path,) = (tmp_path / "out").glob("*.gguf")
    tensors = {t.name: t for t in gguf_py.GGUFReader(path).tensors}
    for proj, kind in (("gate_proj", "ffn_gate_exps"), ("up_proj", "ffn_up_exps"), ("down_proj", "ffn_down_exps")):
        stacked = tensors[f"blk.0.{kind}.weight"]
        experts = [quantized[f"model.layers.0.mlp.experts.{i}.{proj}"] for i in range(4)]
        assert len({q.type_name for q in experts}) == 1
        assert stacked.tensor_type.name == experts[0].type_name.upper()
        assert [int(n) for n in stacked.shape] == [256, 256, 4]
        per_expert = stacked.data.reshape(4, -1)
        for i, q in enumerate(experts):
            assert bytes(per_expert[i].tobytes()) == bytes(gguf.to_bytes(q).tobytes()), (proj, i)


def test_an_untied_head_gets_its_recipe_type_from_llama_cpp_s_quantizer(stories_dir, shakespeare, tmp_path):
    """quant_lm_head=False leaves the head untuned, not unquantized: as llama-quantize, a q4_k_m file stores an
    untied output in q6_k (llama.cpp's quantizer on the fp weight), not in f16."""
    from transformers import AutoTokenizer, LlamaConfig

    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    head = model.lm_head.weight.detach().clone()
    ar = signround.AutoRound(
        model, AutoTokenizer.from_pretrained(stories_dir), format="gguf:q4_k_m", iters=0, nsamples=4, seqlen=32,
        dataset=str(shakespeare), show_progress=False, low_cpu_mem_usage=False,
    )  # fmt: skip
    ar.quantize_and_save(tmp_path / "out")
    (path,) = (tmp_path / "out").glob("*.gguf")
    output = {t.name: t for t in gguf_py.GGUFReader(path).tensors}["output.weight"]
    assert output.tensor_type.name == "Q6_K"
    assert bytes(output.data.tobytes()) == bytes(gguf.to_bytes(gguf.quantize(head, "q6_k")).tobytes())
