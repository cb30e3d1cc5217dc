"""One configuration object for the whole pipeline, with named presets.

Taught in notebook ``00_welcome`` (the ``tiny`` preset) and notebook ``11_scaling_up`` (the
``hf-small`` preset). A preset only chooses sizes and where weights come from; the same classes
serve both.

    cfg = get_config("tiny")                       # every model small, trained by this package
    cfg = get_config("tiny", image_size=16)        # a preset with overrides
    cfg = get_config("hf-small")                   # pretrained Hugging Face checkpoints, one GPU
    cfg.save("runs/tiny/config.json"); M2ChatConfig.load("runs/tiny/config.json")

For presets that load checkpoints (``lm_id`` and friends set), architecture fields marked
"from the checkpoint" are ``None``: the sizes are read from the loaded model, so swapping a
checkpoint never leaves the config disagreeing with the weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any

from .utils import atomic_write_json


@dataclass(frozen=True)
class M2ChatConfig:
    """Sizes, checkpoint ids and training defaults of an M²Chat build. Defaults are the tiny preset.

    Frozen so a preset can't be changed by accident; use :meth:`replace` or
    ``get_config(name, **overrides)`` to make a variant.
    """

    name: str = "tiny"  # preset name, kept so a saved config says where it came from

    # --- images and the [IMG] trigger -------------------------------------------------------
    image_size: int = 32  # side of the square images the generator makes and the encoder reads
    num_image_tokens: int = 4  # K: the LM emits [IMG0]..[IMG{K-1}] where an image belongs
    max_seq_len: int = 256  # longest token sequence (prompt + reply, several frames) the LM sees

    # --- language model (None = from the checkpoint) ----------------------------------------
    vocab_size: int | None = 512  # size of the tiny BPE tokenizer's vocabulary, special tokens included
    lm_hidden_size: int | None = 128
    lm_num_layers: int | None = 4
    lm_num_heads: int | None = 4

    # --- vision encoder: a small ViT (None = from the checkpoint) ---------------------------
    vision_patch_size: int | None = 4  # 32x32 images -> 8x8 = 64 patches
    vision_hidden_size: int | None = 128
    vision_num_layers: int | None = 4
    vision_num_heads: int | None = 4

    # --- text encoder of the generator, also the alignment teacher (None = from checkpoint) -
    text_encoder_hidden_size: int | None = 128
    text_encoder_num_layers: int | None = 2
    text_encoder_num_heads: int | None = 4

    # --- diffusion UNet (None = from the checkpoint) -----------------------------------------
    unet_block_channels: tuple[int, ...] | None = (64, 128, 128)  # channels per UNet resolution level (16, 8, 4 px: 2x2 patches)

    # --- conditioning interface between the M³Adapter and the generator ----------------------
    # length of the generator's prompt_embeds (77 in SD); 40 fits every ShapeWorld caption (<= 33 tokens)
    cond_seq_len: int = 40
    cond_dim: int = 128  # width of each prompt_embeds vector (768 for SD 1.x's CLIP ViT-L/14)
    pooled_dim: int = 128  # width of the pooled caption embedding used by the alignment loss

    # --- M³Adapter ---------------------------------------------------------------------------
    adapter_num_queries: int = 40  # N learnable queries; one per conditioning position
    adapter_num_layers: int = 2  # cross-attention blocks per branch
    adapter_num_heads: int = 4

    # --- pretrained checkpoints (None = trained from scratch by this package) ---------------
    lm_id: str | None = None  # causal LM, e.g. "HuggingFaceTB/SmolLM2-135M-Instruct"
    vision_id: str | None = None  # vision tower, e.g. "google/siglip-base-patch16-224"
    generator_id: str | None = None  # diffusers pipeline, e.g. "nota-ai/bk-sdm-tiny"

    # --- training defaults -------------------------------------------------------------------
    seed: int = 0
    learning_rate: float = 3e-4
    batch_size: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.unet_block_channels, list):
            # JSON and notebooks hand us lists; keep the frozen config hashable and comparable.
            object.__setattr__(self, "unet_block_channels", tuple(self.unet_block_channels))
        self.validate()

    # ------------------------------------------------------------------------------------------

    @property
    def uses_pretrained(self) -> bool:
        """True when any component is loaded from a checkpoint instead of trained from scratch."""
        return any(value is not None for value in (self.lm_id, self.vision_id, self.generator_id))

    def validate(self) -> None:
        """Raise ``ValueError`` naming each bad field and the fix if the values can't work together."""
        problems = self._type_problems()
        if not problems:  # consistency checks need well-typed values
            problems = self._consistency_problems()
        if problems:
            raise ValueError(f"invalid M2ChatConfig {self.name!r}: " + "; ".join(problems))

    def _type_problems(self) -> list[str]:
        problems: list[str] = []
        for field in dataclasses.fields(self):
            key, value = field.name, getattr(self, field.name)
            if value is None and "None" in str(field.type):
                continue  # optional: None means "from the checkpoint" or "trained by this package"
            if key == "name":
                ok, expected = isinstance(value, str) and bool(value), "a non-empty string"
            elif key.endswith("_id"):
                ok, expected = isinstance(value, str) and bool(value), "a hub id, a local folder or None"
            elif key == "learning_rate":
                ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
                expected = "a positive number"
            elif key == "seed":
                ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
                expected = "a non-negative int"
            elif key == "unet_block_channels":
                ok = isinstance(value, tuple) and bool(value) and all(map(_is_positive_int, value))
                expected = "a non-empty tuple of positive ints"
            else:
                ok, expected = _is_positive_int(value), "a positive int"
            if not ok:
                problems.append(f"{key} must be {expected}, got {value!r}")
        return problems

    def _consistency_problems(self) -> list[str]:
        problems: list[str] = []
        if self.adapter_num_queries != self.cond_seq_len:
            problems.append(
                f"adapter_num_queries ({self.adapter_num_queries}) must equal cond_seq_len "
                f"({self.cond_seq_len}): each adapter query becomes one position of the "
                "generator's prompt_embeds; override both together"
            )
        te_hidden = self.text_encoder_hidden_size
        if te_hidden is not None and te_hidden != self.cond_dim:
            problems.append(
                f"text_encoder_hidden_size ({te_hidden}) must equal cond_dim ({self.cond_dim}): the "
                "generator is conditioned on the text encoder's output; override both together"
            )
        for prefix in ("lm", "vision", "text_encoder", "adapter"):
            width_field = "cond_dim" if prefix == "adapter" else f"{prefix}_hidden_size"
            width, heads = getattr(self, width_field), getattr(self, f"{prefix}_num_heads")
            if width is not None and heads is not None and width % heads:
                problems.append(
                    f"{width_field} ({width}) must be divisible by {prefix}_num_heads ({heads})"
                )
        patch = self.vision_patch_size
        if patch is not None and self.vision_id is None and self.image_size % patch:
            problems.append(
                f"image_size ({self.image_size}) must be divisible by vision_patch_size ({patch})"
            )
        return problems

    def replace(self, **changes: Any) -> "M2ChatConfig":
        """A copy with some fields changed; unknown field names raise ``ValueError``."""
        _check_field_names(changes, what="override")
        return dataclasses.replace(self, **changes)

    # --- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples become lists)."""
        out = dataclasses.asdict(self)
        if out["unet_block_channels"] is not None:
            out["unet_block_channels"] = list(out["unet_block_channels"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "M2ChatConfig":
        """Inverse of :meth:`to_dict`. Missing fields take the dataclass (tiny) defaults."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a dict of config fields, got {type(data).__name__}")
        _check_field_names(data, what="config field")
        return cls(**data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON, atomically (next to a checkpoint, say)."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "M2ChatConfig":
        """Read a config written by :meth:`save`."""
        with open(path, encoding="utf-8") as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{os.fspath(path)!r} is not valid JSON ({error}); "
                    "expected a file written by M2ChatConfig.save"
                ) from error
        return cls.from_dict(data)


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _field_names() -> list[str]:
    return [field.name for field in dataclasses.fields(M2ChatConfig)]


def _check_field_names(names: Any, what: str) -> None:
    unknown = sorted(set(names) - set(_field_names()))
    if unknown:
        raise ValueError(
            f"unknown {what}(s) {', '.join(map(repr, unknown))}. "
            f"Valid fields: {', '.join(_field_names())}"
        )


PRESETS: dict[str, M2ChatConfig] = {
    # Every model small and trained from scratch on ShapeWorld; any CPU, offline, minutes.
    "tiny": M2ChatConfig(),
    # Pretrained checkpoints on one CUDA GPU (a Colab T4 is enough). Model sizes come from the
    # checkpoints; the conditioning interface is bk-sdm-tiny's CLIP ViT-L/14 text encoder (77 x 768).
    # 256 px instead of bk-sdm-tiny's native 512 px keeps a T4 fast (32x32 latents).
    "hf-small": M2ChatConfig(
        name="hf-small",
        image_size=256,
        num_image_tokens=8,
        max_seq_len=1024,
        vocab_size=None,
        lm_hidden_size=None,
        lm_num_layers=None,
        lm_num_heads=None,
        vision_patch_size=None,
        vision_hidden_size=None,
        vision_num_layers=None,
        vision_num_heads=None,
        text_encoder_hidden_size=None,
        text_encoder_num_layers=None,
        text_encoder_num_heads=None,
        unet_block_channels=None,
        cond_seq_len=77,
        cond_dim=768,
        pooled_dim=768,
        adapter_num_queries=77,
        adapter_num_layers=2,
        adapter_num_heads=8,
        lm_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        vision_id="google/siglip-base-patch16-224",
        generator_id="nota-ai/bk-sdm-tiny",
        learning_rate=1e-4,
        batch_size=4,
    ),
}


def get_config(name: str = "tiny", /, **overrides: Any) -> M2ChatConfig:
    """The preset called ``name``, with ``overrides`` applied (``get_config("tiny", seed=1)``)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
