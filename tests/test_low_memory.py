"""``low_cpu_mem_usage``: the decoder blocks stay on disk (accelerate's offload, read from the checkpoint) until
their turn, each is packed as soon as it is tuned, and the output is byte-identical to an in-memory run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_families import make_causal_lm, make_tiny_llama

import signround
from signround.offload import is_offloaded, offload_device_map
from signround.streaming import output_digests


@pytest.fixture(scope="module")
def fp_dir(tmp_path_factory, stories_dir) -> Path:
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("fp")
    make_tiny_llama().save_pretrained(directory)
    AutoTokenizer.from_pretrained(stories_dir).save_pretrained(directory)
    return directory


def _autoround(fp_dir: Path, shakespeare: Path, low: bool) -> signround.AutoRound:
    return signround.AutoRound(
        str(fp_dir), bits=4, group_size=32, iters=3, nsamples=4, seqlen=32, batch_size=2, dataset=str(shakespeare),
        low_cpu_mem_usage=low, show_progress=False,
    )  # fmt: skip


def test_device_map_puts_each_block_and_the_embeddings_on_disk_and_the_rest_on_the_cpu():
    with torch.device("meta"):
        skeleton = make_tiny_llama()
    device_map = offload_device_map(skeleton, "model.layers")
    assert device_map == {
        "model.embed_tokens": "disk", "model.layers.0": "disk", "model.layers.1": "disk", "model.norm": "cpu",
        "model.rotary_emb": "cpu", "lm_head": "disk",
    }  # fmt: skip


def test_blocks_are_read_at_their_turn_packed_streamed_at_once_and_the_output_is_identical(
    fp_dir, shakespeare, tmp_path
):
    """Block 0 is packed, written to its own shard and released (meta) before block 1 is even read; the output
    holds the same tensors and files as an in-memory run's, and reloads to the same logits."""
    from transformers import AutoModelForCausalLM

    from signround.resume import work_dir_for

    ar = _autoround(fp_dir, shakespeare, low=True)
    blocks = ar.model.model.layers
    assert all(is_offloaded(b) and next(b.parameters()).device.type == "meta" for b in blocks)
    shard_0 = work_dir_for(tmp_path / "low") / "shards" / "block-00000.safetensors"
    seen = []

    def at_block_1(block, _args):
        if not seen:  # the first call of block 1 (its fp pass): block 0 is packed and streamed, block 1 is read
            seen.append(
                (
                    type(blocks[0].self_attn.q_proj).__name__,
                    {t.device.type for t in blocks[0].state_dict().values()},
                    shard_0.is_file(),
                    next(block.parameters()).device.type,
                    is_offloaded(block),
                )
            )

    blocks[1].register_forward_pre_hook(at_block_1)
    low = ar.quantize_and_save(tmp_path / "low")
    assert seen and seen[0][0].endswith("QuantLinear") and seen[0][1:] == ({"meta"}, True, "cpu", False)
    assert ar.result.report.layer_count == 14 and not ar.result.report.quantized  # tensors dropped once packed
    assert sorted(f.name for f in low.glob("*.safetensors")) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    assert not work_dir_for(tmp_path / "low").exists()

    normal = _autoround(fp_dir, shakespeare, low=False).quantize_and_save(tmp_path / "normal")
    assert output_digests(low) == output_digests(normal)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        torch.testing.assert_close(
            AutoModelForCausalLM.from_pretrained(low)(ids).logits,
            AutoModelForCausalLM.from_pretrained(normal)(ids).logits,
            rtol=0,
            atol=0,
        )


def test_streamed_blocks_can_only_be_saved_once_in_their_format(fp_dir, shakespeare, tmp_path):
    ar = _autoround(fp_dir, shakespeare, low=True)
    ar.quantize(work_dir=tmp_path / "work", stream=True)
    assert ar.result.shards.streamed == [0, 1]
    with pytest.raises(ValueError, match=r"streamed to disk in format 'auto_round'.*not 'auto_gptq'"):
        ar.save_quantized(tmp_path / "gptq", format="auto_gptq")
    ar.save_quantized(tmp_path / "out")
    with pytest.raises(RuntimeError, match="already saved"):
        ar.save_quantized(tmp_path / "again")
    assert not (tmp_path / "gptq").exists() and not (tmp_path / "again").exists()


def test_a_streamed_block_refuses_to_run_naming_why(fp_dir, shakespeare, tmp_path):
    """After a streaming save the released blocks are not silently meta tensors: running the model says which
    block went to the output and what to do."""
    ar = signround.AutoRound(
        str(fp_dir), bits=4, group_size=32, iters=0, nsamples=4, seqlen=32, dataset=str(shakespeare),
        show_progress=False, low_cpu_mem_usage=True,
    )  # fmt: skip
    ar.quantize_and_save(tmp_path / "out")
    assert ar.result.shards.streamed == [0, 1]
    with pytest.raises(RuntimeError, match=r"model\.layers\.0 was streamed to the saved output .* load the saved"):
        ar.model(torch.arange(8)[None])


def test_a_gguf_run_leaves_its_blocks_computing_the_file_s_weights(fp_dir, shakespeare):
    """GGUF is written whole at the end (nothing is packed per block), so under low_cpu_mem_usage the tuned blocks
    must still hold the dequantized weights: the CLI's --eval_ppl measures this model."""
    from signround.quant.dispatch import dequantize_weight

    ar = signround.AutoRound(
        str(fp_dir), format="gguf:q4_0", iters=2, nsamples=4, seqlen=32, batch_size=2, dataset=str(shakespeare),
        show_progress=False, low_cpu_mem_usage=True,
    )  # fmt: skip
    ar.quantize()
    quantized = ar.result.report.quantized
    assert len(quantized) == 14
    for name, q in quantized.items():
        weight = ar.model.get_submodule(name).weight
        assert torch.equal(weight, dequantize_weight(q, weight.dtype)), name


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_fused_experts_offloaded_to_disk_are_unfused_and_read_at_their_block_s_turn(
    family, stories_dir, shakespeare, tmp_path, monkeypatch
):
    """transformers keeps these experts as fused 3-D tensors; unfused while still on "disk", each per-expert
    Linear is read from the fused checkpoint tensors when its block's turn comes: the same output as in memory."""
    from transformers import AutoTokenizer

    from signround.models.experts import LinearExperts

    read_at_turn = []
    fill_from = LinearExperts.fill_from

    def spy(self, fused):
        devices = {t.device.type for t in fused.values()}
        if self.fused_source is not None and devices != {"meta"}:  # offloaded, now read from the checkpoint
            read_at_turn.append(devices)
        return fill_from(self, fused)

    monkeypatch.setattr(LinearExperts, "fill_from", spy)
    fp = tmp_path / "fp"
    make_causal_lm(family).save_pretrained(fp)
    AutoTokenizer.from_pretrained(stories_dir).save_pretrained(fp)
    outs = {}
    for low in (True, False):
        ar = signround.AutoRound(
            str(fp), bits=4, group_size=32, iters=2, nsamples=4, seqlen=32, batch_size=2, dataset=str(shakespeare),
            low_cpu_mem_usage=low, show_progress=False,
        )  # fmt: skip
        outs[low] = ar.quantize_and_save(tmp_path / f"q-{low}")
        if low:
            experts = ar.model.config.num_hidden_layers - getattr(ar.model.config, "first_k_dense_replace", 0)
            assert read_at_turn == [{"cpu"}] * experts  # once per experts module, at its block's turn
    assert output_digests(outs[True]) == output_digests(outs[False])


def test_several_formats_keep_the_packed_blocks_in_memory(fp_dir, shakespeare, tmp_path):
    """Streaming writes one format; with two, the blocks stay packed in memory and both formats are written."""
    ar = _autoround(fp_dir, shakespeare, low=True)
    out = ar.quantize_and_save(tmp_path / "both", format="auto_round,auto_gptq")
    assert ar.result.shards is None
    assert (out / "auto_round" / "model.safetensors").is_file() and (out / "auto_gptq" / "model.safetensors").is_file()


def test_quantize_on_load_with_a_disk_device_map_reads_the_offloaded_block_at_its_turn(
    fp_dir, shakespeare, tmp_path, monkeypatch
):
    """from_pretrained(..., device_map with a "disk" block): transformers and accelerate place the model, the
    offloaded block is read from its hooks when its turn comes (only it), and the saved model reloads equal."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from signround.tuning import engine

    read: list[str] = []
    original = engine.materialize

    def spy(block, device):
        read.append(f"{type(block).__name__}:{next(block.parameters()).device.type}->{device}")
        original(block, device)

    monkeypatch.setattr(engine, "materialize", spy)
    device_map = {
        "model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.norm": "cpu",
        "model.rotary_emb": "cpu", "lm_head": "cpu",
    }  # fmt: skip
    config = signround.AutoRoundConfig(
        bits=4, group_size=32, iters=2, nsamples=4, seqlen=32, batch_size=2, dataset=str(shakespeare)
    )
    model = AutoModelForCausalLM.from_pretrained(
        fp_dir, quantization_config=config, device_map=device_map, offload_folder=tempfile.mkdtemp(dir=tmp_path)
    )
    assert read == ["LlamaDecoderLayer:meta->cpu"]
    assert type(model.model.layers[1].self_attn.q_proj).__name__.endswith("QuantLinear")
    assert getattr(model, "hf_device_map", None) is None  # a plain CPU model again
    ids = torch.arange(12)[None]
    with torch.no_grad():
        in_memory = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, in_memory)


def test_plain_rtn_reads_the_offloaded_blocks_and_writes_the_same_tensors(fp_dir, tmp_path):
    """iters=0 with disable_opt_rtn walks no block: the blocks left on "disk" are read before quantizing."""

    def run(low: bool, out: Path) -> Path:
        ar = signround.AutoRound(
            str(fp_dir),
            bits=4,
            group_size=32,
            iters=0,
            disable_opt_rtn=True,
            low_cpu_mem_usage=low,
            show_progress=False,
        )
        return ar.quantize_and_save(out)

    assert output_digests(run(True, tmp_path / "low")) == output_digests(run(False, tmp_path / "normal"))
