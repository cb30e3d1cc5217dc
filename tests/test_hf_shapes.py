"""benchmarks/hf_shapes.py: random checkpoints with the hf-small preset's real architectures. Checked here
without writing them (the models are built on PyTorch's meta device: no memory, no initialisation)."""

import importlib.util
from pathlib import Path

import pytest
import torch

# benchmarks/ is no package, and putting it on sys.path would shadow other modules (it holds a diffusion.py)
_spec = importlib.util.spec_from_file_location(
    "hf_shapes", Path(__file__).resolve().parents[1] / "benchmarks" / "hf_shapes.py")
hf_shapes = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hf_shapes)


@pytest.fixture(scope="module")
def models():
    with torch.device("meta"):
        return hf_shapes.build_models()


def test_each_part_has_the_size_of_the_real_checkpoint():
    counts = hf_shapes.parameter_counts()
    assert set(counts) == set(hf_shapes.EXPECTED_MILLIONS)
    for name, millions in hf_shapes.EXPECTED_MILLIONS.items():
        assert counts[name] / 1e6 == pytest.approx(millions, abs=0.05), name
    assert counts["lm"] == 134_515_008  # SmolLM2-135M: tied embeddings counted once


def test_the_shapes_are_the_presets(models):
    lm = models["lm"].config
    assert (lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads, lm.num_key_value_heads) == (576, 30, 9, 3)
    assert lm.vocab_size == 49152 and lm.tie_word_embeddings
    assert models["lm"].get_input_embeddings().weight.shape == (49152, 576)
    vision = models["vision"].config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.image_size, vision.patch_size) == (768, 12, 224, 16)
    unet = models["unet"]
    assert unet.mid_block is None and tuple(unet.config.block_out_channels) == (320, 640, 1280)
    assert unet.config.layers_per_block == 1 and unet.config.cross_attention_dim == 768
    vae = models["vae"].config
    assert tuple(vae.block_out_channels) == (128, 256, 512, 512) and vae.scaling_factor == 0.18215
    text = models["text_encoder"].config
    assert (text.hidden_size, text.vocab_size, text.max_position_embeddings) == (768, 49408, 77)


def test_the_config_loads_the_written_folders_at_256_px(tmp_path):
    config = hf_shapes.config_for(tmp_path)
    assert config.name == "hf-small" and config.image_size == 256
    assert (config.lm_id, config.vision_id, config.generator_id) == tuple(
        str(tmp_path / part) for part in ("lm", "vision", "generator"))
