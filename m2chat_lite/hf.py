"""The ``hf-small`` preset: M²Chat from pretrained Hugging Face checkpoints, hub ids or local folders.

Taught in notebook ``11_scaling_up``. The tiny preset trains every part itself; this one loads them:

- the **LM**: any ``transformers`` causal LM with a chat template (a SmolLM2-class instruct model), its
  tokenizer widened with ``<image>`` and ``[IMG0..K-1]`` (``backbone.build_tokenizer`` / ``build_lm``);
- the **vision tower**: a SigLIP or CLIP vision model (:func:`load_vision_tower`), wrapped in
  :class:`VisionTower` so that it takes the course's pictures (``[-1, 1]``, any size) and, like the tiny
  CLIP, gives a class token first (SigLIP has none: the mean of its patches stands in);
- the **generator**: a Stable-Diffusion-class ``diffusers`` model (UNet, VAE, scheduler and its CLIP text
  encoder, the alignment teacher), behind the same interface as the tiny generator of notebook 04
  (:class:`LatentDiffusionGenerator`); it denoises VAE latents, and sampling is diffusers' own
  ``StableDiffusionPipeline`` fed ``prompt_embeds``.

:func:`build_system` puts them together with a fresh projector, fusion gate, LoRA and M³Adapter, each sized
from the loaded configs, so M³FT (``m3ft.train_stage1`` / ``train_stage2``) and the chat pipeline run on
it unchanged. On a GPU the frozen parts are held in half precision (bfloat16 where the card supports it,
float16 on a T4) and what trains stays in float32 under autocast; on a CPU everything is float32.

Nothing here downloads by itself in the tests: they save tiny random models of the same classes with
``save_pretrained`` and load them through exactly this code (``tests/test_hf.py``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import quiet
from .config import M2ChatConfig, get_config
from .data import tensor_to_image
from .utils import amp_dtype, get_device

# Pixel statistics each vision family was trained with; pictures in [0, 1] are normalised with them.
IMAGE_STATS = {"siglip": ([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
               "clip": ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])}


def frozen_dtype(device: str) -> torch.dtype:
    """How the frozen parts are held: bfloat16 on GPUs that support it, float16 on older ones (T4),
    float32 on the CPU (the same rule as the training loop's autocast, ``utils.amp_dtype``)."""
    return amp_dtype(device)


# ---------------------------------------------------------------------------------------------
# The vision tower
# ---------------------------------------------------------------------------------------------


class VisionTower(nn.Module):
    """A pretrained vision model that reads the course's pictures: ``[N, 3, H, W]`` in ``[-1, 1]`` are resized
    to the model's ``image_size`` and normalised with its statistics. ``forward(pixel_values,
    output_hidden_states)`` returns ``hidden_states`` (every layer) and ``last_hidden_state`` shaped
    ``[N, 1 + P, d]``: a class token first, as the tiny CLIP gives them (:class:`~m2chat_lite.fusion.VisualProjector`
    and the adapter's visual branch expect it). SigLIP has no class token; the mean of the patches stands in."""

    def __init__(self, model: nn.Module, mean, std, has_class_token: bool):
        super().__init__()
        self.model, self.has_class_token = model, has_class_token
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def config(self):
        return self.model.config

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = True):
        size = self.config.image_size
        x = (pixel_values.float() + 1) / 2
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        x = ((x - self.mean) / self.std).to(next(self.model.parameters()).dtype)
        out = self.model(pixel_values=x, output_hidden_states=True)
        states = out.hidden_states if self.has_class_token else tuple(
            torch.cat([h.mean(1, keepdim=True), h], 1) for h in out.hidden_states)
        return SimpleNamespace(hidden_states=states, last_hidden_state=states[-1])


def load_vision_tower(vision_id: str, dtype: torch.dtype = torch.float32) -> VisionTower:
    """A SigLIP or CLIP vision model from a hub id or a folder (a whole SigLIP/CLIP checkpoint or its
    vision part), frozen, as a :class:`VisionTower`."""
    from transformers import AutoConfig, CLIPVisionModel, SiglipVisionModel

    config = AutoConfig.from_pretrained(vision_id)
    family = config.model_type.removesuffix("_vision_model")
    classes = {"siglip": SiglipVisionModel, "clip": CLIPVisionModel}
    if family not in classes:
        raise ValueError(f"{vision_id} is a {config.model_type!r} model; the vision tower must be SigLIP or CLIP "
                         "(set vision_id to one, e.g. google/siglip-base-patch16-224)")
    model = classes[family].from_pretrained(vision_id, dtype=dtype).eval().requires_grad_(False)
    mean, std = IMAGE_STATS[family]
    from transformers.utils import cached_file

    # the checkpoint's own statistics when it ships a preprocessor config (read as JSON: no image processor)
    found = cached_file(vision_id, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False)
    if found:
        processor = json.loads(Path(found).read_text())
        mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
    return VisionTower(model, mean, std, has_class_token=family == "clip")


# ---------------------------------------------------------------------------------------------
# The generator: Stable Diffusion behind the tiny generator's interface
# ---------------------------------------------------------------------------------------------


class LatentDiffusionGenerator:
    """A Stable-Diffusion-class text-to-image model with the interface of
    :class:`~m2chat_lite.diffusion.TinyDiffusionPipeline`: ``unet``, ``vae``, ``text_encoder`` (the
    alignment teacher) and ``tokenizer``, ``image_size``, ``latent_shape``, ``training_scheduler()``,
    ``encode_prompt(prompt)`` and ``__call__(prompt=... | prompt_embeds=...)`` returning pictures.

    Sampling is ``diffusers.StableDiffusionPipeline`` with ``prompt_embeds`` (and the empty prompt's
    embeddings as the unconditional input of classifier-free guidance, as SD was trained). SD's UNet is not
    conditioned on a pooled embedding: ``pooled_prompt_embeds`` is accepted and ignored (M³FT still aligns
    the adapter's pooled output with the teacher's, as the paper's loss has it)."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, image_size: int | None = None,
                 defaults: dict | None = None):
        from diffusers import StableDiffusionPipeline

        self.unet, self.vae, self.text_encoder, self.tokenizer = unet.eval(), vae.eval(), text_encoder.eval(), tokenizer
        self.scheduler = scheduler
        for part in (unet, vae, text_encoder):
            part.requires_grad_(False)
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        native = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
        self.image_size = image_size or native * self.vae_scale
        if self.image_size % (self.vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)):
            raise ValueError(f"image_size {self.image_size} does not fit this generator: it must be a multiple of "
                             f"{self.vae_scale * 2 ** (len(unet.config.block_out_channels) - 1)}")
        self.defaults = {"num_inference_steps": 25, "guidance_scale": 7.5, **(defaults or {})}
        self.sd = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                          requires_safety_checker=False)
        self.sd.set_progress_bar_config(disable=True)

    @classmethod
    def from_pretrained(cls, generator_id: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                        image_size: int | None = None, sampler: str = "dpm") -> "LatentDiffusionGenerator":
        """Load the parts of a diffusers Stable Diffusion folder or hub id (``unet/``, ``vae/``,
        ``text_encoder/``, ``tokenizer/``, ``scheduler/``). ``sampler="dpm"`` samples with DPM-Solver++
        (fast), ``"native"`` with the checkpoint's own scheduler."""
        from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, UNet2DConditionModel
        from diffusers.schedulers import SchedulerMixin
        from transformers import CLIPTextModel, CLIPTokenizer

        unet = UNet2DConditionModel.from_pretrained(generator_id, subfolder="unet", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(generator_id, subfolder="vae", torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(generator_id, subfolder="text_encoder", dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(generator_id, subfolder="tokenizer")
        if sampler == "dpm":
            scheduler = DPMSolverMultistepScheduler.from_pretrained(generator_id, subfolder="scheduler")
        else:
            scheduler = SchedulerMixin.from_pretrained(generator_id, subfolder="scheduler")
        return cls(unet, vae, text_encoder, tokenizer, scheduler, image_size).to(device)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The shape of one picture's starting noise: ``(latent channels, H / f, W / f)``."""
        side = self.image_size // self.vae_scale
        return self.unet.config.in_channels, side, side

    def to(self, device) -> "LatentDiffusionGenerator":
        self.sd.to(device)
        return self

    def training_scheduler(self):
        """A ``DDPMScheduler`` on the checkpoint's noise schedule, for M³FT stage 1's diffusion loss."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler.config)

    @torch.no_grad()
    def encode_prompt(self, prompt):
        """``(prompt_embeds [B, 77, d], pooled [B, d])`` from the frozen CLIP text encoder."""
        from .encoders import encode_text

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        return encode_text(self.text_encoder, self.tokenizer, prompts, device=self.device)

    @torch.no_grad()
    def __call__(self, prompt=None, prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil"):
        """Pictures for ``prompt`` or for ``prompt_embeds`` ``[B, 77, d]``; ``latents`` ``[B, *latent_shape]``
        fix the starting noise. A list of PIL pictures, or with ``output_type="pt"`` a tensor in ``[-1, 1]``."""
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass either prompt (text) or prompt_embeds, not both or neither")
        if prompt is not None:
            prompt_embeds, _ = self.encode_prompt(prompt)
        want = self.text_encoder.config.hidden_size
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[-1] != want:
            raise ValueError(f"prompt_embeds must be [batch, seq_len, {want}], got {tuple(prompt_embeds.shape)}")
        n, dtype = len(prompt_embeds), self.unet.dtype
        if latents is not None and tuple(latents.shape) != (n, *self.latent_shape):
            raise ValueError(f"latents must have shape {(n, *self.latent_shape)}, got {tuple(latents.shape)}")
        negative, _ = self.encode_prompt([""] * n)
        out = self.sd(prompt_embeds=prompt_embeds.to(self.device, dtype), negative_prompt_embeds=negative.to(dtype),
                      height=self.image_size, width=self.image_size,
                      num_inference_steps=num_inference_steps or self.defaults["num_inference_steps"],
                      guidance_scale=self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale,
                      generator=generator, latents=None if latents is None else latents.to(self.device, dtype),
                      output_type="pt").images
        pictures = (out.float().cpu() * 2 - 1).clamp(-1, 1)
        return pictures if output_type == "pt" else [tensor_to_image(x) for x in pictures]


# ---------------------------------------------------------------------------------------------
# The whole system
# ---------------------------------------------------------------------------------------------


def build_system(config: M2ChatConfig | str = "hf-small", device: str | None = None, tokens_per_image: int = 9,
                 lora_rank: int = 16, gate_mode: str = "adaptive", seed: int = 0):
    """``(model, tokenizer, generator)``: an untrained M²Chat around the checkpoints ``config`` names
    (``lm_id``, ``vision_id``, ``generator_id``: hub ids or local folders), ready for M³FT. The projector,
    the fusion gate, LoRA (``lora_rank``), the ``[IMG]`` embeddings and the adapter are new (from ``seed``)
    and float32; the pretrained parts are frozen and, on a GPU, in half precision."""
    from .backbone import build_lm, build_tokenizer
    from .fusion import build_fused_lm
    from .m3ft import build_m2chat

    config = get_config(config) if isinstance(config, str) else config
    missing = [f for f in ("lm_id", "vision_id", "generator_id") if getattr(config, f) is None]
    if missing:
        raise ValueError(f"preset {config.name!r} does not name {', '.join(missing)}; build_system loads pretrained "
                         "checkpoints (use get_config('hf-small', lm_id=..., ...)); the tiny preset trains its own")
    device = get_device(device)
    dtype = frozen_dtype(device)
    with quiet():
        tokenizer = build_tokenizer(config)
        lm = build_lm(config, tokenizer, dtype=dtype)
        vision = load_vision_tower(config.vision_id, dtype=dtype)
        generator = LatentDiffusionGenerator.from_pretrained(config.generator_id, dtype=dtype,
                                                             image_size=config.image_size)
    fused = build_fused_lm(lm, vision, tokenizer, tokens_per_image, lora_rank, seed).to(device)
    generator.to(device)
    model = build_m2chat(fused, generator, config, gate_mode=gate_mode, seed=seed)
    model.hf_config = config  # what save_system records: the checkpoints the frozen parts come from
    return model.to(device), tokenizer, generator


# ---------------------------------------------------------------------------------------------
# Saving, loading and training an hf-small system
# ---------------------------------------------------------------------------------------------

HF_FILE = "hf.json"  # beside m2chat.json: the config whose checkpoints the system stands on
ADDED_ROWS = "added_rows.safetensors"  # the LM's embedding rows of the tokens M²Chat added


def _added_ids(tokenizer) -> list[int]:
    return sorted(tokenizer.get_added_vocab().values())


def save_system(model, tokenizer, folder, config: M2ChatConfig, record: dict | None = None,
                adapter_dir: str | None = None) -> Path:
    """Write an hf-small system, all or nothing: the trained parts as the tiny system writes them
    (``m3ft.save_system``: ``fused/``, ``adapter/``, ``m2chat.json``), ``hf.json`` (``config``: the
    checkpoint ids the frozen parts load from) and the LM's embedding rows of the added tokens (resizing
    drew them at random; they must come back the same). The checkpoints themselves are not copied."""
    from safetensors.torch import save_file

    from .m3ft import save_system as save_trained_parts

    lm = model.fused.lm
    ids = torch.tensor(_added_ids(tokenizer))
    rows = {"ids": ids, "input": lm.get_input_embeddings().weight.detach()[ids].float().cpu().contiguous()}
    output = lm.get_output_embeddings()
    if output is not None and output.weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr():
        rows["output"] = output.weight.detach()[ids].float().cpu().contiguous()

    def extra(tmp: Path) -> None:
        (tmp / HF_FILE).write_text(json.dumps(config.to_dict(), indent=2))
        save_file(rows, tmp / "fused" / ADDED_ROWS)

    return save_trained_parts(model, folder, record=record, lm_dir=config.lm_id, clip_dir=config.vision_id,
                              diffusion_dir=config.generator_id, adapter_dir=adapter_dir, extra=extra)


def load_system(folder, device: str | None = None):
    """``(model, tokenizer, generator)`` from a folder written by :func:`save_system`: the checkpoints its
    ``hf.json`` names (hub ids or folders), the trained parts from the folder."""
    from safetensors.torch import load_file

    from .backbone import build_lm, build_tokenizer
    from .fusion import load_fused
    from .m3ft import SYSTEM_FILE, assemble_system

    folder, device = Path(folder), get_device(device)
    try:
        config = M2ChatConfig.from_dict(json.loads((folder / HF_FILE).read_text()))
        meta = json.loads((folder / SYSTEM_FILE).read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder} is not a complete hf-small system ({error}); save it again with "
                         "hf.save_system") from error
    dtype = frozen_dtype(device)
    with quiet():
        tokenizer = build_tokenizer(config)
        lm = build_lm(config, tokenizer, dtype=dtype)
        rows = load_file(folder / "fused" / ADDED_ROWS)
        if rows["ids"].tolist() != _added_ids(tokenizer):
            raise ValueError(f"the tokenizer of {config.lm_id} does not give M²Chat's tokens the ids this system "
                             "was trained with; load it with the checkpoint it was trained on")
        with torch.no_grad():
            lm.get_input_embeddings().weight[rows["ids"]] = rows["input"].to(dtype)
            if "output" in rows:
                lm.get_output_embeddings().weight[rows["ids"]] = rows["output"].to(dtype)
        vision = load_vision_tower(config.vision_id, dtype=dtype)
        generator = LatentDiffusionGenerator.from_pretrained(config.generator_id, dtype=dtype,
                                                             image_size=config.image_size)
    fused, tokenizer = load_fused(folder / "fused", device=device, lm=(lm, tokenizer), vision=vision)
    generator.to(device)
    source = {"lm": config.lm_id, "clip": config.vision_id, "diffusion": config.generator_id}
    model = assemble_system(folder, meta, fused, generator, source, device)
    model.hf_config = config
    return model, tokenizer, generator


def read_training_data(path, images=None, image_size: int = 256) -> list:
    """Samples from a real dataset: a folder of pictures with ``.txt`` captions or a JSONL of
    ``{"image", "caption"}`` pairs (stage 1), a VIST ``.json`` file with ``images`` its picture folder
    (stories), an MMDialog ``.jsonl`` whose lines hold ``conversation`` (dialogues), or this package's own
    JSONL (any task). Pictures are made ``image_size`` squares. ``data/samples/README.md`` shows each layout."""
    from .data import read_caption_pairs, read_jsonl, read_mmdialog, read_vist

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"training data {path} does not exist; see data/samples/README.md for the layouts")
    if path.is_dir():
        return read_caption_pairs(path, image_size=image_size)
    if path.suffix == ".json":
        if images is None:
            raise ValueError(f"{path} looks like a VIST file: pass the folder of its pictures too (--images DIR)")
        return read_vist(path, images, image_size=image_size)
    first = json.loads(next((line for line in path.open(encoding="utf-8") if line.strip()), "{}"))
    if "turns" in first:
        return read_jsonl(path, image_size=image_size)
    if "conversation" in first:
        return read_mmdialog(path, images, image_size=image_size)
    if {"image", "caption"} <= set(first):
        return read_caption_pairs(path, image_size=image_size)
    raise ValueError(f"cannot tell what {path} holds (its first line has {sorted(first)}); expected caption pairs, "
                     "MMDialog or m2chat-lite JSONL: see data/samples/README.md")


def train(stage: str, config: M2ChatConfig, out_dir, data=None, images=None, steps: int = 1000,
          batch_size: int | None = None, lr: float | None = None, seed: int = 0, device: str | None = None,
          grad_accum_steps: int = 1, progress: bool = True) -> dict:
    """M³FT for the hf-small preset: ``stage1`` (a fresh system around the checkpoints) into
    ``out_dir/stage1``, ``stage2`` (from ``out_dir/stage1``) into ``out_dir/stage2``. ``data`` is a real
    dataset (:func:`read_training_data`); without it, ShapeWorld at ``config.image_size`` (offline).
    Returns the training record (also in the system's ``m2chat.json``)."""
    from .m3ft import examples_of, train_stage1, train_stage2
    from .training import TrainConfig, is_main_process, wait_for_everyone

    if stage not in ("stage1", "stage2"):
        raise ValueError(f"the hf-small preset trains stage1 or stage2, not {stage!r}")
    out_dir, device = Path(out_dir), get_device(device)
    batch_size = batch_size or config.batch_size
    samples = read_training_data(data, images, config.image_size) if data is not None else None
    # ShapeWorld is drawn as needed: as many examples as the run will see (at most 2,000, at least 4 batches)
    pool_size = max(4 * batch_size, min(2000, steps * batch_size * grad_accum_steps))
    train_config = TrainConfig(max_steps=steps, lr=lr or config.learning_rate, warmup_steps=min(100, steps // 10 + 1),
                               weight_decay=0.0, log_every=max(1, min(25, steps)), seed=seed,
                               grad_accum_steps=grad_accum_steps, checkpoint_every=max(1, steps // 10))
    state_dir = out_dir / ".state" / stage
    start = time.perf_counter()
    if stage == "stage1":
        model, tokenizer, _ = build_system(config, device=device, seed=seed)
        examples = None if samples is None else [e for s in samples for e in examples_of(s)]
        result = train_stage1(model, tokenizer, train_config, batch_size=batch_size, pool_size=pool_size,
                              examples=examples, out_dir=state_dir, device=device, progress=progress)
    else:
        if not (out_dir / "stage1" / HF_FILE).is_file():
            raise FileNotFoundError(f"{out_dir} holds no hf-small stage-1 system; run `m2chat-lite train --preset "
                                    f"hf-small --stage stage1 --out {out_dir}` first")
        model, tokenizer, _ = load_system(out_dir / "stage1", device=device)
        result = train_stage2(model, tokenizer, train_config, batch_size=batch_size, pool_size=pool_size,
                              samples=samples, out_dir=state_dir, device=device, progress=progress)
    record = {"stage": stage, "preset": config.name, "steps": result.steps, "batch_size": batch_size,
              "train_seconds": round(time.perf_counter() - start, 1), "final_loss": result.final_loss,
              "data": str(data) if data is not None else f"ShapeWorld at {config.image_size} px", "seed": seed,
              "device": device, **memory_report(model)}
    if is_main_process():
        save_system(model, tokenizer, out_dir / stage, config, record,
                    adapter_dir="../stage1/adapter" if stage == "stage2" else None)
        shutil.rmtree(state_dir, ignore_errors=True)
    wait_for_everyone()
    return record


def memory_report(model: nn.Module) -> dict[str, float]:
    """Parameter memory in MB, split into what trains and what is frozen (weights only: activations and
    the optimizer's state, 2 × the trained weights for AdamW, come on top)."""
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    return {"trained_mb": trained / 2**20, "frozen_mb": frozen / 2**20,
            "adamw_state_mb": 2 * trained / 2**20}



# ---------------------------------------------------------------------------------------------
# Offline stand-ins: tiny random models of the same classes, saved like hub checkpoints
# ---------------------------------------------------------------------------------------------


def save_stand_ins(folder, image_size: int = 32, seed: int = 0) -> M2ChatConfig:
    """Write tiny **random** checkpoints of the hf-small classes to ``folder`` (``lm/``: a Llama with a
    ChatML template; ``vision/``: a SigLIP vision model; ``generator/``: a Stable Diffusion folder with UNet,
    VAE, CLIP text encoder and tokenizer) and return the ``hf-small`` config that loads them. They draw
    noise and write nonsense: they exist so that the loading, training and generation code of this preset
    runs offline, in the tests and in notebook 11 on a CPU, through exactly the code a hub id goes through."""
    folder = Path(folder)
    with quiet(), torch.random.fork_rng():
        torch.manual_seed(seed)
        _save_stand_ins(folder, image_size, seed)
    return get_config("hf-small", lm_id=str(folder / "lm"), vision_id=str(folder / "vision"),
                      generator_id=str(folder / "generator"), image_size=image_size, num_image_tokens=4,
                      max_seq_len=512)


def _save_stand_ins(folder: Path, image_size: int, seed: int) -> None:
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, LlamaConfig, LlamaForCausalLM,
                              PreTrainedTokenizerFast, SiglipVisionConfig, SiglipVisionModel)
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from . import world

    # the LM: a byte-level BPE with a ChatML template, as SmolLM2's
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(world.text_corpus(200, seed=seed), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    lm_tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", bos_token="<|im_start|>")
    lm_tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    lm_tokenizer.save_pretrained(folder / "lm")
    LlamaForCausalLM(LlamaConfig(vocab_size=len(lm_tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=512,
                                 eos_token_id=lm_tokenizer.eos_token_id)).save_pretrained(folder / "lm")
    # the vision tower
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=32, patch_size=8)
                      ).save_pretrained(folder / "vision")
    # the generator: SD's classes, 2x VAE, 32-wide CLIP text encoder with a byte-level CLIP tokenizer
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
                                                bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"]))
    unet = UNet2DConditionModel(sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32,
                                attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, sample_size=image_size)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer(vocab=vocab, merges=[]),
                            unet=unet, scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                            feature_extractor=None, requires_safety_checker=False).save_pretrained(folder / "generator")
