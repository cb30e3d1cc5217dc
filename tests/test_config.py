"""Presets, overrides and the JSON round trip of m2chat_lite.config."""

import json

import pytest

from m2chat_lite.config import PRESETS, M2ChatConfig, get_config


def test_presets_exist_and_tiny_is_the_default():
    assert set(PRESETS) == {"tiny", "hf-small"}
    assert get_config() == get_config("tiny") == M2ChatConfig()


def test_tiny_preset_trains_everything_from_scratch():
    cfg = get_config("tiny")
    assert cfg.image_size == 32 and cfg.num_image_tokens == 4 and cfg.vocab_size == 512
    assert (cfg.lm_hidden_size, cfg.lm_num_layers, cfg.lm_num_heads) == (128, 4, 4)
    assert (cfg.vision_patch_size, cfg.vision_hidden_size, cfg.vision_num_layers) == (4, 128, 4)
    assert (cfg.text_encoder_hidden_size, cfg.text_encoder_num_layers) == (128, 2)
    assert cfg.unet_block_channels == (64, 128, 128)
    assert (cfg.adapter_num_queries, cfg.adapter_num_layers) == (40, 2)
    assert cfg.lm_id is cfg.vision_id is cfg.generator_id is None
    assert not cfg.uses_pretrained
    assert cfg.seed == 0


def test_hf_small_preset_names_its_checkpoints():
    cfg = get_config("hf-small")
    assert cfg.lm_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg.vision_id == "google/siglip-base-patch16-224"
    assert cfg.generator_id == "nota-ai/bk-sdm-tiny"
    assert cfg.uses_pretrained
    assert cfg.num_image_tokens == 8
    assert (cfg.cond_seq_len, cfg.cond_dim) == (77, 768)
    assert cfg.lm_hidden_size is None  # read from the checkpoint


def test_overrides_make_a_copy_and_leave_the_preset_alone():
    cfg = get_config("tiny", image_size=16, seed=3, unet_block_channels=[16, 32])
    assert (cfg.image_size, cfg.seed, cfg.unet_block_channels) == (16, 3, (16, 32))
    assert PRESETS["tiny"].image_size == 32
    with pytest.raises(AttributeError):
        cfg.image_size = 8  # frozen: use get_config(...) or cfg.replace(...)
    assert cfg.replace(seed=4).seed == 4


def test_unknown_preset_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'huge'") as info:
        get_config("huge")
    for name in PRESETS:
        assert name in str(info.value)


def test_unknown_override_lists_the_fields():
    with pytest.raises(ValueError, match="unknown override.*'imagesize'") as info:
        get_config("tiny", imagesize=16)
    assert "image_size" in str(info.value) and "num_image_tokens" in str(info.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"image_size": 0}, "image_size must be a positive int"),
        ({"image_size": 30}, "divisible by vision_patch_size"),
        ({"lm_num_heads": 3}, "divisible by lm_num_heads"),
        ({"cond_seq_len": 16}, "adapter_num_queries .* must equal cond_seq_len"),
        ({"cond_dim": 64}, "text_encoder_hidden_size .* must equal cond_dim"),
        ({"learning_rate": -1.0}, "learning_rate must be a positive number"),
        ({"seed": -1}, "seed must be a non-negative int"),
        ({"unet_block_channels": ()}, "unet_block_channels must be a non-empty tuple"),
        ({"lm_id": ""}, "lm_id must be a hub id"),
    ],
)
def test_bad_values_are_rejected_with_the_field_name(overrides, message):
    with pytest.raises(ValueError, match=message):
        get_config("tiny", **overrides)


def test_overriding_coupled_fields_together_works():
    cfg = get_config("tiny", cond_seq_len=16, adapter_num_queries=16)
    assert cfg.cond_seq_len == cfg.adapter_num_queries == 16


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_json_round_trip(name, tmp_path):
    cfg = get_config(name)
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data  # JSON-able as is
    assert M2ChatConfig.from_dict(data) == cfg

    path = tmp_path / "run" / "config.json"
    cfg.save(path)
    assert M2ChatConfig.load(path) == cfg
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temp file left


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown config field.*'colour'"):
        M2ChatConfig.from_dict({**get_config().to_dict(), "colour": "red"})


def test_load_rejects_a_file_that_is_not_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        M2ChatConfig.load(path)
