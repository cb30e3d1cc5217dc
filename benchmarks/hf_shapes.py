"""Random checkpoints with the real architectures of the ``hf-small`` preset, for speed and memory runs offline.

    python benchmarks/hf_shapes.py OUT_DIR [--dtype float16|float32] [--seed 0] [--activations BATCH]

Writes, from configs alone (nothing is downloaded), three folders that ``hf.build_system`` loads exactly as
it loads the hub checkpoints of the preset:

- ``OUT_DIR/lm``: a Llama with the config of ``HuggingFaceTB/SmolLM2-135M-Instruct`` (hidden 576, 30 layers,
  9 heads, 3 key/value heads, MLP 1536, vocabulary 49,152, tied embeddings: 134.5M parameters) and a
  byte-level BPE tokenizer with SmolLM2's special tokens and ChatML template (default system prompt
  included). The tokenizer is small (trained on ShapeWorld text, so ShapeWorld sentences take about as
  many tokens as with SmolLM2's own), but the embedding matrix has the real 49,152 rows;
- ``OUT_DIR/vision``: a SigLIP vision model with the config of ``google/siglip-base-patch16-224`` (hidden
  768, 12 layers, 12 heads, MLP 3072, 224 px, 16 px patches: 92.9M parameters);
- ``OUT_DIR/generator``: a Stable Diffusion folder with the parts of ``nota-ai/bk-sdm-tiny``: its UNet
  (SD-1.x blocks 320/640/1280, one layer per block, no mid-block, the fourth stage removed: 323.4M), SD-1.x's
  VAE (83.7M), CLIP ViT-L/14's text encoder (123.1M; vocabulary 49,408, 77 positions) with a byte-level
  CLIP tokenizer, and SD-1.x's PNDM scheduler config.

**The weights are random**: the models write nonsense and draw noise. Only the speed and the memory of
what runs on them mean anything (they are the real preset's, up to the LM tokenizer's sequence lengths:
ShapeWorld text tokenises about as long with this BPE as with SmolLM2's). ``benchmarks/speed.py --system
hf-shapes`` uses them; ``benchmarks/gpu.sh`` runs it on a lent GPU.

Importable: ``save(folder)`` writes the folders and returns ``get_config("hf-small", lm_id=..., vision_id=...,
generator_id=..., image_size=256)``; ``parameter_counts()`` gives each part's size without building it
(on PyTorch's meta device); ``saved_for_backward`` measures the activations a training step keeps, and
``--activations BATCH`` measures them for both M³FT stages on the CPU (in float32, and with the GPU's
half-precision parts and autocast imitated in bfloat16), which is how the T4 estimate in
``benchmarks/RESULTS.md`` was made.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from m2chat_lite.config import M2ChatConfig, get_config

# HuggingFaceTB/SmolLM2-135M-Instruct, config.json (the fields that set shapes and numerics)
LM = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
          num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
          rope_theta=100000.0, hidden_act="silu", tie_word_embeddings=True)
# SmolLM2-Instruct's chat template: ChatML with a default system prompt
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# google/siglip-base-patch16-224, vision_config
VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              image_size=224, patch_size=16, num_channels=3, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
# nota-ai/bk-sdm-tiny, unet/config.json (BK-SDM's src/unet_config/bk_tiny): SD-1.4's UNet with one layer per
# block, the last down/up stage and the mid-block removed
UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320, 640, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
            mid_block_type=None, cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32, norm_eps=1e-5,
            act_fn="silu", flip_sin_to_cos=True, freq_shift=0, downsample_padding=1)
# Stable Diffusion 1.x's VAE (bk-sdm-tiny keeps SD-1.4's)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
           layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           norm_num_groups=32, act_fn="silu", sample_size=512, scaling_factor=0.18215)
# CLIP ViT-L/14's text encoder (SD-1.x's)
TEXT_ENCODER = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                    layer_norm_eps=1e-5, projection_dim=768)
# SD-1.x's scheduler/scheduler_config.json
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1)

MARKER = "hf_shapes.json"  # written last by save(): the folder is complete

# What the real checkpoints hold, for the check in tests/test_hf_shapes.py (parameters, millions, rounded)
EXPECTED_MILLIONS = {"lm": 134.5, "vision": 92.9, "unet": 323.4, "vae": 83.7, "text_encoder": 123.1}


def _tokenizer_config_fields(tokenizer) -> dict:
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


def build_models(lm_special_ids: dict | None = None, text_special_ids: dict | None = None
                 ) -> dict[str, torch.nn.Module]:
    """The five models with the real configs, freshly (randomly) initialised on the current default device
    (``with torch.device("meta"):`` around the call builds them without memory)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, \
        SiglipVisionModel

    return {
        "lm": LlamaForCausalLM(LlamaConfig(**LM, **(lm_special_ids or {}))),
        "vision": SiglipVisionModel(SiglipVisionConfig(**VISION)),
        "unet": UNet2DConditionModel(**UNET),
        "vae": AutoencoderKL(**VAE),
        "text_encoder": CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER, **(text_special_ids or {}))),
    }


def parameter_counts() -> dict[str, int]:
    """Parameters of each part (tied weights once), counted on the meta device: no memory, no init."""
    with torch.device("meta"):
        models = build_models()
    return {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}


def lm_tokenizer(seed: int = 0):
    """A byte-level BPE with SmolLM2's special tokens (``<|endoftext|>`` 0, ``<|im_start|>`` 1 = bos,
    ``<|im_end|>`` 2 = eos = pad) and its ChatML template, trained on ShapeWorld text and the default
    system prompt (so both tokenise compactly, as with SmolLM2's 49k vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from m2chat_lite import world

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = world.text_corpus(300, seed=seed) + [SYSTEM_PROMPT] * 50
    backend.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=2000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def clip_tokenizer():
    """A CLIP tokenizer over single bytes (no merges): every prompt pads to 77 tokens, as with CLIP's own."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    return CLIPTokenizer(vocab=vocab, merges=[])


def save(folder, seed: int = 0, dtype: torch.dtype = torch.float16, image_size: int = 256) -> M2ChatConfig:
    """Write random checkpoints with the hf-small preset's architectures to ``folder`` (``lm/``, ``vision/``,
    ``generator/``; about 1.5 GB in float16) and return the ``hf-small`` config that loads them at
    ``image_size``. ``dtype`` is the dtype saved; ``hf.build_system`` casts on loading (float32 on a CPU,
    bfloat16 or float16 on a GPU), so it changes only the disk size."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline
    from transformers import SiglipImageProcessor

    from m2chat_lite.checkpoints import quiet

    folder = Path(folder)
    with quiet(), torch.random.fork_rng():
        torch.manual_seed(seed)
        tokenizer, text_tokenizer = lm_tokenizer(seed), clip_tokenizer()
        text_ids = dict(bos_token_id=text_tokenizer.convert_tokens_to_ids("<|startoftext|>"),
                        eos_token_id=text_tokenizer.convert_tokens_to_ids("<|endoftext|>"))
        models = build_models(_tokenizer_config_fields(tokenizer), text_ids)
        models = {name: model.to(dtype) for name, model in models.items()}
        tokenizer.save_pretrained(folder / "lm")
        models["lm"].save_pretrained(folder / "lm")
        models["vision"].save_pretrained(folder / "vision")
        SiglipImageProcessor(size={"height": 224, "width": 224}).save_pretrained(folder / "vision")
        StableDiffusionPipeline(vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=text_tokenizer,
                                unet=models["unet"], scheduler=PNDMScheduler(**SCHEDULER), safety_checker=None,
                                feature_extractor=None, requires_safety_checker=False
                                ).save_pretrained(folder / "generator")
        (folder / MARKER).write_text(json.dumps({"seed": seed, "dtype": str(dtype).removeprefix("torch."),
                                                 "random_weights": True}) + "\n")
    return config_for(folder, image_size)


def is_complete(folder) -> bool:
    """Whether :func:`save` finished writing ``folder`` (it writes :data:`MARKER` last)."""
    return (Path(folder) / MARKER).is_file()


def config_for(folder, image_size: int = 256) -> M2ChatConfig:
    """The ``hf-small`` config for folders :func:`save` already wrote."""
    folder = Path(folder)
    return get_config("hf-small", lm_id=str(folder / "lm"), vision_id=str(folder / "vision"),
                      generator_id=str(folder / "generator"), image_size=image_size)


# ---------------------------------------------------------------------------------------------
# Activation memory, measured on any device (the basis of the T4 estimate in benchmarks/RESULTS.md)
# ---------------------------------------------------------------------------------------------


def saved_for_backward(model: torch.nn.Module, loss_fn) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of ``loss_fn()``: the activations (each
    storage once; the model's parameters are not counted). Run it under the autocast a training step uses."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            sizes[storage.data_ptr()] = max(sizes.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = loss_fn()
    del loss
    return sum(sizes.values())


def stage_loss(model, tokenizer, stage: str, batch_size: int, seed: int = 0):
    """``loss_fn()`` for one M³FT ``stage`` batch of ``batch_size``, as the training loop builds it."""
    from m2chat_lite import fusion, m3ft

    m3ft.set_stage(model, stage)
    model.train()

    def aligned(n: int) -> dict:
        return m3ft.alignment_batch(model, tokenizer, m3ft.alignment_examples(n, seed=seed, image_size=model.image_size))
    if stage == "stage1":
        batch = aligned(batch_size)
        return lambda: m3ft.stage1_loss(model, batch)[0]
    samples = m3ft.stage2_samples(max(8, 2 * batch_size), seed=seed, image_size=model.image_size)
    batch = fusion.sample_batches(tokenizer, samples, model.fused.tokens_per_image, batch_size, model.image_size,
                                  seed=seed)(0)
    alignment = aligned(max(1, batch_size // 2))  # train_stage2's default alignment batch
    return lambda: m3ft.stage2_objective(model, batch, alignment)[0]


def cpu_activations(config: M2ChatConfig, batch_size: int, half: bool) -> dict[str, int]:
    """Bytes kept for backward by one stage-1 and one stage-2 step at ``batch_size``, on the CPU: in float32
    (``half=False``: an upper bound for a GPU), or as ``hf.build_system`` sets a GPU up (``half=True``: the
    pretrained parts in bfloat16, the new parts float32, under bfloat16 autocast; CPU autocast's op lists are
    close to, not the same as, CUDA's)."""
    from m2chat_lite import hf

    model, tokenizer, generator = hf.build_system(config, device="cpu")
    if half:
        for part in (model.fused.lm, model.fused.vision_model, generator.unet, generator.vae, generator.text_encoder):
            for name, param in part.named_parameters():
                if "lora_" not in name:  # LoRA is new: float32, as on a GPU
                    param.data = param.data.to(torch.bfloat16)
    result = {}
    for stage in ("stage1", "stage2"):
        loss_fn = stage_loss(model, tokenizer, stage, batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=half):
            result[stage] = saved_for_backward(model, loss_fn)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write lm/, vision/ and generator/ to")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="dtype saved")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--activations", type=int, default=None, metavar="BATCH",
                        help="then measure, on the CPU, what a stage-1 and a stage-2 step at BATCH keep for backward, "
                             "in float32 and as on a GPU (bfloat16 parts and autocast)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    if is_complete(args.out):
        config = config_for(args.out)
        print(f"kept the random hf-small-shaped checkpoints already in {args.out}")
    else:
        config = save(args.out, seed=args.seed, dtype=getattr(torch, args.dtype))
        print(f"wrote random hf-small-shaped checkpoints to {args.out} in {time.perf_counter() - start:.1f} s "
              "(random weights: only speed and memory are meaningful)")
    counts = parameter_counts()
    for name, n in counts.items():
        print(f"  {name}: {n / 1e6:.1f}M parameters")
    print(f'  get_config("hf-small", lm_id="{config.lm_id}", vision_id="{config.vision_id}", '
          f'generator_id="{config.generator_id}", image_size={config.image_size})')
    if args.activations is not None:
        for half in (False, True):
            start = time.perf_counter()
            sizes = cpu_activations(config, args.activations, half)
            kind = "bfloat16 parts + autocast (as on a GPU)" if half else "float32"
            print(f"kept for backward at batch {args.activations}, {kind}: " + ", ".join(
                f"{stage} {size / 2**20:,.0f} MiB" for stage, size in sizes.items())
                + f" ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
