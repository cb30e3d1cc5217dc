"""The hf-small path offline: tiny random models of the same classes as the preset's checkpoints (a Llama
with a ChatML template, SigLIP, Stable Diffusion's UNet + VAE + CLIP text encoder), saved with
``save_pretrained`` and loaded through exactly the code a hub id goes through (``hf.save_stand_ins``)."""

import json

import pytest
import torch

from m2chat_lite import hf
from m2chat_lite.config import get_config
from m2chat_lite.m3ft import train_stage1, train_stage2
from m2chat_lite.pipeline import M2ChatPipeline
from m2chat_lite.training import TrainConfig


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return hf.save_stand_ins(tmp_path_factory.mktemp("hf-small"))


@pytest.fixture()
def system(config):
    return hf.build_system(config, device="cpu")


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def changed(before, module):
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())}


def test_the_parts_are_sized_from_the_loaded_configs(system):
    model, tokenizer, generator = system
    lm_width = model.fused.lm.config.hidden_size
    adapter = model.adapter.config
    assert (adapter.cond_dim, adapter.pooled_dim, adapter.num_queries) == (32, 32, 77)  # SD's text encoder
    assert adapter.lm_dim == 2 * lm_width  # input embeddings and last layer side by side
    assert adapter.vision_dim == 32 and adapter.visual_positions == 1 + (32 // 8) ** 2  # SigLIP, 4x4 patches
    assert model.fused.lm.get_input_embeddings().num_embeddings >= len(tokenizer)
    assert {"<image>", "[IMG0]", "[IMG3]"} <= set(tokenizer.get_added_vocab())
    assert generator.image_size == 32 and generator.latent_shape == (4, 16, 16)
    assert model.vae is generator.vae and model.image_size == 32


def test_the_vision_tower_reads_any_picture_size_and_puts_a_class_token_first(config):
    tower = hf.load_vision_tower(config.vision_id)
    for side in (20, 64):
        out = tower(torch.rand(2, 3, side, side) * 2 - 1)
        assert out.last_hidden_state.shape == (2, 17, 32)
        assert len(out.hidden_states) == tower.config.num_hidden_layers + 1
        patches = out.hidden_states[0][:, 1:]
        torch.testing.assert_close(out.hidden_states[0][:, 0], patches.mean(1))  # SigLIP: the mean stands in


def test_a_vision_tower_must_be_siglip_or_clip(config):
    with pytest.raises(ValueError, match="SigLIP or CLIP"):
        hf.load_vision_tower(config.lm_id)


def test_the_generator_draws_from_a_prompt_or_from_prompt_embeds_alike(system):
    _, _, generator = system
    latents = torch.randn(1, *generator.latent_shape, generator=torch.Generator().manual_seed(0))
    from_text = generator(prompt="a red circle", latents=latents, num_inference_steps=2, output_type="pt")
    embeds, pooled = generator.encode_prompt("a red circle")
    from_embeds = generator(prompt_embeds=embeds, pooled_prompt_embeds=pooled, latents=latents,
                            num_inference_steps=2, output_type="pt")
    assert from_text.shape == (1, 3, 32, 32) and from_text.abs().max() <= 1
    torch.testing.assert_close(from_text, from_embeds)
    pictures = generator(prompt=["a", "b"], num_inference_steps=2)
    assert [p.size for p in pictures] == [(32, 32)] * 2
    with pytest.raises(ValueError, match="latents must have shape"):
        generator(prompt="a", latents=torch.zeros(1, 3, 32, 32), num_inference_steps=2)
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        generator(prompt_embeds=torch.zeros(1, 77, 8), num_inference_steps=2)


def test_a_stage_1_step_trains_only_the_adapter_and_the_img_embeddings(system):
    model, tokenizer, generator = system
    before = snapshot(model)
    result = train_stage1(model, tokenizer, TrainConfig(max_steps=2, log_every=1, warmup_steps=1), batch_size=2,
                          pool_size=8, progress=False)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    moved = changed(before, model)
    assert moved and all(n.startswith("adapter.") or n == "fused.gen_embeddings" for n in moved)
    assert "fused.gen_embeddings" in moved
    pictures = torch.rand(2, 3, 32, 32) * 2 - 1
    assert model.diffusion_targets(pictures).shape == (2, 4, 16, 16)  # the generator denoises VAE latents


def test_a_stage_2_step_trains_lora_projector_and_fusion_gate_only(system):
    model, tokenizer, _ = system
    before = snapshot(model)
    train_stage2(model, tokenizer, TrainConfig(max_steps=2, log_every=1, warmup_steps=1), batch_size=2,
                 pool_size=8, progress=False)
    moved = changed(before, model)
    assert any("lora_" in n for n in moved) and "fused.gate" in moved
    assert all("lora_" in n or n.startswith(("fused.projector.", "fused.gate")) for n in moved)


def test_the_whole_system_draws_a_picture_and_chats(system):
    model, tokenizer, generator = system
    pipe = M2ChatPipeline(model, tokenizer, generator)
    assert pipe.end_id == tokenizer.eos_token_id  # a pretrained chat template ends turns with its eos
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in pipe.banned
    messages = [{"role": "user", "content": "draw a red circle"},
                {"role": "assistant", "content": [{"type": "text", "text": "here it is"}, {"type": "image"}]}]
    drawn = pipe.illustrate(messages, num_inference_steps=2)[-1]["content"][-1]
    assert drawn["image"].size == (32, 32) and drawn["image"].mode == "RGB" and 0 <= drawn["gate"] <= 1
    reply = pipe.chat([{"role": "user", "content": "draw a red circle"}], max_new_tokens=4, num_inference_steps=2)
    assert reply.tokens <= 4 and reply.message["role"] == "assistant"


def test_build_system_needs_checkpoint_ids():
    with pytest.raises(ValueError, match="does not name lm_id, vision_id, generator_id"):
        hf.build_system(get_config("tiny"), device="cpu")


def test_frozen_parts_stay_float32_on_a_cpu(system):
    model, _, _ = system
    assert hf.frozen_dtype("cpu") == torch.float32
    report = hf.memory_report(model)
    assert report["frozen_mb"] > report["trained_mb"] > 0


def test_a_clip_vision_tower_keeps_its_own_class_token(tmp_path):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     image_size=32, patch_size=8)).save_pretrained(tmp_path)
    tower = hf.load_vision_tower(str(tmp_path))
    out = tower(torch.zeros(1, 3, 32, 32))
    assert tower.has_class_token and out.last_hidden_state.shape == (1, 17, 16)
    torch.testing.assert_close(tower.mean.flatten(), torch.tensor(hf.IMAGE_STATS["clip"][0]))


def test_a_trained_system_saves_and_loads_through_the_pipeline(system, tmp_path):
    model, tokenizer, generator = system
    train_stage1(model, tokenizer, TrainConfig(max_steps=1, log_every=1, warmup_steps=1), batch_size=2,
                 pool_size=4, progress=False)
    pipe = M2ChatPipeline(model, tokenizer, generator)
    pipe.save_pretrained(tmp_path / "system")
    assert sorted(p.name for p in (tmp_path / "system").iterdir()) == ["adapter", "fused", "hf.json", "m2chat.json"]
    loaded = M2ChatPipeline.from_pretrained(tmp_path / "system", device="cpu")
    for name, param in model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name], param, msg=name)  # random resize rows too
    messages = [{"role": "user", "content": "draw"}, {"role": "assistant", "content": [{"type": "image"}]}]
    first = pipe.illustrate(messages, num_inference_steps=2)[-1]["content"][0]["image"]
    again = loaded.illustrate(messages, num_inference_steps=2)[-1]["content"][0]["image"]
    assert first.tobytes() == again.tobytes()


def test_hf_training_runs_both_stages_from_real_data_files(config, tmp_path):
    from m2chat_lite.data import write_jsonl
    from m2chat_lite.world.samples import make_samples

    captions = make_samples("caption", 4, seed=1, image_size=32)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i, sample in enumerate(captions):  # the folder layout: picture + same-stem caption
        sample.images()[0].load().save(pairs / f"{i}.png")
        (pairs / f"{i}.txt").write_text(sample.meta["caption"])
    record = hf.train("stage1", config, tmp_path / "run", data=pairs, steps=2, batch_size=2, device="cpu",
                      progress=False)
    assert record["steps"] == 2 and (tmp_path / "run" / "stage1" / "hf.json").is_file()
    assert not (tmp_path / "run" / ".state" / "stage1").exists()
    stories = tmp_path / "stories.jsonl"
    write_jsonl(make_samples("story", 3, seed=2, image_size=32), stories)
    record = hf.train("stage2", config, tmp_path / "run", data=stories, steps=1, batch_size=2, device="cpu",
                      progress=False)
    assert record["stage"] == "stage2" and record["trained_mb"] > 0
    pipe = M2ChatPipeline.from_pretrained(tmp_path / "run" / "stage2", device="cpu")
    assert pipe.model.record["stage"] == "stage2"
    (tmp_path / "vist.json").write_text("{}")
    with pytest.raises(ValueError, match="VIST file: pass the folder of its pictures"):
        hf.read_training_data(tmp_path / "vist.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hf.read_training_data(tmp_path / "missing.jsonl")


def test_real_pictures_are_captioned_by_their_own_words():
    from m2chat_lite.data import Image, Sample, Text, Turn
    from m2chat_lite.m3ft import picture_captions

    picture = Image(path="x.png")
    story = Sample("s", "story", [Turn("user", [Text("tell me a story")]),
                                  Turn("assistant", [Text("A cat sat."), picture, Text("It ran."), picture])], {})
    assert picture_captions(story) == ["A cat sat.", "It ran."]
    edit = Sample("d", "dialogue", [Turn("user", [Text("make it blue")]), Turn("assistant", [picture])], {})
    assert picture_captions(edit) == ["make it blue"]


def test_the_cli_trains_hf_small_from_local_checkpoints(config, tmp_path, capsys):
    from m2chat_lite.cli import main

    ids = ["--lm-id", config.lm_id, "--vision-id", config.vision_id, "--generator-id", config.generator_id]
    out = ["--out", str(tmp_path), "--device", "cpu"]
    assert main(["train", "--preset", "hf-small", "--stage", "stage2", *out, *ids]) == 2
    assert "no hf-small stage-1 system" in capsys.readouterr().err
    assert main(["train", "--preset", "hf-small", "--stage", "lm"]) == 2
    assert "trains --stage stage1 or stage2" in capsys.readouterr().err
    # ShapeWorld (no --data) at the stand-ins' 32 px
    assert main(["train", "--preset", "hf-small", "--stage", "stage1", "--steps", "1", "--batch-size", "2",
                 "--image-size", "32", *out, *ids]) == 0
    assert "stage1: 1 steps" in capsys.readouterr().out
    assert json.loads((tmp_path / "stage1" / "hf.json").read_text())["image_size"] == 32


def test_a_vision_tower_uses_its_checkpoints_own_pixel_statistics(config, tmp_path):
    import shutil

    shutil.copytree(config.vision_id, tmp_path / "vision")
    (tmp_path / "vision" / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.1, 0.2, 0.3], "image_std": [0.5, 0.5, 0.5]}))
    tower = hf.load_vision_tower(str(tmp_path / "vision"))
    torch.testing.assert_close(tower.mean.flatten(), torch.tensor([0.1, 0.2, 0.3]))
    assert hf.load_vision_tower(config.vision_id).mean.flatten().tolist() == [0.5, 0.5, 0.5]  # SigLIP's default
