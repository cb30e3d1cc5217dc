"""The diffusion generator: UNet shapes, the loss, training, the pipeline's two entry points, guidance,
saving and loading, and evaluation with the oracle. Everything on tiny models (seconds)."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from m2chat_lite import diffusion as D
from m2chat_lite.benchmark import BENCHMARK_SEED, load_benchmark
from m2chat_lite.config import get_config
from m2chat_lite.encoders import build_clip, encode_text
from m2chat_lite.layout import LayoutPlanner, layout_channels, train_planner
from m2chat_lite.tokenizer import train_tokenizer
from m2chat_lite.training import TrainConfig
from m2chat_lite.world import text_corpus

PROMPTS = ["a large red circle at the top left", "a small blue triangle in the center"]


@pytest.fixture(scope="module")
def small():
    """A 16-pixel config with a 32-wide text encoder, a tiny tokenizer and a random frozen CLIP."""
    config = get_config("tiny", image_size=16, unet_block_channels=(8, 16), text_encoder_hidden_size=32,
                        text_encoder_num_layers=1, cond_dim=32, pooled_dim=32, vision_hidden_size=32,
                        vision_num_layers=1)
    tokenizer = train_tokenizer(text_corpus(50, seed=0), vocab_size=300)
    torch.manual_seed(0)
    clip = build_clip(config, tokenizer).eval()
    return config, clip, tokenizer


def make_pipeline(small, seed=0, guidance_scale=2.0):
    config, clip, tokenizer = small
    torch.manual_seed(seed)
    unet = D.build_unet(config)
    _, sampler = D.build_schedulers()
    return D.TinyDiffusionPipeline(unet, sampler, clip, tokenizer,
                                   {"num_inference_steps": 4, "guidance_scale": guidance_scale})


def test_unet_shapes_and_conditioning_for_the_tiny_preset():
    config = get_config("tiny")
    unet = D.build_unet(config, **D.unet_kwargs(D.DiffusionRecipe()))  # the recipe's UNet: 2x2 patches
    assert D.patch_size_of(unet) == 2 and unet.config.sample_size == 16
    assert unet.config.in_channels == 12 + 2 and unet.config.out_channels == 12  # patches + coordinates
    x = torch.randn(2, 3, 32, 32)
    embeds, pooled = torch.randn(2, config.cond_seq_len, config.cond_dim), torch.randn(2, config.pooled_dim)
    patches = F.pixel_unshuffle(x, 2)
    with_coords = D.add_coordinates(unet, patches)  # two channels saying where each position is
    assert with_coords.shape == (2, 14, 16, 16) and torch.equal(with_coords[:, :12], patches)
    assert with_coords[0, 12, 0, 0] == -1 and with_coords[0, 12, -1, 0] == 1 and with_coords[0, 13, 0, -1] == 1
    t = torch.tensor([10, 900])
    with torch.no_grad():
        out = D.predict_noise(unet, x, t, embeds, pooled)
        by_hand = F.pixel_shuffle(unet(with_coords, t, encoder_hidden_states=embeds, class_labels=pooled).sample, 2)
    assert out.shape == x.shape and torch.allclose(out, by_hand)
    assert unet.config.block_out_channels == (64, 128, 128) and unet.config.cross_attention_dim == 128
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    assert unet.config.class_embed_type == "projection" and unet.config.resnet_time_scale_shift == "scale_shift"
    assert 5e6 < sum(p.numel() for p in unet.parameters()) < 8e6  # <= 16 MB in float16
    with torch.no_grad():  # the pooled embedding changes the output (it goes through the time embedding)
        other = D.predict_noise(unet, x, t, embeds, pooled + 1)
    assert not torch.allclose(out, other)
    plain = D.build_unet(config, coordinate_channels=False, patch_size=1)
    assert plain.config.in_channels == 3 and D.patch_size_of(plain) == 1 and torch.equal(D.add_coordinates(plain, x), x)
    with torch.no_grad():
        assert D.predict_noise(plain, x, t, embeds, pooled).shape == x.shape


def test_a_unet_without_pooled_conditioning_reads_the_caption_through_cross_attention_alone(small):
    config, clip, tokenizer = small
    torch.manual_seed(0)
    unet = D.build_unet(config, pooled_conditioning=False, attention_layers=2)
    assert unet.config.class_embed_type is None
    assert unet.config.transformer_layers_per_block == 2
    assert len(unet.down_blocks[-1].attentions[0].transformer_blocks) == 2
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    embeds, pooled = torch.randn(2, 40, 32), torch.randn(2, 32)
    with torch.no_grad():
        out = D.predict_noise(unet, x, t, embeds, pooled)
        assert torch.equal(out, D.predict_noise(unet, x, t, embeds, pooled + 1))  # the pooled vector is ignored
        assert torch.equal(out, D.predict_noise(unet, x, t, embeds, None))  # and may be left out
        assert not torch.allclose(out, D.predict_noise(unet, x, t, embeds + 1, pooled))  # the sequence is read
    pipe = D.TinyDiffusionPipeline(unet, D.build_schedulers()[1], clip, tokenizer, {"num_inference_steps": 2})
    noise = torch.randn(1, 3, 16, 16)
    by_embeds = pipe(prompt_embeds=embeds[:1], latents=noise, output_type="pt")  # no pooled needed
    assert torch.equal(by_embeds, pipe(prompt_embeds=embeds[:1], pooled_prompt_embeds=pooled[:1], latents=noise,
                                       output_type="pt"))
    recipe = D.DiffusionRecipe(pooled_conditioning=False, attention_layers=2)
    assert D.unet_kwargs(recipe)["pooled_conditioning"] is False and D.unet_kwargs(recipe)["attention_layers"] == 2


def test_a_layout_planner_map_goes_into_the_unet_as_extra_input_channels(small):
    config, _, _ = small
    torch.manual_seed(0)
    recipe = D.DiffusionRecipe(patch_size=2, layout_planner=True)
    unet = D.build_unet(config, **D.unet_kwargs(recipe))  # 16 px in 2x2 patches: an 8x8 input grid
    assert unet.config.in_channels == 12 + 2 + layout_channels() and D.layout_of(unet) is None
    planner = LayoutPlanner(cond_dim=32, side=8, width=32, blocks=1)
    unet.layout_planner = planner
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 900])
    embeds, pooled = torch.randn(2, 40, 32), torch.randn(2, 32)
    maps = planner(embeds)
    assert maps.shape == (2, layout_channels(), 8, 8)
    assert D.add_coordinates(unet, F.pixel_unshuffle(x, 2)).shape[1] == 14  # the coordinates are still added
    with torch.no_grad():
        out = D.predict_noise(unet, x, t, embeds, pooled)
        by_hand = F.pixel_shuffle(unet(torch.cat([D.add_coordinates(unet, F.pixel_unshuffle(x, 2)), maps], 1), t,
                                       encoder_hidden_states=embeds, class_labels=pooled).sample, 2)
    assert out.shape == x.shape and torch.allclose(out, by_hand, atol=1e-6)
    # the map reaches the output: another caption's map alone changes the prediction
    with torch.no_grad():
        other = torch.cat([D.add_coordinates(unet, F.pixel_unshuffle(x, 2)), maps.flip(0)], 1)
        moved = F.pixel_shuffle(unet(other, t, encoder_hidden_states=embeds, class_labels=pooled).sample, 2)
    assert not torch.allclose(out, moved)


def test_training_with_a_layout_planner_and_saving_it(small, tmp_path):
    config, clip, tokenizer = small
    recipe = D.DiffusionRecipe(batch_size=8, num_inference_steps=2, patch_size=2, layout_planner=True)
    train = TrainConfig(max_steps=30, lr=3e-3, warmup_steps=5, log_every=5)
    with pytest.raises(ValueError, match="train_planner"):
        D.train_diffusion(config, clip, tokenizer, train, recipe=recipe, progress=False)  # no planner given
    planner, _ = train_planner(config, clip, tokenizer, TrainConfig(max_steps=3, lr=1e-3, warmup_steps=1),
                               patch_size=2, batch_size=8, pool_size=24, progress=False, width=32, blocks=1)
    with pytest.raises(ValueError, match="layout_planner=True"):  # a planner, but no input for its map
        D.train_diffusion(config, clip, tokenizer, train, recipe=D.DiffusionRecipe(batch_size=8, patch_size=2),
                          planner=planner, progress=False)
    frozen = {k: v.clone() for k, v in planner.state_dict().items()}
    pipe, result = D.train_diffusion(config, clip, tokenizer, train, recipe=recipe, planner=planner, progress=False)
    losses = [h["loss"] for h in result.history]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    assert all(torch.equal(v, D.layout_of(pipe.unet).state_dict()[k]) for k, v in frozen.items())  # stays frozen
    folder = pipe.save_pretrained(tmp_path / "g", dtype=torch.float16)
    assert (folder / "layout_planner" / "config.json").is_file()
    assert json.loads((folder / "pipeline.json").read_text())["layout_planner"] == "layout_planner"
    from safetensors.torch import load_file
    unet_keys = load_file(next((folder / "unet").glob("*.safetensors"))).keys()
    assert not any(k.startswith("layout_planner") for k in unet_keys)  # saved once, in its own folder
    loaded = D.TinyDiffusionPipeline.from_pretrained(folder)
    assert D.layout_of(loaded.unet) is not None and D.layout_of(pipe.unet) is not None  # the original keeps it
    noise = torch.randn(1, 3, 16, 16)
    a = pipe(PROMPTS[0], latents=noise, output_type="pt")
    b = loaded(PROMPTS[0], latents=noise, output_type="pt")
    assert (a - b).abs().max() < 0.05  # float16 weights: the same picture up to rounding
    for path in (folder / "layout_planner").glob("*.safetensors"):
        path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(ValueError, match="cannot load the layout planner"):
        D.TinyDiffusionPipeline.from_pretrained(folder)
    shutil.rmtree(folder / "layout_planner")
    with pytest.raises(ValueError, match="missing layout_planner/config.json"):
        D.TinyDiffusionPipeline.from_pretrained(folder)


def test_build_unet_rejects_bad_settings():
    with pytest.raises(ValueError, match="cross_attention_levels"):
        D.build_unet(get_config("tiny"), cross_attention_levels=4)
    with pytest.raises(ValueError, match="generator"):
        D.build_unet(get_config("hf-small"))
    with pytest.raises(ValueError, match="divisible"):
        D.build_unet(get_config("tiny", unet_block_channels=(12, 24)))
    with pytest.raises(ValueError, match="patch_size"):
        D.build_unet(get_config("tiny"), patch_size=3)
    with pytest.raises(ValueError, match="attention_layers"):
        D.build_unet(get_config("tiny"), attention_layers=0)
    with pytest.raises(ValueError, match="divisible by 64"):  # 6 levels of 2x2 patches: 2 * 2**5
        D.build_unet(get_config("tiny", unet_block_channels=(8,) * 6), patch_size=2)


@pytest.mark.parametrize("prediction_type", D.PREDICTION_TYPES)
def test_diffusion_loss_targets_and_min_snr_weighting(small, prediction_type):
    config, _, _ = small
    torch.manual_seed(0)
    unet = D.build_unet(config)
    scheduler, _ = D.build_schedulers(prediction_type)
    images = torch.rand(4, 3, 16, 16) * 2 - 1
    embeds, pooled = torch.randn(4, 40, 32), torch.randn(4, 32)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain = D.diffusion_loss(unet, scheduler, images, embeds, pooled, generator=g())
    again = D.diffusion_loss(unet, scheduler, images, embeds, pooled, generator=g())
    weighted = D.diffusion_loss(unet, scheduler, images, embeds, pooled, generator=g(), snr_gamma=5.0)
    assert plain.ndim == 0 and torch.isfinite(plain) and torch.equal(plain, again)
    assert torch.isfinite(weighted) and not torch.equal(plain, weighted)


def test_a_bfloat16_unet_takes_float32_inputs_and_gives_its_answer_back_in_float32(small):
    """hf-small holds its pretrained UNet in bfloat16 on a GPU while the adapter's outputs and the noisy
    pictures are float32: predict_noise (and so diffusion_loss) casts at the UNet's door, outside autocast
    too (notebook 11 calls stage 1's loss by hand), and gradients still reach the float32 embeddings."""
    config, _, _ = small
    torch.manual_seed(0)
    unet = D.build_unet(config)
    scheduler, _ = D.build_schedulers()
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    embeds, pooled = torch.randn(2, 40, 32, requires_grad=True), torch.randn(2, 32)
    t = torch.tensor([10, 900])
    with torch.no_grad():
        full = D.predict_noise(unet, images, t, embeds, pooled)
    half = D.predict_noise(unet.to(torch.bfloat16), images, t, embeds, pooled)
    assert half.dtype == torch.float32 and half.shape == images.shape
    assert torch.allclose(half, full, atol=0.1)  # the same UNet, at bfloat16's precision
    D.diffusion_loss(unet, scheduler, images, embeds, pooled, generator=torch.Generator().manual_seed(0)).backward()
    assert embeds.grad is not None and embeds.grad.dtype == torch.float32 and embeds.grad.abs().sum() > 0


def test_a_few_training_steps_reduce_the_loss_and_are_deterministic(small, tmp_path):
    config, clip, tokenizer = small
    recipe = D.DiffusionRecipe(batch_size=8, num_inference_steps=3)
    runs = []
    for out_dir in (tmp_path / "a", None):
        pipe, result = D.train_diffusion(config, clip, tokenizer,
                                         TrainConfig(max_steps=60, lr=3e-3, warmup_steps=5, log_every=5),
                                         out_dir=out_dir, recipe=recipe, progress=False)
        runs.append((pipe, result))
    (pipe, result), (other, _) = runs
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:2]) / 2
    assert all(torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), other.unet.parameters()))
    assert (tmp_path / "a" / "trainer_state.pt").is_file()
    loaded = D.TinyDiffusionPipeline.from_pretrained(tmp_path / "a" / "pipeline")
    assert loaded.defaults["num_inference_steps"] == 3 and loaded.defaults["recipe"]["batch_size"] == 8


def test_batches_are_a_function_of_the_step_and_never_use_the_benchmark_seed(small):
    config, clip, tokenizer = small
    make_batch = D.CaptionEmbeddingBatches(clip, tokenizer, D.DiffusionRecipe(batch_size=4), config.image_size)
    a, b, c = make_batch(3), make_batch(3), make_batch(4)
    assert all(torch.equal(a[k], b[k]) for k in a) and not torch.equal(a["images"], c["images"])
    assert a["images"].shape == (4, 3, 16, 16) and a["prompt_embeds"].shape == (4, 40, 32)
    assert all(D.batch_seed(s, d) != BENCHMARK_SEED for d in range(3) for s in (0, BENCHMARK_SEED - 1_000_003,
                                                                              BENCHMARK_SEED - 2_000_006))
    curriculum = D.CaptionEmbeddingBatches(clip, tokenizer, D.DiffusionRecipe(batch_size=8, single_object_steps=5),
                                           config.image_size)
    assert curriculum(0)["images"].shape[0] == 8  # one-object pictures early on (checked via the embeddings' cache)
    assert all(" and " not in caption for caption in curriculum.cache)


def test_pooled_dropout_zeroes_the_pooled_embedding_alone_and_keeps_the_rest_of_the_batch(small):
    config, clip, tokenizer = small
    plain = D.CaptionEmbeddingBatches(clip, tokenizer, D.DiffusionRecipe(batch_size=64), config.image_size)(2)
    dropped = D.CaptionEmbeddingBatches(clip, tokenizer, D.DiffusionRecipe(batch_size=64, pooled_dropout=0.5),
                                        config.image_size)(2)
    for key in ("images", "prompt_embeds", "noise", "timesteps"):  # the same batch, noise and timesteps
        assert torch.equal(plain[key], dropped[key])
    captioned = plain["prompt_embeds"].abs().sum((1, 2)) > 0  # caption dropout left these
    zeroed = (dropped["pooled"] == 0).all(1) & captioned
    kept = (dropped["pooled"] == plain["pooled"]).all(1)
    assert 10 < int(zeroed.sum()) < captioned.sum() - 10  # about half of the captioned rows
    assert bool((zeroed | kept).all())  # a row's pooled embedding is kept or zeroed, nothing else


def test_pooled_noise_perturbs_the_pooled_embedding_by_its_own_scale(small):
    config, clip, tokenizer = small
    plain = D.CaptionEmbeddingBatches(clip, tokenizer, D.DiffusionRecipe(batch_size=64), config.image_size)(2)
    noisy = D.CaptionEmbeddingBatches(clip, tokenizer, D.DiffusionRecipe(batch_size=64, pooled_noise=0.5),
                                      config.image_size)(2)
    for key in ("images", "prompt_embeds", "noise", "timesteps"):
        assert torch.equal(plain[key], noisy[key])
    captioned = plain["pooled"].abs().sum(1) > 0
    rms = plain["pooled"][captioned].pow(2).mean(1).sqrt()
    change = (noisy["pooled"] - plain["pooled"])[captioned].pow(2).mean(1).sqrt()
    assert 0.3 < float((change / rms).mean()) < 0.7  # about half the embedding's own RMS
    assert torch.equal(noisy["pooled"][~captioned], plain["pooled"][~captioned])  # dropped captions stay null


def test_prompt_and_prompt_embeds_give_identical_pictures(small):
    config, clip, tokenizer = small
    pipe = make_pipeline(small)
    by_text = pipe(PROMPTS, generator=torch.Generator().manual_seed(0), output_type="pt")
    embeds, pooled = encode_text(clip, tokenizer, PROMPTS)
    by_embeds = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, generator=torch.Generator().manual_seed(0),
                     output_type="pt")
    assert by_text.shape == (2, 3, 16, 16) and torch.equal(by_text, by_embeds)
    images = pipe(PROMPTS[0], num_images_per_prompt=3, generator=torch.Generator().manual_seed(0))
    assert len(images) == 3 and images[0].size == (16, 16) and images[0].mode == "RGB"
    assert images[0].tobytes() != images[1].tobytes()  # different noise per picture
    again = pipe(PROMPTS[0], num_images_per_prompt=3, generator=torch.Generator().manual_seed(0))
    assert [i.tobytes() for i in images] == [i.tobytes() for i in again]  # deterministic


def test_guidance_one_skips_the_unconditional_pass(small):
    pipe = make_pipeline(small)
    batch_sizes = []
    hook = pipe.unet.register_forward_hook(lambda module, args, output: batch_sizes.append(args[0].shape[0]))
    try:
        plain = pipe(PROMPTS, guidance_scale=1.0, generator=torch.Generator().manual_seed(0), output_type="pt")
        unguided_calls, batch_sizes[:] = list(batch_sizes), []
        guided = pipe(PROMPTS, guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="pt")
    finally:
        hook.remove()
    assert unguided_calls == [2] * 4 and batch_sizes == [4] * 4
    assert not torch.equal(plain, guided)


def test_intermediates_and_bad_arguments(small):
    config, clip, tokenizer = small
    pipe = make_pipeline(small)
    images, steps = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), return_intermediates=True)
    assert len(images) == 1 and len(steps) == 4
    assert steps[0]["sample"].shape == steps[0]["pred_original"].shape == (1, 3, 16, 16)
    assert steps[0]["timestep"] > steps[-1]["timestep"]
    with pytest.raises(ValueError, match="either prompt"):
        pipe()
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        pipe(prompt_embeds=torch.randn(1, 40, 32))
    with pytest.raises(ValueError, match="prompt_embeds must be"):
        pipe(prompt_embeds=torch.randn(1, 40, 7), pooled_prompt_embeds=torch.randn(1, 32))
    with pytest.raises(ValueError, match="num_inference_steps"):
        pipe(PROMPTS[0], num_inference_steps=0)
    no_text = D.TinyDiffusionPipeline(pipe.unet, pipe.scheduler)
    with pytest.raises(ValueError, match="no text encoder"):
        no_text("a red circle")


def test_save_and_load_round_trip_gives_identical_pictures(small, tmp_path):
    pipe = make_pipeline(small)
    folder = pipe.save_pretrained(tmp_path / "generator")
    assert {p.name for p in folder.iterdir()} == {"unet", "scheduler", "text_encoder", "pipeline.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind
    loaded = D.TinyDiffusionPipeline.from_pretrained(folder)
    before = pipe(PROMPTS, generator=torch.Generator().manual_seed(3), output_type="pt")
    after = loaded(PROMPTS, generator=torch.Generator().manual_seed(3), output_type="pt")
    assert torch.equal(before, after) and loaded.defaults == pipe.defaults
    assert type(loaded.scheduler) is type(pipe.scheduler)
    # saving again replaces the folder whole; embeddings-only pipelines save without a text encoder
    D.TinyDiffusionPipeline(pipe.unet, pipe.scheduler).save_pretrained(folder)
    assert not (folder / "text_encoder").exists()
    assert D.TinyDiffusionPipeline.from_pretrained(folder).text_encoder is None


def test_half_precision_shipping_with_a_shared_text_encoder(small, tmp_path):
    from m2chat_lite.encoders import save_clip

    config, clip, tokenizer = small
    pipe = make_pipeline(small)
    save_clip(clip, tokenizer, tmp_path / "clip")  # the shipped layout: one CLIP folder beside the generator
    folder = pipe.save_pretrained(tmp_path / "diffusion", text_encoder_dir="../clip", dtype=torch.float16)
    assert not (folder / "text_encoder").exists()
    assert json.loads((folder / "pipeline.json").read_text())["text_encoder"] == "../clip"
    full = pipe.save_pretrained(tmp_path / "full")
    weights = lambda f: sum(p.stat().st_size for p in (f / "unet").glob("*.safetensors"))  # noqa: E731
    assert weights(folder) < 0.6 * weights(full)  # half the bytes (plus the header)
    loaded = D.TinyDiffusionPipeline.from_pretrained(folder)
    assert loaded.unet.dtype == torch.float32 and loaded.text_encoder is not None
    assert pipe.unet.dtype == torch.float32  # saving in half precision leaves the pipeline's own weights alone
    before = pipe(PROMPTS, generator=torch.Generator().manual_seed(3), output_type="pt")
    after = loaded(PROMPTS, generator=torch.Generator().manual_seed(3), output_type="pt")
    assert (before - after).abs().max() < 0.05  # float16 rounding of the weights, not a different model


def test_damaged_folders_give_clear_errors(small, tmp_path):
    pipe = make_pipeline(small)
    with pytest.raises(FileNotFoundError, match="no diffusion pipeline folder"):
        D.TinyDiffusionPipeline.from_pretrained(tmp_path / "nowhere")
    folder = pipe.save_pretrained(tmp_path / "g", include_text_encoder=False)
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.unlink()
    with pytest.raises(ValueError, match=f"{folder}.*missing unet/diffusion_pytorch_model.safetensors"):
        D.TinyDiffusionPipeline.from_pretrained(folder)

    folder = pipe.save_pretrained(tmp_path / "g", include_text_encoder=False)
    config_path = folder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["block_out_channels"] = [16, 16]
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"cannot load the UNet from {folder / 'unet'}"):
        D.TinyDiffusionPipeline.from_pretrained(folder)

    folder = pipe.save_pretrained(tmp_path / "g", include_text_encoder=False)
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"cannot load the UNet from {folder / 'unet'}"):
        D.TinyDiffusionPipeline.from_pretrained(folder)

    (folder / "pipeline.json").write_text("{not json")
    with pytest.raises(ValueError, match="pipeline.json is not valid JSON"):
        D.TinyDiffusionPipeline.from_pretrained(folder)


def test_a_failed_save_leaves_the_old_folder_untouched(small, tmp_path, monkeypatch):
    pipe = make_pipeline(small)
    folder = pipe.save_pretrained(tmp_path / "g", include_text_encoder=False)
    before = sorted(p.relative_to(folder) for p in folder.rglob("*"))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipe.scheduler, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        pipe.save_pretrained(folder)
    assert sorted(p.relative_to(folder) for p in folder.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["g"]


def test_evaluate_generator_reports_each_split_and_object_count(small):
    config, clip, tokenizer = small
    pipe = make_pipeline(small)
    samples = load_benchmark("caption", split="test")[:4] + load_benchmark("caption", split="heldout")[:2]
    results = D.evaluate_generator(pipe, samples, num_inference_steps=2, batch_size=4)
    assert set(results) == {"test", "heldout", "all", "seconds_per_image"}
    assert results["all"]["all"]["n"] == 6 and results["test"]["all"]["n"] == 4
    counts = {len(s.meta["scene"]["objects"]) for s in samples[:4]}
    assert {int(g.split()[0]) for g in results["test"] if g != "all"} == counts
    for scores in results["all"].values():
        assert set(scores) == {"n", *D.SCORE_KEYS} and all(0 <= scores[k] <= 1 for k in D.SCORE_KEYS)
    # the same prompt gets the same noise whatever the batch size
    again = D.evaluate_generator(pipe, samples, num_inference_steps=2, batch_size=3)
    assert again["all"] == results["all"]
    assert "1 object" in D.format_scores(results) or "2 objects" in D.format_scores(results)
    with pytest.raises(ValueError, match="caption samples"):
        D.evaluate_generator(pipe, load_benchmark("vqa", split="test")[:1])


def test_recipe_validation():
    with pytest.raises(ValueError, match="caption_dropout"):
        D.DiffusionRecipe(caption_dropout=1.0)
    with pytest.raises(ValueError, match="pooled_dropout"):
        D.DiffusionRecipe(pooled_dropout=-0.1)
    with pytest.raises(ValueError, match="pooled_noise"):
        D.DiffusionRecipe(pooled_noise=-1.0)
    with pytest.raises(ValueError, match="prediction_type"):
        D.DiffusionRecipe(prediction_type="noise")
    with pytest.raises(ValueError, match="layout_channels"):
        D.build_unet(get_config("tiny"), layout_channels=-1)
    with pytest.raises(ValueError, match="unknown recipe field"):
        D.DiffusionRecipe.from_dict({"batchsize": 3})
    assert D.DiffusionRecipe.from_dict({"batch_size": 3}).batch_size == 3
