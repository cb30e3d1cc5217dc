"""Tiny CLIP: a ViT image encoder and a text encoder, trained contrastively on ShapeWorld captions.

Taught in notebook ``02_tiny_clip``. Both encoders are ``transformers`` CLIP classes built from tiny
configs, so the same code later loads a real CLIP or SigLIP checkpoint. Their jobs in M²Chat:

- the **vision encoder** gives patch features (low-level: the M³Adapter's visual branch, notebook 06)
  and a pooled embedding (what the LM sees through the projector, notebook 05);
- the **text encoder** is the diffusion generator's conditioning encoder (notebook 04) and the
  alignment teacher of M³FT stage 1 (notebook 07): a sequence of hidden states ``[B, L, d]`` (like
  Stable Diffusion's ``prompt_embeds``) and a pooled embedding ``[B, d]``.

Training pulls each picture's embedding towards its caption's and away from the other captions in the
batch (the symmetric InfoNCE loss of CLIP, written out in ``contrastive_loss``).
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel

from .checkpoints import load_pretrained, quiet, save_folder
from .config import M2ChatConfig
from .data import image_to_tensor
from .training import TrainConfig, TrainResult, train
from .world import caption, caption_pairs, parse_caption, render
from .world.scene import GRID, HELD_OUT, SHAPES, Scene


def build_clip(config: M2ChatConfig, tokenizer) -> CLIPModel:
    """A tiny CLIP from ``config`` (random weights): ViT over ``image_size`` pictures, text up to ``cond_seq_len``."""
    text = dict(vocab_size=len(tokenizer), hidden_size=config.text_encoder_hidden_size,
                intermediate_size=4 * config.text_encoder_hidden_size,
                num_hidden_layers=config.text_encoder_num_layers,
                num_attention_heads=config.text_encoder_num_heads,
                max_position_embeddings=config.cond_seq_len, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(hidden_size=config.vision_hidden_size, intermediate_size=4 * config.vision_hidden_size,
                  num_hidden_layers=config.vision_num_layers, num_attention_heads=config.vision_num_heads,
                  image_size=config.image_size, patch_size=config.vision_patch_size, num_channels=3)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=config.pooled_dim))


def tokenize_captions(tokenizer, captions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``<|begin|> caption <|end|>`` padded to ``max_length`` (truncated, keeping the end token, if longer).

    Special-token strings typed in a caption stay plain text (``split_special_tokens``).
    """
    if isinstance(captions, str):
        captions = [captions]
    ids = torch.full((len(captions), max_length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, text in enumerate(captions):
        body = tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"][: max_length - 2]
        row = [tokenizer.bos_token_id, *body, tokenizer.eos_token_id]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def encode_text(clip: CLIPModel, tokenizer, captions: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden [B, L, d], pooled [B, p])``: the text encoder's last hidden states (padded to the model's
    length) and the projected embedding at the end token, the generator's ``prompt_embeds`` and pooled.
    ``clip`` may also be Stable Diffusion's ``CLIPTextModel`` with its ``CLIPTokenizer`` (the ``hf-small``
    teacher): then ``pooled`` is its pooler output, as SD pipelines compute it.

    The encoder runs where its weights are; ``device``, if given, is where the two tensors are returned
    (notebook 04 encodes on a GPU for an untrained UNet it keeps on the CPU)."""
    on = clip.device
    if not hasattr(clip, "text_projection"):  # Stable Diffusion's CLIPTextModel (hf-small): no projection
        tokens = tokenizer(list(captions), padding="max_length", max_length=clip.config.max_position_embeddings,
                           truncation=True, return_tensors="pt")
        out = clip(input_ids=tokens.input_ids.to(on))  # SD encodes prompts without an attention mask
        hidden, pooled = out.last_hidden_state, out.pooler_output
    else:
        ids, mask = tokenize_captions(tokenizer, captions, clip.config.text_config.max_position_embeddings)
        ids, mask = ids.to(on), mask.to(on)
        hidden = clip.text_model(input_ids=ids, attention_mask=mask).last_hidden_state
        end = hidden[torch.arange(len(ids), device=on), mask.sum(1) - 1]  # the <|end|> token's state
        pooled = clip.text_projection(end)
    return (hidden, pooled) if device is None else (hidden.to(device), pooled.to(device))


def encode_images(clip: CLIPModel, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(patch_features [B, 1 + patches, d], pooled [B, p])`` for pictures in [-1, 1]."""
    out = clip.vision_model(pixel_values=pixel_values.to(clip.device))
    return out.last_hidden_state, clip.visual_projection(out.pooler_output)


def contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's symmetric cross-entropy: picture i should pick caption i among the batch, and vice versa."""
    image_embeds = F.normalize(image_embeds, dim=-1)
    text_embeds = F.normalize(text_embeds, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * image_embeds @ text_embeds.T
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2


def moved_scene(scene: Scene, rng: random.Random) -> Scene:
    """The same objects (shape, colour, size) in other cells: a *hard negative* for ``scene``."""
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    while True:
        chosen = rng.sample(cells, len(scene))
        other = Scene(tuple(o.moved(r, c) for o, (r, c) in zip(scene, chosen)))
        if other != scene:
            return other


def reshaped_scene(scene: Scene, rng: random.Random) -> Scene:
    """The same scene with one object's shape changed (never into a held-out colour–shape pair)."""
    objects = list(scene)
    i = rng.randrange(len(objects))
    choices = [s for s in SHAPES if s != objects[i].shape and (objects[i].color, s) not in HELD_OUT]
    objects[i] = replace(objects[i], shape=rng.choice(choices))
    return Scene(tuple(objects))


def caption_batch(batch_size: int, seed: int, image_size: int, moved_fraction: float = 0.0,
                  reshaped_fraction: float = 0.0) -> tuple[torch.Tensor, list[str]]:
    """A training batch of ShapeWorld caption pairs (train split): pictures in [-1, 1] and captions.

    With ``moved_fraction`` > 0, that fraction of the batch are **hard negatives**: copies of other pairs
    of the batch with the same objects moved to other cells (and captioned afresh). Random pairs rarely
    differ only in where things are, so without them the contrastive loss barely needs position, and
    the text encoder learns to all but ignore "at the top left" (cosine 0.99 to "at the top right"),
    which leaves the diffusion generator (notebook 04), conditioned on it, unable to place objects.
    ``reshaped_fraction`` adds hard negatives of shape the same way (one object's shape changed).
    """
    if not (0.0 <= moved_fraction and 0.0 <= reshaped_fraction and moved_fraction + reshaped_fraction <= 0.5):
        raise ValueError(f"moved_fraction and reshaped_fraction must be >= 0 and add up to at most 0.5, got "
                         f"{moved_fraction} and {reshaped_fraction}")
    n_moved, n_reshaped = int(batch_size * moved_fraction), int(batch_size * reshaped_fraction)
    pairs = caption_pairs(batch_size - n_moved - n_reshaped, seed=seed, split="train")
    rng = random.Random(f"moved-{seed}")
    scenes = [p.scene for p in pairs] + [moved_scene(p.scene, rng) for p in pairs[:n_moved]]
    scenes += [reshaped_scene(p.scene, rng) for p in pairs[n_moved:n_moved + n_reshaped]]
    captions = [p.caption for p in pairs] + [caption(s, rng) for s in scenes[len(pairs):]]
    pictures = torch.stack([image_to_tensor(render(s, image_size)) for s in scenes])
    return pictures, captions


def train_clip(config: M2ChatConfig, tokenizer, train_config: TrainConfig, batch_size: int = 128,
               out_dir=None, device: str = "cpu", progress: bool = True,
               moved_fraction: float = 0.0, reshaped_fraction: float = 0.0) -> tuple[CLIPModel, TrainResult]:
    """Train a tiny CLIP from scratch on freshly generated caption pairs (a new batch every step);
    ``moved_fraction`` and ``reshaped_fraction`` of each batch are hard negatives (see :func:`caption_batch`)."""
    torch.manual_seed(train_config.seed)
    clip = build_clip(config, tokenizer).to(device)

    def loss_fn(batch):
        pictures, captions = batch
        _, image_embeds = encode_images(clip, pictures)
        _, text_embeds = encode_text(clip, tokenizer, captions, device)
        return contrastive_loss(image_embeds, text_embeds, clip.logit_scale)

    def make_batch(step):
        return caption_batch(batch_size, seed=train_config.seed * 10_000_000 + step, image_size=config.image_size,
                             moved_fraction=moved_fraction, reshaped_fraction=reshaped_fraction)

    result = train(clip, loss_fn, make_batch, train_config, out_dir=out_dir, device=device, progress=progress,
                   description="tiny CLIP")
    return clip, result


# --- measuring it ----------------------------------------------------------------------------------

@torch.no_grad()
def similarity(clip: CLIPModel, tokenizer, pictures: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Cosine similarity of every picture with every caption: ``[n_pictures, n_captions]``."""
    clip.eval()
    _, image_embeds = encode_images(clip, pictures)
    _, text_embeds = encode_text(clip, tokenizer, captions)
    return F.normalize(image_embeds, dim=-1) @ F.normalize(text_embeds, dim=-1).T


def clip_score(clip: CLIPModel, tokenizer, pictures: torch.Tensor, captions: list[str]) -> float:
    """The CLIP score: 100 × the mean cosine similarity of each picture with its own caption (floored at 0),
    as in Hessel et al. 2021 and torchmetrics. Higher means pictures match their captions better."""
    cosine = similarity(clip, tokenizer, pictures, captions).diagonal()
    return float(100 * cosine.clamp(min=0).mean())


@torch.no_grad()
def retrieval_accuracy(clip: CLIPModel, tokenizer, pictures: torch.Tensor, captions: list[str],
                       n_candidates: int = 100, seed: int = 0) -> dict[str, float]:
    """Top-1 retrieval among ``n_candidates``: for each picture, its caption plus ``n_candidates - 1``
    others drawn at random; right when the best-scoring caption describes the picture's scene (two
    phrasings of one scene are equally right). Likewise text→image. Returns both accuracies."""
    sims = similarity(clip, tokenizer, pictures, captions)
    scenes = [parse_caption(c) for c in captions]
    rng = random.Random(seed)
    n = len(captions)
    if n < n_candidates:
        raise ValueError(f"need at least {n_candidates} pairs for retrieval among {n_candidates}, got {n}")
    hits = {"image_to_text": 0, "text_to_image": 0}
    for i in range(n):
        others = rng.sample([j for j in range(n) if j != i], n_candidates - 1)
        candidates = [i] + others
        best_text = candidates[int(sims[i, candidates].argmax())]
        best_image = candidates[int(sims[candidates, i].argmax())]
        hits["image_to_text"] += scenes[best_text] == scenes[i]
        hits["text_to_image"] += scenes[best_image] == scenes[i]
    return {k: v / n for k, v in hits.items()}


# --- saving and loading ----------------------------------------------------------------------------

def save_clip(clip: CLIPModel, tokenizer, folder) -> Path:
    """Write the model and its tokenizer to ``folder`` (config + safetensors), all or nothing."""
    def write(tmp: Path) -> None:
        with quiet():
            clip.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return save_folder(folder, write)


def load_clip(folder, device: str = "cpu") -> tuple[CLIPModel, object]:
    """Load a folder written by ``save_clip`` (or any local CLIP folder with a tokenizer)."""
    from .tokenizer import load_tokenizer

    clip = load_pretrained(CLIPModel, folder, "tiny CLIP",
                           "train one with `m2chat-lite train --preset tiny --stage clip`")
    return clip.to(device), load_tokenizer(folder)
