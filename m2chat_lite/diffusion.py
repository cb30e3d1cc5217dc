"""The diffusion image generator: a text-conditioned UNet, its noise schedulers, guidance and a pipeline.

Taught in notebook ``04_diffusion``; the M³Adapter (``06``) and M³FT stage 1 (``07``) drive the same
generator through its second entry point (precomputed ``prompt_embeds`` and pooled embeds), and reuse
:func:`diffusion_loss` through the frozen UNet.

Everything follows ``diffusers`` conventions, so the ``hf-small`` preset can swap in a pretrained Stable
Diffusion UNet without changing the code around it:

- :func:`build_unet` makes a ``UNet2DConditionModel`` working in pixel space, on 2×2 pixel patches
  stacked as channels (the recipe's ``patch_size``) with two coordinate channels; :func:`predict_noise`
  wraps the call. It reads the caption twice: **cross-attention** on the text encoder's hidden states
  (``prompt_embeds`` ``[B, cond_seq_len, cond_dim]``) at the two coarsest resolutions, and the
  **pooled** caption embedding (``[B, pooled_dim]``) added to the timestep embedding
  (``class_embed_type="projection"``), which scales and shifts every ResNet block's features.
- A **layout planner** (:mod:`m2chat_lite.layout`, in the shipped recipe): what each cell of the picture
  holds, read from the caption's token states, given to the UNet as extra input channels. The pooled vector
  cannot say which object is where (``benchmarks/DIFFUSION_RECIPE.md``, "Two objects").
- Training uses a ``DDPMScheduler`` (the forward noising ``x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε``); sampling a
  fast ``DPMSolverMultistepScheduler`` (DPM-Solver++) with the same noise schedule, with the predicted
  clean picture clipped to the pixel range.
- **Classifier-free guidance** with *zero* embeddings as the unconditional input: during training the
  caption is dropped (both embeddings zeroed) for a fraction of the batch, so one UNet learns both
  ``ε(x_t, caption)`` and ``ε(x_t, ∅)``, and sampling extrapolates ``ε_∅ + w·(ε_c − ε_∅)``. Zeros need
  no text encoder, so the adapter path works with embeddings alone.
- :class:`TinyDiffusionPipeline` is the ``StableDiffusionPipeline``-style object: ``pipe("a red
  circle")`` or ``pipe(prompt_embeds=..., pooled_prompt_embeds=...)`` returns PIL pictures; it saves to and
  loads from a folder (``unet/``, ``scheduler/``, ``text_encoder/``, ``pipeline.json``), atomically.
- :func:`train_diffusion` is the training recipe (:class:`DiffusionRecipe`; how its defaults were chosen,
  and where they fall short of the quality bar, is in ``benchmarks/DIFFUSION_RECIPE.md``) on top of the
  shared loop in :mod:`m2chat_lite.training`; :func:`evaluate_generator` scores pictures with the
  ShapeWorld oracle.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Sequence

import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .config import M2ChatConfig
from .layout import LayoutPlanner, layout_channels
from .benchmark import training_seed  # training data's seeds: derived from the step, never the benchmark's
from .data import image_to_tensor, tensor_to_image
from .training import TrainConfig, TrainResult, train
from .utils import DATA_DIR
from .world import caption_pairs, render, score
from .world.samples import scenes_of

PIPELINE_FILE = "pipeline.json"
UNET_DIR, SCHEDULER_DIR, TEXT_ENCODER_DIR, LAYOUT_DIR = "unet", "scheduler", "text_encoder", "layout_planner"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SAMPLERS = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}


# ---------------------------------------------------------------------------------------------
# The model and its schedulers
# ---------------------------------------------------------------------------------------------


def build_unet(config: M2ChatConfig, cross_attention_levels: int = 2, layers_per_block: int = 1,
               attention_heads: int = 2, norm_num_groups: int = 8,
               coordinate_channels: bool = True, patch_size: int = 1,
               scale_shift: bool = False, pooled_conditioning: bool = True,
               attention_layers: int = 1, layout_channels: int = 0) -> UNet2DConditionModel:
    """A pixel-space ``UNet2DConditionModel`` for ``config`` (randomly initialised).

    One resolution level per entry of ``config.unet_block_channels``, the first at
    ``image_size / patch_size`` px, each next one half the size; the ``cross_attention_levels`` coarsest
    levels (and the middle block) attend to the caption.

    ``patch_size`` 2 makes the UNet work on 2×2 patches of pixels stacked as channels (``pixel_unshuffle``:
    a 3×32×32 picture is 12×16×16; "patching" in Simple Diffusion, Hoogeboom et al. 2023). It is lossless,
    so the diffusion process is unchanged, but every convolution runs on a quarter of the positions: the
    same compute buys a wider network. :func:`predict_noise` does the reshaping.
    ``attention_heads`` is the number of heads per attention layer (diffusers calls this argument
    ``attention_head_dim`` for historical reasons: 64 channels with 2 heads is 32 dimensions per head).

    ``coordinate_channels`` gives the UNet two extra input channels holding each pixel's row and column
    (CoordConv, Liu et al. 2018; :func:`add_coordinates` fills them in). Convolutions are translation
    equivariant, so without them the only clue to *where* a pixel is comes from the zero padding at the
    borders, and "at the top left" is learnt very slowly (see ``benchmarks/DIFFUSION_RECIPE.md``).

    ``pooled_conditioning`` False leaves out the pooled caption embedding (no ``class_embed_type``): the UNet
    reads the caption through cross-attention alone, as Stable Diffusion 1.x does. ``attention_layers`` is
    the number of transformer blocks (self-attention, cross-attention, feed-forward) at each attending level.

    ``layout_channels`` > 0 gives the UNet that many extra input channels for a layout map: attach the
    :class:`~m2chat_lite.layout.LayoutPlanner` that draws it as ``unet.layout_planner`` (:func:`train_diffusion`
    does), and :func:`predict_noise` feeds its map in.
    """
    channels = config.unet_block_channels
    if channels is None:
        raise ValueError(f"the {config.name!r} preset loads its generator from {config.generator_id!r}; "
                         "build_unet makes the tiny preset's UNet from scratch (config.unet_block_channels)")
    levels = len(channels)
    if not 0 <= cross_attention_levels <= levels:
        raise ValueError(f"cross_attention_levels must be between 0 and {levels} (the number of resolution "
                         f"levels), got {cross_attention_levels}")
    if patch_size not in (1, 2, 4):
        raise ValueError(f"patch_size must be 1, 2 or 4, got {patch_size!r}")
    if config.image_size % (patch_size * 2 ** (levels - 1)):
        raise ValueError(f"image_size {config.image_size} must be divisible by {patch_size * 2 ** (levels - 1)} "
                         f"for {levels} resolution levels with patch_size {patch_size}")
    if not isinstance(layout_channels, int) or layout_channels < 0:
        raise ValueError(f"layout_channels must be an int >= 0, got {layout_channels!r}")
    if not isinstance(attention_layers, int) or attention_layers < 1:
        raise ValueError(f"attention_layers must be a positive int, got {attention_layers!r}")
    bad = [c for c in channels if c % norm_num_groups or c % attention_heads]
    if bad:
        raise ValueError(f"every entry of unet_block_channels {channels} must be divisible by norm_num_groups "
                         f"({norm_num_groups}) and attention_heads ({attention_heads})")
    attends = [i >= levels - cross_attention_levels for i in range(levels)]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends))
    unet = UNet2DConditionModel(
        sample_size=config.image_size // patch_size,
        in_channels=3 * patch_size ** 2 + 2 * coordinate_channels + layout_channels,
        out_channels=3 * patch_size ** 2,
        block_out_channels=tuple(channels), layers_per_block=layers_per_block,
        down_block_types=down, up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn" if cross_attention_levels else None,
        cross_attention_dim=config.cond_dim, attention_head_dim=attention_heads,
        norm_num_groups=norm_num_groups,
        class_embed_type="projection" if pooled_conditioning else None,
        projection_class_embeddings_input_dim=config.pooled_dim if pooled_conditioning else None,
        transformer_layers_per_block=attention_layers,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default",
    )
    return unet


def layout_of(unet) -> LayoutPlanner | None:
    """The UNet's :class:`~m2chat_lite.layout.LayoutPlanner`, or None (Stable Diffusion's UNet has none)."""
    return getattr(unet, "layout_planner", None)


def build_schedulers(prediction_type: str = "epsilon", beta_schedule: str = "squaredcos_cap_v2",
                     num_train_timesteps: int = 1000, sampler: str = "dpm"):
    """``(training scheduler, sampling scheduler)``: a ``DDPMScheduler`` and a fast sampler on the same
    noise schedule, both clipping the predicted clean picture to the pixel range ``[-1, 1]``."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    common = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                  prediction_type=prediction_type)
    training = DDPMScheduler(**common, clip_sample=True)
    return training, sampling_scheduler(training.config, sampler)


def sampling_scheduler(scheduler_config, sampler: str = "dpm", spacing: str | None = None):
    """A sampler (``"dpm"``: DPM-Solver++ 2M, ``"ddim"``: DDIM) on the noise schedule of ``scheduler_config``.

    ``spacing`` (diffusers' ``timestep_spacing``) defaults to ``"trailing"``, which starts at the last
    training timestep, where (with the cosine schedule) no signal is left: right for v- and
    x0-prediction. An ε-predicting model cannot start there (its guess of the clean picture is the noise
    amplified ~10⁴ times), so for ε the default is ``"leading"`` (951 of 1000 for 20 steps).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "trained_betas")
    common = {k: scheduler_config[k] for k in keys if k in scheduler_config}
    if spacing is None:
        spacing = "leading" if common.get("prediction_type", "epsilon") == "epsilon" else "trailing"
    offset = 1 if spacing == "leading" else 0
    if sampler == "dpm":  # thresholding at sample_max_value=1 clips the predicted x0 to the pixel range
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2,
                                           thresholding=True, sample_max_value=1.0, dynamic_thresholding_ratio=1.0,
                                           timestep_spacing=spacing, steps_offset=offset)
    return DDIMScheduler(**common, clip_sample=True, set_alpha_to_one=True, timestep_spacing=spacing,
                         steps_offset=offset)


def add_coordinates(unet, sample: torch.Tensor) -> torch.Tensor:
    """``sample`` with the row and column channels appended (in ``[-1, 1]``) if ``unet`` takes them
    (two input channels more than its output and its layout planner's, see :func:`build_unet`); otherwise
    ``sample`` unchanged."""
    layout = layout_of(unet)
    if unet.config.in_channels - (layout.channels if layout else 0) != unet.config.out_channels + 2:
        return sample
    b, _, h, w = sample.shape
    rows = torch.linspace(-1, 1, h, device=sample.device, dtype=sample.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    cols = torch.linspace(-1, 1, w, device=sample.device, dtype=sample.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([sample, rows, cols], dim=1)


def patch_size_of(unet) -> int:
    """The ``patch_size`` a UNet from :func:`build_unet` was built with (1 for any other UNet, such as a
    Stable Diffusion one working on 4-channel VAE latents)."""
    out = unet.config.out_channels
    for p in (4, 2):
        if out == 3 * p * p:
            return p
    return 1


def predict_noise(unet, sample: torch.Tensor, timesteps, prompt_embeds: torch.Tensor,
                  pooled: torch.Tensor | None = None) -> torch.Tensor:
    """The UNet's output (ε, v or x0) for noisy pictures ``sample`` ``[B, 3, H, W]``, shaped like ``sample``.

    Wraps the plain ``unet(sample, t, encoder_hidden_states=..., class_labels=...)`` call with what
    :func:`build_unet` may have added: 2×2 patches in and out (``patch_size``), the coordinate channels and
    the layout planner's map.

    The UNet is fed in its own dtype (hf-small holds it in bfloat16 on a GPU, while the adapter's outputs and
    the noisy pictures are float32) and its output comes back in ``sample``'s.
    """
    p = patch_size_of(unet)
    dtype = unet.dtype
    x = add_coordinates(unet, F.pixel_unshuffle(sample, p) if p > 1 else sample).to(dtype)
    prompt_embeds = prompt_embeds.to(dtype)
    pooled = None if pooled is None else pooled.to(dtype)
    layout = layout_of(unet)
    if layout is not None:
        x = torch.cat([x, layout(prompt_embeds).to(dtype)], dim=1)
    out = unet(x, timesteps, **_unet_kwargs(unet, prompt_embeds, pooled)).sample.to(sample.dtype)
    return F.pixel_shuffle(out, p) if p > 1 else out


def _unet_kwargs(unet, prompt_embeds: torch.Tensor, pooled: torch.Tensor | None) -> dict:
    kwargs = {"encoder_hidden_states": prompt_embeds}
    if unet.config.class_embed_type is not None:
        if pooled is None:
            raise ValueError("this UNet is conditioned on the pooled caption embedding too; pass pooled embeds")
        kwargs["class_labels"] = pooled
    return kwargs


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ``ᾱ_t / (1 − ᾱ_t)`` of the scheduler at ``timesteps``."""
    alphas = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas / (1 - alphas)


def diffusion_loss(unet, scheduler, images: torch.Tensor, prompt_embeds: torch.Tensor,
                   pooled: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                   timesteps: torch.Tensor | None = None, snr_gamma: float | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The denoising loss: noise ``images`` (``[B, 3, H, W]`` in ``[-1, 1]``) to random timesteps, ask
    ``unet`` for the scheduler's target (ε, v or x0, per ``scheduler.config.prediction_type``) and return
    the mean squared error.

    ``snr_gamma`` turns on Min-SNR-γ weighting (Hang et al. 2023): each timestep's loss is weighted as if
    the model predicted x0 with weight ``min(SNR, γ)``, so the nearly clean timesteps, which are easy,
    stop dominating. ``noise`` and ``timesteps`` default to fresh draws from ``generator``.
    """
    b = images.shape[0]
    if noise is None:
        noise = torch.randn(images.shape, generator=generator, dtype=images.dtype).to(images.device)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator)
    timesteps = timesteps.to(images.device)
    noisy = scheduler.add_noise(images, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        target = noise
    elif kind == "v_prediction":
        target = scheduler.get_velocity(images, noise, timesteps)
    elif kind == "sample":
        target = images
    else:
        raise ValueError(f"unsupported prediction_type {kind!r}; valid: {', '.join(PREDICTION_TYPES)}")
    prediction = predict_noise(unet, noisy, timesteps, prompt_embeds, pooled)
    per_sample = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return per_sample.mean()
    ratio = snr(scheduler, timesteps)
    clipped = torch.clamp(ratio, max=snr_gamma)
    weight = {"epsilon": clipped / ratio, "v_prediction": clipped / (ratio + 1), "sample": clipped}[kind]
    return (per_sample * weight).mean()


# ---------------------------------------------------------------------------------------------
# Text conditioning
# ---------------------------------------------------------------------------------------------


def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str], device=None):
    """``(prompt_embeds [B, cond_seq_len, cond_dim], pooled [B, pooled_dim])`` from the frozen text encoder,
    computed where it is and returned on ``device`` (default: there too)."""
    from .encoders import encode_text  # the tiny CLIP of notebook 02

    with torch.no_grad():
        return encode_text(text_encoder, tokenizer, list(prompts), device=device)


def null_embeddings(prompt_embeds: torch.Tensor, pooled: torch.Tensor | None):
    """The unconditional input of classifier-free guidance: zeros shaped like the caption's embeddings."""
    return torch.zeros_like(prompt_embeds), None if pooled is None else torch.zeros_like(pooled)


# ---------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------


class TinyDiffusionPipeline:
    """Text (or embeddings) to pictures, in the style of ``diffusers.StableDiffusionPipeline``.

    ``unet`` and ``scheduler`` (a sampler) are required; ``text_encoder`` and ``tokenizer`` (the frozen
    tiny CLIP and its tokenizer) are needed only for the ``prompt=`` entry point. ``defaults`` holds the
    sampling settings the recipe was tuned with (``num_inference_steps``, ``guidance_scale``).
    """

    def __init__(self, unet: UNet2DConditionModel, scheduler, text_encoder=None, tokenizer=None,
                 defaults: dict | None = None):
        self.unet = unet.eval()
        self.scheduler = scheduler
        self.text_encoder = text_encoder.eval().requires_grad_(False) if text_encoder is not None else None
        self.tokenizer = tokenizer
        self.defaults = {"num_inference_steps": 20, "guidance_scale": 3.0, **(defaults or {})}

    # --- properties ----------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def image_size(self) -> int:
        size = self.unet.config.sample_size
        return (size if isinstance(size, int) else size[0]) * patch_size_of(self.unet)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """The shape of one picture's starting noise (here the picture's own: this generator works in pixels)."""
        return self.unet.config.out_channels // patch_size_of(self.unet) ** 2, self.image_size, self.image_size

    def to(self, device) -> "TinyDiffusionPipeline":
        self.unet.to(device)
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        return self

    def training_scheduler(self) -> DDPMScheduler:
        """A ``DDPMScheduler`` on the same noise schedule, for :func:`diffusion_loss` (M³FT stage 1)."""
        keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "trained_betas")
        return DDPMScheduler(**{k: self.scheduler.config[k] for k in keys if k in self.scheduler.config},
                             clip_sample=True)

    def encode_prompt(self, prompt: str | Sequence[str]):
        """``(prompt_embeds, pooled)`` for one caption or a list, from the pipeline's frozen text encoder."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text encoder; pass prompt_embeds and pooled_prompt_embeds "
                             "instead of prompt, or build it with text_encoder= and tokenizer=")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
        return encode_prompts(self.text_encoder, self.tokenizer, prompts, device=str(self.device))

    # --- sampling ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: str | Sequence[str] | None = None, prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, generator: torch.Generator | None = None,
                 num_images_per_prompt: int = 1, latents: torch.Tensor | None = None,
                 return_intermediates: bool = False, output_type: str = "pil"):
        """Pictures for ``prompt`` (a caption or a list), or for precomputed ``prompt_embeds``
        (``[B, cond_seq_len, cond_dim]``) and ``pooled_prompt_embeds`` (``[B, pooled_dim]``).

        ``guidance_scale`` 1 uses the caption alone (one UNet call per step); above 1, classifier-free
        guidance. ``generator`` (a CPU ``torch.Generator``) makes the starting noise reproducible;
        ``latents`` gives it directly (``[B·n, 3, H, W]``). Returns a list of PIL pictures
        (``output_type="pt"``: a tensor in ``[-1, 1]``); with ``return_intermediates=True`` a pair
        ``(pictures, steps)`` where ``steps`` lists, per sampling step, ``{"timestep", "sample",
        "pred_original"}`` tensors (the noisy picture and the model's guess of the clean one).
        """
        steps = self.defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps
        scale = self.defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {steps!r}")
        if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be a positive int, got {num_images_per_prompt!r}")
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass either prompt (text) or prompt_embeds (with pooled_prompt_embeds), not both or neither")
        device = self.device
        if prompt is not None:
            prompt_embeds, pooled_prompt_embeds = self.encode_prompt(prompt)
        prompt_embeds, pooled_prompt_embeds = self._check_embeds(prompt_embeds, pooled_prompt_embeds)
        dtype = self.unet.dtype
        cond = prompt_embeds.to(device, dtype).repeat_interleave(num_images_per_prompt, 0)
        pooled = None if pooled_prompt_embeds is None else \
            pooled_prompt_embeds.to(device, dtype).repeat_interleave(num_images_per_prompt, 0)
        n = cond.shape[0]
        shape = (n, self.unet.config.out_channels // patch_size_of(self.unet) ** 2, self.image_size, self.image_size)
        if latents is None:
            latents = torch.randn(shape, generator=generator, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        guided = scale != 1.0
        if guided:
            null, null_pooled = null_embeddings(cond, pooled)
            cond_in = torch.cat([null, cond])
            pooled_in = None if pooled is None else torch.cat([null_pooled, pooled])
        else:
            cond_in, pooled_in = cond, pooled
        scheduler = self.scheduler
        scheduler.set_timesteps(steps, device=device)
        sample = latents.to(device, dtype) * scheduler.init_noise_sigma
        intermediates = []
        for t in scheduler.timesteps:
            model_in = torch.cat([sample, sample]) if guided else sample
            model_in = scheduler.scale_model_input(model_in, t)
            out = predict_noise(self.unet, model_in, t, cond_in, pooled_in)
            if guided:
                uncond, text = out.chunk(2)
                out = uncond + scale * (text - uncond)
            step = scheduler.step(out, t, sample)
            if return_intermediates:
                pred = getattr(step, "pred_original_sample", None)
                if pred is None:
                    pred = self._predict_x0(out, t, sample)
                intermediates.append({"timestep": int(t), "sample": sample.float().cpu(),
                                      "pred_original": pred.float().clamp(-1, 1).cpu()})
            sample = step.prev_sample
        sample = sample.float().clamp(-1, 1).cpu()
        images = sample if output_type == "pt" else [tensor_to_image(x) for x in sample]
        return (images, intermediates) if return_intermediates else images

    def _predict_x0(self, out, t, sample):
        alpha = self.scheduler.alphas_cumprod.to(sample.device)[int(t)]
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return (sample - (1 - alpha).sqrt() * out) / alpha.sqrt()
        if kind == "v_prediction":
            return alpha.sqrt() * sample - (1 - alpha).sqrt() * out
        return out

    def _check_embeds(self, prompt_embeds, pooled):
        want_seq = self.unet.config.cross_attention_dim
        if not torch.is_tensor(prompt_embeds) or prompt_embeds.dim() != 3 or prompt_embeds.shape[-1] != want_seq:
            got = tuple(prompt_embeds.shape) if torch.is_tensor(prompt_embeds) else type(prompt_embeds).__name__
            raise ValueError(f"prompt_embeds must be a tensor [batch, seq_len, {want_seq}], got {got}")
        if self.unet.config.class_embed_type is not None:
            want_pool = self.unet.config.projection_class_embeddings_input_dim
            if pooled is None:
                raise ValueError(f"pooled_prompt_embeds [batch, {want_pool}] is needed with prompt_embeds: this "
                                 "UNet is also conditioned on the pooled caption embedding")
            if not torch.is_tensor(pooled) or tuple(pooled.shape) != (prompt_embeds.shape[0], want_pool):
                got = tuple(pooled.shape) if torch.is_tensor(pooled) else type(pooled).__name__
                raise ValueError(f"pooled_prompt_embeds must be [{prompt_embeds.shape[0]}, {want_pool}], got {got}")
        return prompt_embeds, pooled

    # --- saving and loading --------------------------------------------------------------------

    def save_pretrained(self, folder: str | os.PathLike, include_text_encoder: bool = True,
                        text_encoder_dir: str | None = None, dtype: torch.dtype | None = None) -> Path:
        """Write ``folder``: ``unet/`` (the UNet's own ``save_pretrained``), ``scheduler/``,
        ``text_encoder/`` (the CLIP and its tokenizer, if the pipeline has them) and ``pipeline.json``.
        Everything is written to a temporary folder beside it and then moved into place, so ``folder`` is
        either the old pipeline or the complete new one.

        ``text_encoder_dir`` (a path relative to ``folder``, such as ``"../clip"``) records where an
        already saved text encoder lives instead of copying it (the shipped checkpoints share one CLIP).
        ``dtype=torch.float16`` stores the UNet weights in half precision (half the bytes);
        :meth:`from_pretrained` loads them back as float32."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
        try:
            _save_unet(self.unet if dtype is None else copy.deepcopy(self.unet).to(dtype), tmp)
            self.scheduler.save_pretrained(tmp / SCHEDULER_DIR)
            with_text = include_text_encoder and self.text_encoder is not None and self.tokenizer is not None
            if with_text and text_encoder_dir is None:
                from .encoders import save_clip
                save_clip(self.text_encoder, self.tokenizer, tmp / TEXT_ENCODER_DIR)
            text_dir = (text_encoder_dir or TEXT_ENCODER_DIR) if with_text else None
            meta = {"class": type(self).__name__, "package_version": __version__,
                    "image_size": self.image_size, "text_encoder": text_dir, "defaults": self.defaults}
            if layout_of(self.unet) is not None:
                meta["layout_planner"] = LAYOUT_DIR
            (tmp / PIPELINE_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
            tmp.chmod(0o755)
            _replace_folder(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str = "cpu",
                        load_text_encoder: bool = True) -> "TinyDiffusionPipeline":
        """Load a folder written by :meth:`save_pretrained`; a missing or damaged part is a ``ValueError``
        (``FileNotFoundError`` for a missing folder) naming the folder and the part."""
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"no diffusion pipeline folder at {folder}; train one with train_diffusion "
                                    "(or benchmarks/diffusion.py) or check the path")
        needed = [PIPELINE_FILE, f"{UNET_DIR}/config.json", f"{SCHEDULER_DIR}/scheduler_config.json"]
        missing = [p for p in needed if not (folder / p).is_file()]
        if not missing and not any((folder / UNET_DIR).glob("*.safetensors")) and \
                not any((folder / UNET_DIR).glob("*.bin")):
            missing.append(f"{UNET_DIR}/diffusion_pytorch_model.safetensors")
        if missing:
            raise ValueError(f"{folder} is not a complete diffusion pipeline: missing {', '.join(missing)}. "
                             "Save it again with TinyDiffusionPipeline.save_pretrained")
        try:
            meta = json.loads((folder / PIPELINE_FILE).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{folder / PIPELINE_FILE} is not valid JSON ({error}); save the pipeline again") from error
        unet = _load_part(UNet2DConditionModel, folder, UNET_DIR, "UNet")
        if meta.get("layout_planner"):
            if not (folder / LAYOUT_DIR / "config.json").is_file():
                raise ValueError(f"{folder} is not a complete diffusion pipeline: missing {LAYOUT_DIR}/config.json. "
                                 "Save it again with TinyDiffusionPipeline.save_pretrained")
            unet.layout_planner = _load_part(LayoutPlanner, folder, LAYOUT_DIR, "layout planner").eval()
        try:
            sched_config = json.loads((folder / SCHEDULER_DIR / "scheduler_config.json").read_text())
            sampler = "ddim" if sched_config.get("_class_name") == "DDIMScheduler" else "dpm"
            scheduler = SAMPLERS[sampler].from_config(sched_config)
        except Exception as error:
            raise ValueError(f"cannot load the scheduler from {folder / SCHEDULER_DIR}: {error}") from error
        text_encoder = tokenizer = None
        if load_text_encoder and meta.get("text_encoder"):
            from .encoders import load_clip
            try:
                text_encoder, tokenizer = load_clip(folder / meta["text_encoder"])
            except Exception as error:
                raise ValueError(f"cannot load the text encoder from {folder / meta['text_encoder']}: "
                                 f"{error}") from error
        return cls(unet, scheduler, text_encoder, tokenizer, meta.get("defaults")).to(device)


def _load_part(model_class, folder: Path, part: str, what: str):
    """``model_class.from_pretrained(folder/part)`` in float32; damaged weights are a ``ValueError`` naming them."""
    try:
        return model_class.from_pretrained(folder / part, torch_dtype=torch.float32)
    except Exception as error:  # diffusers raises several types for bad weights and shape mismatches
        raise ValueError(f"cannot load the {what} from {folder / part}: {type(error).__name__}: {error}. "
                         f"The weights do not match {part}/config.json or are damaged; save the pipeline "
                         "again") from error


def _save_unet(unet, folder: Path) -> None:
    """``folder/unet/`` and, if the UNet has a layout planner, ``folder/layout_planner/`` (two ``save_pretrained``
    folders: diffusers would otherwise write the planner's weights into the UNet's file, which can't load them)."""
    layout = layout_of(unet)
    if layout is None:
        unet.save_pretrained(folder / UNET_DIR)
        return
    del unet.layout_planner
    try:
        unet.save_pretrained(folder / UNET_DIR)
    finally:
        unet.layout_planner = layout
    layout.save_pretrained(folder / LAYOUT_DIR)


def _replace_folder(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` to ``target``, replacing an old one (kept aside until the move)."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}-old-", dir=target.parent))
        os.replace(target, old / target.name)
        try:
            os.replace(new, target)
        except BaseException:
            os.replace(old / target.name, target)
            raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffusionRecipe:
    """How the generator is trained and sampled (defaults: the measured recipe, see the benchmark notes)."""

    batch_size: int = 32
    prediction_type: str = "sample"  # the UNet predicts the clean picture x0 (see benchmarks/diffusion_sweep.py)
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    snr_gamma: float | None = None  # Min-SNR-γ loss weighting (None: plain MSE on the target)
    timestep_power: float = 1.0  # t = ⌊T·(1 − u^p)⌋, u uniform: 1 is uniform, > 1 favours the noisy end
    caption_dropout: float = 0.1  # fraction of captions replaced by the null (zero) embeddings
    # fraction of the other captions whose pooled embedding alone is zeroed, so that the cross-attention to the
    # sequence learns to carry the caption too (M³FT's adapter predicts the sequence better than the pooled vector).
    # Tried at 0.5 and dropped: the generator did not learn (benchmarks/DIFFUSION_RECIPE.md)
    pooled_dropout: float = 0.0
    # conditioning augmentation: Gaussian noise added to each pooled embedding, this many times its own RMS, so
    # that the generator tolerates the error of a pooled embedding predicted by the adapter rather than encoded.
    # Tried at 0.5 and dropped: worse pictures, no more tolerance (benchmarks/DIFFUSION_RECIPE.md)
    pooled_noise: float = 0.0
    max_objects: int = 3  # objects per training picture: 1..max_objects
    single_object_steps: int = 500  # curriculum: the first steps use one-object pictures only
    cross_attention_levels: int = 2  # UNet: the coarsest levels that attend to the caption
    coordinate_channels: bool = True  # UNet: row and column input channels (where each pixel is)
    patch_size: int = 2  # UNet: works on patch_size × patch_size patches of pixels stacked as channels
    scale_shift: bool = True  # UNet: timestep + pooled caption scale and shift the features (FiLM), not just shift
    pooled_conditioning: bool = True  # UNet: reads the pooled caption embedding (False: cross-attention alone)
    attention_layers: int = 1  # UNet: transformer blocks at each level that attends to the caption
    # UNet: reads a layout planner's map of the caption (m2chat_lite.layout) as extra input channels; the planner
    # is trained first and given to train_diffusion. The foundation recipe turns it on (benchmarks/DIFFUSION_RECIPE.md)
    layout_planner: bool = False
    sampler: str = "dpm"
    num_inference_steps: int = 20
    guidance_scale: float = 3.0
    data_seed: int = 0

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {self.batch_size!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0.0 <= self.pooled_dropout < 1.0:
            raise ValueError(f"pooled_dropout must be in [0, 1), got {self.pooled_dropout}")
        if not 0.0 <= self.pooled_noise:
            raise ValueError(f"pooled_noise must be >= 0, got {self.pooled_noise}")
        if not 1 <= self.max_objects <= 3:
            raise ValueError(f"max_objects must be 1, 2 or 3, got {self.max_objects}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {self.prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; valid: {', '.join(SAMPLERS)}")
        if not self.timestep_power > 0:
            raise ValueError(f"timestep_power must be positive, got {self.timestep_power}")

    @classmethod
    def from_dict(cls, data: dict) -> "DiffusionRecipe":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown recipe field(s) {unknown}; valid: {', '.join(sorted(known))}")
        return cls(**data)


def unet_kwargs(recipe: DiffusionRecipe) -> dict:
    """The :func:`build_unet` arguments that ``recipe`` decides (its architecture settings)."""
    return {"cross_attention_levels": recipe.cross_attention_levels, "coordinate_channels": recipe.coordinate_channels,
            "patch_size": recipe.patch_size, "scale_shift": recipe.scale_shift,
            "pooled_conditioning": recipe.pooled_conditioning, "attention_layers": recipe.attention_layers,
            "layout_channels": layout_channels() if recipe.layout_planner else 0}


def reference_pipeline_dir(preset: str = "tiny") -> Path:
    """Where the reference generator of ``preset`` ships: ``data/checkpoints/<preset>/diffusion``."""
    return DATA_DIR / "checkpoints" / preset / "diffusion"


def batch_seed(step: int, data_seed: int = 0) -> int:
    """The ``caption_pairs`` seed of training step ``step``: distinct per step, never the benchmark's
    (:func:`m2chat_lite.benchmark.training_seed`)."""
    return training_seed(step, data_seed)


class CaptionEmbeddingBatches:
    """``make_batch(step)`` for the training loop: a deterministic function of the step.

    Renders ``batch_size`` training-split caption pairs from :func:`batch_seed`, encodes the captions with
    the frozen text encoder (caching each caption's embeddings: one-object captions repeat a lot),
    zeroes a ``caption_dropout`` fraction of them (and the pooled embedding alone of a ``pooled_dropout``
    fraction of the rest, and adds ``pooled_noise`` to the pooled embeddings), and draws the noise and
    timesteps from a generator seeded by the step, so a resumed run sees exactly the batches of an
    uninterrupted one.
    """

    def __init__(self, text_encoder, tokenizer, recipe: DiffusionRecipe, image_size: int,
                 device: str = "cpu", cache_size: int = 20_000):
        self.text_encoder, self.tokenizer, self.recipe = text_encoder, tokenizer, recipe
        self.image_size, self.device, self.cache_size = image_size, device, cache_size
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def embed(self, captions: list[str]):
        todo = list(dict.fromkeys(c for c in captions if c not in self.cache))
        if todo:
            seq, pooled = encode_prompts(self.text_encoder, self.tokenizer, todo, device=self.device)
            for c, s, p in zip(todo, seq.cpu(), pooled.cpu()):
                if len(self.cache) < self.cache_size:
                    self.cache[c] = (s, p)
            fresh = {c: (s, p) for c, s, p in zip(todo, seq.cpu(), pooled.cpu())}
        else:
            fresh = {}
        rows = [self.cache.get(c) or fresh[c] for c in captions]
        return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])

    def __call__(self, step: int) -> dict:
        r = self.recipe
        max_objects = 1 if step < r.single_object_steps else r.max_objects
        pairs = caption_pairs(r.batch_size, seed=batch_seed(step, r.data_seed), split="train",
                              max_objects=max_objects)
        images = torch.stack([image_to_tensor(render(p.scene, self.image_size)) for p in pairs])
        seq, pooled = self.embed([p.caption for p in pairs])
        g = torch.Generator().manual_seed(batch_seed(step, r.data_seed))
        keep = (torch.rand(r.batch_size, generator=g) >= r.caption_dropout).float()
        seq, pooled = seq * keep[:, None, None], pooled * keep[:, None]
        # the pooled embedding's own generator, so that the noise and timesteps below stay those of the plain recipe
        g_pooled = torch.Generator().manual_seed(batch_seed(step, r.data_seed) + 1)
        if r.pooled_dropout:
            pooled = pooled * (torch.rand(r.batch_size, generator=g_pooled) >= r.pooled_dropout).float()[:, None]
        if r.pooled_noise:  # a zeroed (dropped) embedding stays zero
            rms = pooled.pow(2).mean(-1, keepdim=True).sqrt()
            pooled = pooled + r.pooled_noise * rms * torch.randn(pooled.shape, generator=g_pooled)
        noise = torch.randn(images.shape, generator=g)
        u = torch.rand(r.batch_size, generator=g)
        timesteps = ((1 - u ** r.timestep_power) * r.num_train_timesteps).long().clamp(0, r.num_train_timesteps - 1)
        to = lambda x: x.to(self.device)  # noqa: E731
        return {"images": to(images), "prompt_embeds": to(seq), "pooled": to(pooled), "noise": to(noise),
                "timesteps": to(timesteps)}


def train_diffusion(config: M2ChatConfig, clip, tokenizer, train_config: TrainConfig,
                    out_dir: str | os.PathLike | None = None, device: str = "cpu",
                    recipe: DiffusionRecipe | None = None, unet: UNet2DConditionModel | None = None,
                    progress: bool = True, planner: LayoutPlanner | None = None,
                    ) -> tuple[TinyDiffusionPipeline, TrainResult]:
    """Train the generator on ShapeWorld caption pairs with the frozen text encoder ``clip``.

    Builds the UNet from ``config`` (or continues training ``unet``), trains it with the shared loop
    (``train_config``: budget, learning rate, EMA), and returns ``(pipeline, result)``. With ``out_dir``,
    the loop checkpoints to and resumes from ``out_dir/trainer_state.pt``, and the finished pipeline is
    saved to ``out_dir/pipeline``. A recipe with ``layout_planner`` needs ``planner`` (trained on ``clip`` by
    :func:`m2chat_lite.layout.train_planner`), which stays frozen (or a ``unet`` that already has one).
    """
    recipe = recipe or DiffusionRecipe()
    torch.manual_seed(train_config.seed)
    if unet is None:
        unet = build_unet(config, **unet_kwargs(recipe))
    if planner is not None:
        unet.layout_planner = planner.eval().requires_grad_(False)
    wanted = unet_kwargs(recipe)["layout_channels"]
    if wanted and layout_of(unet) is None:
        raise ValueError("this recipe's UNet reads a layout planner's map (layout_planner=True): train one with "
                         "m2chat_lite.layout.train_planner on the same text encoder and pass planner=")
    if layout_of(unet) is not None and layout_of(unet).channels != wanted:
        raise ValueError("a layout planner was given, but the recipe's UNet has no input for its map; use "
                         "DiffusionRecipe(layout_planner=True)")
    unet.to(device)
    clip = clip.to(device).eval().requires_grad_(False)
    scheduler, sampler = build_schedulers(recipe.prediction_type, recipe.beta_schedule,
                                          recipe.num_train_timesteps, recipe.sampler)
    make_batch = CaptionEmbeddingBatches(clip, tokenizer, recipe, config.image_size, device)

    def loss_fn(batch: dict) -> torch.Tensor:
        loss = diffusion_loss(unet, scheduler, batch["images"], batch["prompt_embeds"], batch["pooled"],
                              noise=batch["noise"], timesteps=batch["timesteps"], snr_gamma=recipe.snr_gamma)
        return loss

    result = train(unet, loss_fn, make_batch, train_config, out_dir=out_dir, device=device, progress=progress,
                   description="diffusion")
    defaults = {"num_inference_steps": recipe.num_inference_steps, "guidance_scale": recipe.guidance_scale,
                "recipe": asdict(recipe)}
    pipeline = TinyDiffusionPipeline(unet, sampler, clip, tokenizer, defaults)
    if out_dir is not None:
        pipeline.save_pretrained(Path(out_dir) / "pipeline")
    return pipeline, result


# ---------------------------------------------------------------------------------------------
# Evaluation with the oracle
# ---------------------------------------------------------------------------------------------

GROUPS = {1: "1 object", 2: "2 objects", 3: "3 objects"}
SCORE_KEYS = ("exact", "position", "shape", "color", "size", "count")


def _noise(size: int, seed: int, index: int) -> torch.Tensor:
    """The starting noise of picture ``index`` of a run seeded ``seed`` (the same whatever the batching)."""
    return torch.randn(3, size, size, generator=torch.Generator().manual_seed(seed * 1_000_003 + index))


def generate_for_prompts(pipeline: TinyDiffusionPipeline, prompts: Sequence[str], seed: int = 0,
                         batch_size: int = 50, progress: str | None = None, **kwargs) -> list[PIL.Image.Image]:
    """One picture per prompt; prompt ``i`` always starts from the same noise (seed ``seed``, index ``i``),
    whatever the batch size. ``progress``: a progress bar over the batches, with that description."""
    images = []
    size = pipeline.image_size
    for start in tqdm(range(0, len(prompts), batch_size), desc=progress, disable=progress is None):
        chunk = list(prompts[start:start + batch_size])
        latents = torch.stack([_noise(size, seed, start + i) for i in range(len(chunk))])
        images += pipeline(prompt=chunk, latents=latents, **kwargs)
    return images


def generate_for_embeds(pipeline: TinyDiffusionPipeline, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
                        seed: int = 0, batch_size: int = 50, **kwargs) -> list[PIL.Image.Image]:
    """Like :func:`generate_for_prompts` for precomputed embeddings (the M³Adapter's): picture ``i`` starts
    from the same noise as prompt ``i`` there, so the two can be compared picture by picture."""
    images = []
    size = pipeline.image_size
    for start in range(0, len(prompt_embeds), batch_size):
        end = min(start + batch_size, len(prompt_embeds))
        latents = torch.stack([_noise(size, seed, i) for i in range(start, end)])
        images += pipeline(prompt_embeds=prompt_embeds[start:end], pooled_prompt_embeds=pooled[start:end],
                           latents=latents, **kwargs)
    return images


def evaluate_generator(pipeline: TinyDiffusionPipeline, samples, seed: int = 0, batch_size: int = 50,
                       return_images: bool = False, **kwargs) -> dict:
    """Oracle scores of the pictures ``pipeline`` draws for benchmark caption samples.

    Each sample's prompt is ``meta["caption"]`` and its target the ground-truth scene. Returns
    ``{split: {group: scores}}`` for each benchmark split present (``test``, ``heldout``) and ``all``,
    with groups ``"1 object"``, ``"2 objects"``, ``"3 objects"`` and ``"all"``; ``scores`` holds ``n`` and the
    mean of each oracle score (``exact``: every attribute of every object right; ``position``, ``shape``,
    ``color``, ``size``: per object; ``count``). Also ``seconds_per_image``. ``kwargs`` go to the pipeline
    (``num_inference_steps``, ``guidance_scale``).
    """
    samples = check_caption_samples(samples)
    start = time.perf_counter()
    images = generate_for_prompts(pipeline, [s.meta["caption"] for s in samples], seed=seed,
                                  batch_size=batch_size, **kwargs)
    return score_pictures(samples, images, time.perf_counter() - start, return_images)


def check_caption_samples(samples) -> list:
    """``samples`` as a list, refusing an empty one or any sample that is not a benchmark caption pair."""
    samples = list(samples)
    if not samples:
        raise ValueError("evaluation needs at least one caption sample")
    bad = [s.id for s in samples if s.task != "caption" or "caption" not in s.meta]
    if bad:
        raise ValueError(f"the generator is scored on caption samples (load_benchmark('caption')); not: {bad[:3]}")
    return samples


def score_pictures(samples, images, seconds: float | None = None, return_images: bool = False) -> dict:
    """Oracle scores of ``images`` against the scenes of caption ``samples`` (see :func:`evaluate_generator`)."""
    rows = []
    for sample, image in zip(samples, images):
        target = scenes_of(sample)[0]
        rows.append((sample.meta.get("split", "test"), len(target), score(image, target)))
    results: dict = {}
    for split in sorted({r[0] for r in rows}) + ["all"]:
        in_split = [r for r in rows if split == "all" or r[0] == split]
        groups = {}
        for n, name in GROUPS.items():
            chosen = [r[2] for r in in_split if r[1] == n]
            if chosen:
                groups[name] = _mean_scores(chosen)
        groups["all"] = _mean_scores([r[2] for r in in_split])
        results[split] = groups
    if seconds is not None:
        results["seconds_per_image"] = seconds / len(samples)
    if return_images:
        results["images"] = images
    return results


def _mean_scores(scores: list[dict]) -> dict:
    out = {"n": len(scores)}
    for key in SCORE_KEYS:
        out[key] = sum(s[key] for s in scores) / len(scores)
    return out


def format_scores(results: dict) -> str:
    """A small text table of :func:`evaluate_generator`'s results."""
    lines = [f"{'split':<8} {'group':<10} {'n':>4} " + " ".join(f"{k:>8}" for k in SCORE_KEYS)]
    for split, groups in results.items():
        if not isinstance(groups, dict) or split == "images":
            continue
        for group, s in groups.items():
            lines.append(f"{split:<8} {group:<10} {s['n']:>4} " + " ".join(f"{s[k]:>8.1%}" for k in SCORE_KEYS))
    if "seconds_per_image" in results:
        lines.append(f"sampling: {results['seconds_per_image']:.3f} s per picture")
    return "\n".join(lines)
