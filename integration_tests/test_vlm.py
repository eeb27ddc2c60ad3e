"""Vision-language models: the text decoder is quantized (the vision tower too with ``quant_nontext_module``),
calibration is text only, and the saved model reloads with its processor and answers an image + text input
exactly as the in-memory quantized model does."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_families import save_tiny_llava

from signround import AutoRound
from signround.streaming import output_digests

pytest.importorskip("PIL", reason="the Llava image processor needs pillow (pip install pillow; in .[dev])")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, stories_dir) -> Path:
    directory = tmp_path_factory.mktemp("llava-fp")
    save_tiny_llava(directory, stories_dir)
    return directory


def _inputs(directory: Path) -> dict:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(directory)
    image = (np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")
    return processor(text="<image> To be, or not to be", images=image, return_tensors="pt")


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return out


def _quantize(llava_dir: Path, out: Path, shakespeare: Path, **kwargs) -> AutoRound:
    ar = AutoRound(
        str(llava_dir), bits=4, group_size=32, iters=2, nsamples=4, seqlen=32, batch_size=2,
        dataset=str(shakespeare), show_progress=False, **kwargs,
    )  # fmt: skip
    ar.quantize_and_save(out)
    return ar


def test_llava_text_decoder_quantized_vision_untouched(llava_dir, tmp_path, shakespeare):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "q"
    ar = _quantize(llava_dir, out, shakespeare, low_cpu_mem_usage=False)  # in memory: compared with the file
    # the default (blocks on disk, each streamed to the output once packed) writes the same tensors and files
    _quantize(llava_dir, tmp_path / "low", shakespeare)
    assert output_digests(tmp_path / "low") == output_digests(out)
    assert type(ar.model).__name__ == "LlavaForConditionalGeneration"
    assert (out / "processor_config.json").exists() or (out / "preprocessor_config.json").exists()
    inputs = _inputs(out)  # the saved processor
    assert int((inputs["input_ids"] == ar.model.config.image_token_id).sum()) == 16
    with torch.no_grad():
        in_memory = ar.model(**inputs).logits
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    with torch.no_grad():
        logits = reloaded(**inputs).logits
    torch.testing.assert_close(logits, in_memory, rtol=1e-4, atol=1e-4)

    saved, original = _tensors(out), _tensors(llava_dir)
    assert any(name.endswith("layers.1.self_attn.q_proj.qweight") for name in saved)
    vision = [n for n in original if "vision_tower" in n or "multi_modal_projector" in n]
    assert vision
    for name in vision:  # byte-identical vision tower and projector
        assert torch.equal(saved[name], original[name]), name


def test_quant_nontext_module_quantizes_the_vision_blocks(llava_dir, tmp_path, shakespeare):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "q-vision"
    ar = _quantize(llava_dir, out, shakespeare, quant_nontext_module=True, low_cpu_mem_usage=False)
    saved = _tensors(out)
    vision_packed = [n for n in saved if "vision_tower" in n and n.endswith(".qweight")]
    assert len(vision_packed) == 2 * 6  # q, k, v, out_proj, fc1, fc2 of both CLIP blocks
    inputs = _inputs(out)
    with torch.no_grad():
        in_memory = ar.model(**inputs).logits
    reloaded = AutoModelForImageTextToText.from_pretrained(out)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, in_memory, rtol=1e-4, atol=1e-4)
