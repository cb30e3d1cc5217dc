"""The causal language model at the heart of M²Chat: a small Llama, pretrained here on ShapeWorld text.

Taught in notebook ``03_language_model`` (tokenizer, model, pretraining, perplexity, generation, saving).
Notebook ``05_multimodal_prompt_fusion`` wraps this LM so it reads pictures at its ``<image>`` positions;
that part lives in its own module, ``fusion.py``.

The model is a stock ``transformers`` :class:`~transformers.LlamaForCausalLM`: for the ``tiny`` preset it is
built from a tiny :class:`~transformers.LlamaConfig` and trained from scratch (``build_lm``); with
``config.lm_id`` set (``hf-small``) the same function loads a pretrained checkpoint and widens its
embeddings for M²Chat's special tokens. Everything else (data, training, evaluation, saving) is the same
code for both.

Pretraining data
----------------
Every ShapeWorld task rendered with the chat template (``tokenizer.encode_chat``): caption pairs as a user
caption and an assistant picture, stories (the assistant writes sentences and, where a picture belongs,
the ``[IMG0..K-1]`` span followed by ``<image>``), dialogues, and visual questions (the picture as
``<image>``). At this text-only stage ``<image>`` is just a token in the input.

Conversations are **packed**: each training row holds several whole conversations back to back, and
``position_ids`` restart at 0 for each one, which makes ``transformers`` attend only within a
conversation (a block-diagonal causal mask) while no compute is spent on padding. Row ``r`` of step ``s``
is a deterministic function of ``(seed, s)``, so a resumed run sees exactly the data of an uninterrupted
one.

Which tokens carry the loss: **all of them** (``loss_on="all"``, the default), except ``<image>`` (an
input, never a target: the system inserts it after the generator has drawn), the first token of each
conversation (nothing to predict it from) and padding. That is ordinary LM pretraining: the model learns
the language of both sides (a user's caption is the same grammar as an assistant's), which is about twice
the signal of the assistant tokens alone. Later, instruction tuning (notebook 08) trains on the assistant's
tokens only, the labels ``encode_chat`` writes; ``loss_on="assistant"`` gives those here too.

Perplexity and the grammar's entropy
------------------------------------
``perplexity`` is ``exp(total NLL / tokens)`` over the tokens that carry loss. For caption pairs the
generator's probability of every caption is known exactly (``caption_nats``), so the best any model can
do on a caption conversation is known: ``entropy_reference`` turns it into nats per token (and a
perplexity) on exactly the samples evaluated. The other tasks' texts depend on hidden scenes in ways that
are not practical to enumerate; their perplexities are reported without a reference.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from . import world
from .config import M2ChatConfig
from .data import Image, Sample
from .tokenizer import (END_TOKEN, IGNORE_INDEX, IMAGE_TOKEN, add_m2chat_tokens, decode_reply, encode_chat,
                        image_gen_tokens, load_tokenizer, num_image_tokens, train_tokenizer)
from .checkpoints import quiet as _quiet, save_folder
from .training import TrainConfig, TrainResult, train
from .utils import DATA_DIR, get_device, set_seed
from .world.samples import make_samples

LOSS_ON = ("all", "assistant")
MODEL_FILES = ("config.json", "model.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def reference_lm_dir(preset: str = "tiny") -> Path:
    """Where the reference LM checkpoint of ``preset`` ships: ``data/checkpoints/<preset>/lm``."""
    return DATA_DIR / "checkpoints" / preset / "lm"


# ---------------------------------------------------------------------------------------------
# Tokenizer and model
# ---------------------------------------------------------------------------------------------


def build_tokenizer(config: M2ChatConfig, n_per_task: int = 2000, seed: int = 0):
    """The tokenizer for ``config``: for ``tiny``, a byte-level BPE trained on ShapeWorld text
    (deterministic: the same arguments give the same vocabulary); with ``config.lm_id``, that checkpoint's
    own tokenizer with ``<image>`` and ``[IMG0..K-1]`` added.

    On ShapeWorld's small vocabulary BPE may run out of merges below ``config.vocab_size``; size the model
    with ``len(tokenizer)`` (``build_lm`` does).
    """
    if config.lm_id is not None:
        tokenizer = AutoTokenizer.from_pretrained(config.lm_id)
        add_m2chat_tokens(tokenizer, config.num_image_tokens)
        return tokenizer
    if config.vocab_size is None:
        raise ValueError(f"preset {config.name!r} has neither lm_id nor vocab_size; set one of them")
    texts = world.text_corpus(n_per_task, seed=seed, split="train")
    return train_tokenizer(texts, vocab_size=config.vocab_size, num_image_tokens=config.num_image_tokens)


def lm_config(config: M2ChatConfig, tokenizer) -> LlamaConfig:
    """The tiny Llama's config: sizes from ``config``, vocabulary and special ids from ``tokenizer``."""
    missing = [f for f in ("lm_hidden_size", "lm_num_layers", "lm_num_heads") if getattr(config, f) is None]
    if missing:
        raise ValueError(f"preset {config.name!r} does not size a model from scratch ({', '.join(missing)} "
                         "unset); set lm_id to load a pretrained LM, or use the tiny preset")
    hidden = config.lm_hidden_size
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=config.lm_num_layers,
        num_attention_heads=config.lm_num_heads,
        num_key_value_heads=config.lm_num_heads,
        max_position_embeddings=config.max_seq_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,  # the output layer reuses the input embeddings: fewer weights to learn
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def build_lm(config: M2ChatConfig, tokenizer, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """A causal LM for ``config`` and ``tokenizer``: a freshly initialised tiny Llama (seed with
    ``utils.set_seed`` first for repeatable weights), or the pretrained ``config.lm_id`` (in ``dtype``) with
    its embeddings resized to ``len(tokenizer)``. Generation stops at ``<|end|>`` (or the tokenizer's eos)."""
    if config.lm_id is not None:
        model = AutoModelForCausalLM.from_pretrained(config.lm_id, dtype=dtype)
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = LlamaForCausalLM(lm_config(config, tokenizer))
    _set_generation_ids(model, tokenizer)
    return model


def _set_generation_ids(model, tokenizer) -> None:
    stop = [tokenizer.eos_token_id]
    end = tokenizer.convert_tokens_to_ids(END_TOKEN)
    if isinstance(end, int) and end not in stop and end != tokenizer.unk_token_id:
        stop.append(end)
    model.generation_config.eos_token_id = stop if len(stop) > 1 else stop[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id


def count_parameters(model) -> dict[str, int]:
    """Parameters per part of a Llama: token embedding, attention, MLP, norms, output head, total.

    With tied embeddings the output head shares the embedding matrix and adds nothing."""
    parts = {"embedding": 0, "attention": 0, "mlp": 0, "norms": 0, "output head": 0}
    seen = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        if "embed_tokens" in name:
            parts["embedding"] += param.numel()
        elif "self_attn" in name:
            parts["attention"] += param.numel()
        elif ".mlp." in name:
            parts["mlp"] += param.numel()
        elif "norm" in name:
            parts["norms"] += param.numel()
        else:
            parts["output head"] += param.numel()
    parts["total"] = sum(parts.values())
    return parts


# ---------------------------------------------------------------------------------------------
# Data: conversations -> labelled token ids -> packed rows
# ---------------------------------------------------------------------------------------------


def sample_messages(sample: Sample) -> list[dict]:
    """A sample's chat messages without loading its pictures (a picture is just ``{"type": "image"}``)."""
    return [{"role": turn.role,
             "content": [{"type": "image"} if isinstance(s, Image) else {"type": "text", "text": s.text}
                         for s in turn.content]}
            for turn in sample.turns]


def encode_sample(tokenizer, sample_or_messages, loss_on: str = "all") -> dict[str, list[int]]:
    """``input_ids`` and ``labels`` of one conversation (a ``Sample`` or chat messages).

    ``labels[i]`` is ``input_ids[i]`` where token ``i`` is a prediction target (from the tokens before it),
    else ``-100``. ``loss_on="all"``: every token except ``<image>`` and the first (pretraining);
    ``"assistant"``: the assistant's tokens only, as ``encode_chat`` labels them (instruction tuning)."""
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on must be one of {', '.join(LOSS_ON)}, got {loss_on!r}")
    messages = sample_messages(sample_or_messages) if isinstance(sample_or_messages, Sample) else sample_or_messages
    enc = encode_chat(tokenizer, messages)
    ids = enc["input_ids"]
    if loss_on == "all":
        image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        labels = [IGNORE_INDEX] + [IGNORE_INDEX if token == image_id else token for token in ids[1:]]
    else:
        labels = list(enc["labels"])
    return {"input_ids": list(ids), "labels": labels}


def lm_pool(tokenizer, n_per_task: int = 2000, seed: int = 0, tasks: Sequence[str] = world.TASK_NAMES,
            loss_on: str = "all", max_length: int | None = None) -> list[dict]:
    """The pretraining pool: ``n_per_task`` training samples of each task, encoded (``encode_sample``).

    Deterministic from ``seed``. Each item also records its ``task``. Conversations longer than
    ``max_length`` tokens are left out (none are at the tiny preset's 256)."""
    if n_per_task < 1:
        raise ValueError(f"n_per_task must be a positive int, got {n_per_task!r}")
    pool = []
    for task in tasks:
        for sample in make_samples(task, n_per_task, seed=seed, split="train", image_size=16):
            item = encode_sample(tokenizer, sample, loss_on)
            if max_length is None or len(item["input_ids"]) <= max_length:
                pool.append({**item, "task": task})
    if not pool:
        raise ValueError(f"every conversation is longer than max_length={max_length}; raise it")
    return pool


def pack(items: Iterable[dict], rows: int, seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Pack whole conversations, in order, into ``rows`` rows of ``seq_len`` tokens.

    A conversation that does not fit in the current row starts the next one; once the rows are full the
    rest is left out. ``position_ids`` restart at 0 for every conversation, which is how ``transformers``
    (called with no attention mask and no cache) knows to attend only within a conversation. The first
    token of each conversation and the padding carry no loss."""
    input_ids = torch.full((rows, seq_len), pad_id, dtype=torch.long)
    labels = torch.full((rows, seq_len), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((rows, seq_len), dtype=torch.long)
    row, col = 0, 0
    for item in items:
        n = len(item["input_ids"])
        if n > seq_len:
            raise ValueError(f"a conversation of {n} tokens does not fit in rows of seq_len={seq_len}")
        if col + n > seq_len:
            if col < seq_len:  # padding: a segment of its own, so no conversation attends to it
                position_ids[row, col:] = torch.arange(seq_len - col)
            row, col = row + 1, 0
            if row == rows:
                break
        input_ids[row, col:col + n] = torch.tensor(item["input_ids"])
        labels[row, col + 1:col + n] = torch.tensor(item["labels"][1:])
        position_ids[row, col:col + n] = torch.arange(n)
        col += n
    else:
        if row < rows and col < seq_len:
            position_ids[row, col:] = torch.arange(seq_len - col)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def lm_batches(pool: Sequence[dict], rows: int, seq_len: int, pad_id: int, seed: int = 0
               ) -> Callable[[int], dict[str, torch.Tensor]]:
    """``make_batch(step)`` for the training loop: the pool in a random order drawn from ``(seed, step)``,
    packed into ``rows`` x ``seq_len`` tokens. Each conversation is equally likely to be drawn, so the task
    mixture is the pool's."""
    if not pool:
        raise ValueError("the pool is empty")

    def make_batch(step: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        order = torch.randperm(len(pool), generator=generator).tolist()
        return pack((pool[i] for i in order), rows, seq_len, pad_id)

    return make_batch


def lm_loss(model, batch: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens of a packed batch."""
    return model(input_ids=batch["input_ids"].to(device), labels=batch["labels"].to(device),
                 position_ids=batch["position_ids"].to(device), use_cache=False).loss


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def train_lm(config: M2ChatConfig, tokenizer, train_config: TrainConfig, out_dir: str | Path | None = None,
             device: str | None = None, n_per_task: int = 2000, rows: int = 8, seq_len: int | None = None,
             loss_on: str = "all", model: LlamaForCausalLM | None = None, progress: bool = True
             ) -> tuple[LlamaForCausalLM, TrainResult]:
    """Pretrain a causal LM on ShapeWorld conversations with the shared loop (``training.train``).

    The model is ``build_lm(config, tokenizer)`` initialised from ``train_config.seed`` (or ``model``, to
    continue training one); the data is ``lm_pool(tokenizer, n_per_task, seed=train_config.seed)`` packed
    into ``rows`` rows of ``seq_len`` tokens (default ``config.max_seq_len``) per step. ``out_dir`` holds
    the loop's checkpoint, and training resumes from it. Save the result with ``save_lm``.
    """
    device = get_device(device)
    seq_len = seq_len or config.max_seq_len
    if not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive int, got {rows!r}")
    if seq_len > config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} is longer than the model's max_seq_len={config.max_seq_len}")
    if model is None:
        set_seed(train_config.seed)
        model = build_lm(config, tokenizer)
    model.to(device)
    pool = lm_pool(tokenizer, n_per_task, seed=train_config.seed, loss_on=loss_on, max_length=seq_len)
    make_batch = lm_batches(pool, rows, seq_len, tokenizer.pad_token_id, seed=train_config.seed)
    result = train(model, lambda batch: lm_loss(model, batch, device), make_batch, train_config,
                   out_dir=out_dir, device=device, progress=progress, description="language model")
    return model, result


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def perplexity(model, tokenizer, samples: Sequence, batch_size: int = 32, device: str | None = None,
               loss_on: str = "all") -> dict[str, float]:
    """Perplexity of ``model`` on ``samples`` (``Sample``s or chat messages), over the tokens that carry
    loss (the same tokens as in training with ``loss_on``).

    Returns ``nll`` (total nats), ``tokens``, ``nats_per_token`` and ``perplexity`` =
    ``exp(nats_per_token)``."""
    if not samples:
        raise ValueError("perplexity needs at least one sample")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    encoded = sorted((encode_sample(tokenizer, s, loss_on) for s in samples), key=lambda e: len(e["input_ids"]))
    total, tokens = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(e["input_ids"]) for e in chunk)
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, e in enumerate(chunk):
            n = len(e["input_ids"])
            ids[i, :n], labels[i, 1:n], mask[i, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"][1:]), 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        targets = labels[:, 1:].to(device)
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="sum").item()
        tokens += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    return {"nll": total, "tokens": tokens, "nats_per_token": total / tokens,
            "perplexity": math.exp(total / tokens)}


def caption_nats(item) -> float:
    """``-log p`` (nats) of a caption under ShapeWorld's own caption generator (the training distribution).

    ``item`` is a caption ``Sample`` (``meta`` holds its scene and caption) or a ``world.CaptionPair``.
    ``world.caption_pairs`` picks the number of objects n (1 to 3), n distinct cells of the 9, each
    object's colour-shape pair (15 allowed) and size (2), then the caption's object order (n!), a size word
    and a position phrase per object (2 each) and a template (4). Every choice is uniform and the caption
    string determines all of them, so ``p = 1/3 * 1/C(9,n) * 1/30^n * 1/n! * 1/4^n * 1/4``.
    """
    if isinstance(item, world.CaptionPair):
        scene, text, name = item.scene, item.caption, repr(item.caption)
    elif isinstance(item, Sample) and item.task == "caption" and {"scene", "caption"} <= set(item.meta):
        if item.meta.get("split") == "heldout":
            raise ValueError(f"sample {item.id!r} is from the held-out split, whose generator forces a held-out "
                             "pair; the exact entropy is for the training distribution (benchmark split 'test')")
        scene, text, name = world.Scene.from_dict(item.meta["scene"]), item.meta["caption"], f"sample {item.id!r}"
    else:
        raise ValueError(f"caption_nats needs a caption Sample or a world.CaptionPair, got {item!r:.80}")
    if world.parse_caption(text) != scene or scene.held_out:
        raise ValueError(f"{name}: not a caption the training grammar writes for its scene")
    n = len(scene)
    max_objects = 3  # world.caption_pairs(max_objects=3)
    pairs = len(world.COLORS) * len(world.SHAPES) - len(world.HELD_OUT)
    return (math.log(max_objects) + math.log(math.comb(9, n)) + n * math.log(pairs * len(world.SIZES))
            + math.log(math.factorial(n)) + n * math.log(2) + n * math.log(2)
            + math.log(len(world.captions.SCENE_TEMPLATES)))


# The first word of a user turn tells a caption pair from the other tasks. In the pretraining mix (equal
# numbers of each task) visual questions and the dialogues that open with an uploaded picture (40% of them,
# see world.tasks.dialogues) begin with <image>, which is never a target; among the conversations whose first
# word is predicted, this share are caption pairs (captions : stories : dialogues opened by a request).
CAPTION_SHARE = 1 / (1 + 1 + 0.6)


def entropy_reference(tokenizer, caption_samples: Sequence[Sample], task_share: float = CAPTION_SHARE,
                      loss_on: str = "all") -> dict[str, float]:
    """The best possible loss on these caption conversations: the grammar's exact ``-log p`` per token.

    Per conversation: ``caption_nats`` plus ``-log(task_share)``, because a model pretrained on a mixture
    of tasks must first tell, from the first word, that this conversation is a caption pair (see
    ``CAPTION_SHARE``); everything after the caption (``[IMG0..K-1]``, ``<|end|>``) is determined. Divided
    by the same tokens ``perplexity`` counts. Returns ``nats_per_token`` and its ``perplexity``, and
    ``grammar_nats_per_token`` / ``grammar_perplexity`` (the caption grammar alone, as if the model knew
    the task).
    """
    if not 0 < task_share <= 1:
        raise ValueError(f"task_share must be in (0, 1], got {task_share}")
    if loss_on != "all":
        raise ValueError("the reference is computed for loss_on='all' (the caption is in the user's turn)")
    nats = [caption_nats(s) for s in caption_samples]
    tokens = sum(sum(label != IGNORE_INDEX for label in encode_sample(tokenizer, s)["labels"][1:])
                 for s in caption_samples)
    grammar = sum(nats) / tokens
    total = (sum(nats) - len(nats) * math.log(task_share)) / tokens
    return {"nats_per_token": total, "perplexity": math.exp(total), "grammar_nats_per_token": grammar,
            "grammar_perplexity": math.exp(grammar), "tokens": tokens}


def benchmark_perplexity(model, tokenizer, split: str = "test", device: str | None = None,
                         tasks: Sequence[str] = world.TASK_NAMES) -> dict:
    """Perplexity per task on the frozen benchmark split, plus the caption entropy reference (``test``)."""
    from .benchmark import load_benchmark

    results = {}
    for task in tasks:
        samples = load_benchmark(task, split=split, load_images=False)
        results[task] = perplexity(model, tokenizer, samples, device=device)
        if task == "caption" and split == "test":
            results["caption_reference"] = entropy_reference(tokenizer, samples)
    return results


@torch.no_grad()
def restated_requests(model, tokenizer, split: str = "test", limit: int | None = None) -> dict:
    """How often the LM, asked for a picture, restates the request right: the frozen benchmark's dialogues
    that open with a request ("please make a picture of a little red square in the bottom left corner"), each
    answered greedily in text alone; the words after "here is" must describe exactly the asked scene
    ("a small red square at the bottom left"). It is copying with synonyms, a skill perplexity hides: the
    shipped LM's caption loss is within about 2% of the grammar's best, yet it restates 11% of these
    requests; the same LM pretrained on four times the tokens restated 98-100% (``benchmarks/M2CHAT_RECIPE.md``,
    "In its own words"). Taught in notebook ``03_language_model``; the whole system's counterpart is the
    ``chat`` suite of ``evaluation.py``.

    Returns ``exact`` (the fraction right), ``n`` and ``replies``: ``(request, reply, right)`` per dialogue."""
    from .benchmark import load_benchmark
    from .world.captions import parse_caption
    from .world.samples import scenes_of

    replies = []
    for sample in load_benchmark("dialogue", split=split)[:limit]:
        request = sample.turns[0]
        if any(isinstance(segment, Image) for segment in request.content):  # an upload: nothing to restate
            continue
        words = " ".join(segment.text for segment in request.content)
        reply = generate_text(model, tokenizer, [{"role": "user", "content": words}], max_new_tokens=40)
        said = reply.split("[IMG0]")[0].strip()
        scene = parse_caption(said.split("here is", 1)[1]) if "here is" in said else None
        replies.append((words, said, scene == scenes_of(sample)[0]))
    if not replies:
        raise ValueError(f"no benchmark dialogue of the {split!r} split (first {limit}) opens with a request")
    return {"exact": sum(right for *_, right in replies) / len(replies), "n": len(replies), "replies": replies}


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_text(model, tokenizer, messages: list[dict], max_new_tokens: int = 64, greedy: bool = True,
                  temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> str:
    """The assistant's reply to ``messages``, decoded with ``model.generate`` (greedy, or sampled with
    ``temperature`` and optional ``top_k`` from a generator seeded by ``seed``).

    When the model writes the whole ``[IMG0..K-1]`` span, ``<image>`` is appended for it, as the full
    system does once the picture is drawn (here no picture is drawn), and decoding continues. Stops at
    ``<|end|>`` or after ``max_new_tokens``. ``[IMGk]`` and ``<image>`` stay visible in the text."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not greedy and temperature <= 0:
        raise ValueError(f"temperature must be positive for sampling, got {temperature}; or use greedy=True")
    device = next(model.parameters()).device
    prompt = encode_chat(tokenizer, messages, add_generation_prompt=True)["input_ids"]
    ids = torch.tensor([prompt], device=device)
    k = num_image_tokens(tokenizer)
    last_img = tokenizer.convert_tokens_to_ids(image_gen_tokens(k)[-1]) if k else None
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    stops = model.generation_config.eos_token_id
    stops = list(stops) if isinstance(stops, (list, tuple)) else [stops]
    options = {"do_sample": not greedy, "pad_token_id": tokenizer.pad_token_id,
               "eos_token_id": stops + ([last_img] if last_img is not None else [])}
    if not greedy:
        options.update(temperature=temperature, top_k=top_k)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        while ids.shape[1] - len(prompt) < max_new_tokens:
            budget = max_new_tokens - (ids.shape[1] - len(prompt))
            ids = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
                                 **options)
            if ids[0, -1].item() != last_img or ids.shape[1] - len(prompt) >= max_new_tokens:
                break
            ids = torch.cat([ids, torch.tensor([[image_id]], device=device)], dim=1)  # the picture goes in
    model.train(was_training)
    return decode_reply(tokenizer, ids[0, len(prompt):])


# ---------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------


def save_lm(model, tokenizer, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Save the model and its tokenizer into one ``save_pretrained`` folder (config + safetensors).

    ``dtype=torch.float16`` stores the weights in half precision (half the bytes; ``model`` itself is left
    as it is); :func:`load_lm` loads them back as float32. All or nothing (``checkpoints.save_folder``):
    ``folder`` is either the old checkpoint or the complete new one, never half-written."""
    def write(tmp: Path) -> None:
        with _quiet():
            stored = model if dtype is None else copy.deepcopy(model).to(dtype)
            stored.save_pretrained(tmp)  # config.json, generation_config.json, model.safetensors
        tokenizer.save_pretrained(tmp)
    return save_folder(folder, write)


def load_lm(folder: str | Path, device: str | None = "cpu", dtype: torch.dtype = torch.float32):
    """Load ``(model, tokenizer)`` saved by ``save_lm``; a clear error for a missing, incomplete or
    mismatched folder. Weights stored in fp16 are loaded as ``dtype`` (float32 by default)."""
    folder = Path(folder)
    redo = "save it again with save_lm(model, tokenizer, folder), or train one with train_lm"
    if not folder.is_dir():
        raise FileNotFoundError(f"no LM checkpoint folder at {folder}; {redo}")
    missing = [name for name in MODEL_FILES + TOKENIZER_FILES if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"the LM checkpoint {folder} is incomplete: missing {', '.join(missing)}; {redo}")
    tokenizer = load_tokenizer(folder)
    try:
        with _quiet():
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True,
                                                               local_files_only=True)
    except Exception as error:
        raise ValueError(f"cannot load the LM in {folder} ({type(error).__name__}: {error}); the weights do not "
                         f"match config.json or are damaged; {redo}") from error
    problems = [f"{what}: {', '.join(map(str, keys[:3]))}{' ...' if len(keys) > 3 else ''}"
                for what, keys in (("missing weights", info.get("missing_keys", [])),
                                   ("unexpected weights", info.get("unexpected_keys", [])),
                                   ("weights of the wrong shape", info.get("mismatched_keys", [])))
                if keys]
    if problems:
        raise ValueError(f"the LM checkpoint {folder} does not match its config.json ({'; '.join(problems)}); {redo}")
    rows = model.get_input_embeddings().num_embeddings
    if rows < len(tokenizer):
        raise ValueError(f"the LM in {folder} has {rows} token embeddings but its tokenizer has {len(tokenizer)} "
                         f"tokens; they were saved from different runs; {redo}")
    _set_generation_ids(model, tokenizer)
    model.eval()
    return model.to(get_device(device)), tokenizer
