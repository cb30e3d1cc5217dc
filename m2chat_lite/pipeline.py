"""Interleaved generation: the LM writes, and draws where it writes ``[IMG0..K-1]``.

Taught in notebook ``09_interleaved_chat``; behind ``m2chat-lite demo`` and ``m2chat-lite chat``.

:class:`M2ChatPipeline` holds the trained system of notebooks 05–08 (the fused LM, the M³Adapter, the
generator) and runs the loop of the paper's Figure 2, one token at a time:

1. the conversation so far (text and pictures) becomes ``inputs_embeds`` through prompt fusion;
2. the LM picks the next token (greedy, or sampled with a temperature and top-k, from a seed);
3. when that token is ``[IMG0]`` the rest of the span ``[IMG1..K-1]`` is written for it; the LM's hidden
   states over the request and the span, with the most recent picture in the conversation as the visual
   reference, go through the adapter (``M2ChatModel.condition``, the same function stage 1 trained) to
   ``prompt_embeds``, and the generator draws the picture;
4. the picture goes back into the context at ``<image>`` (as the chat template writes it), so the words
   after it, and later turns ("now make it blue"), can refer to it; decoding continues.

A message is ``{"role": "user" | "assistant", "content": str | [segments]}``; a segment is
``{"type": "text", "text": ...}`` or ``{"type": "image", "image": <PIL picture or file path>}``. Pictures
the pipeline draws come back as image segments with the adapter's ``gate`` (how much of the reference
picture it used) beside them.

There is no key-value cache: every step reads the whole conversation again. At this size (a 4-layer LM, at
most 256 tokens) that costs little and keeps the loop readable; the adapter needs the hidden states of the
span in any case.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .data import image_to_tensor, load_image, tensor_to_image
from .diffusion import TinyDiffusionPipeline
from .fusion import collate, expand_image_tokens
from .m3ft import M2ChatModel, load_system, reference_system_dir, save_system
from .tokenizer import (BOS_TOKEN, END_TOKEN, IMAGE_TOKEN, PAD_TOKEN, ROLE_TOKENS, encode_chat, image_gen_tokens)
from .utils import autocast_context, get_device

STORY_PROMPT = "write a short story with pictures about {subject}."  # one of the phrasings stories are trained on


@dataclass
class Reply:
    """What :meth:`M2ChatPipeline.chat` returns: the assistant's message and how decoding ended."""

    message: dict  # {"role": "assistant", "content": [text and image segments]}
    finished: bool  # False when max_new_tokens ran out before the end-of-turn token
    tokens: int  # how many tokens the LM wrote (the [IMG] spans included)
    seconds: float = 0.0

    @property
    def text(self) -> str:
        """The words of the reply, with ``[picture]`` where a picture was drawn."""
        return " ".join(s["text"] if s["type"] == "text" else "[picture]" for s in self.message["content"])

    @property
    def images(self) -> list:
        return [s["image"] for s in self.message["content"] if s["type"] == "image"]

    @property
    def gates(self) -> list[float]:
        return [s["gate"] for s in self.message["content"] if s["type"] == "image"]


@dataclass
class Context:
    """A conversation being decoded: ids with expanded ``<image>`` slots and the pictures, in order.
    Decoding appends to both."""

    ids: list[int]
    pictures: list[torch.Tensor] = field(default_factory=list)


def _check_messages(messages: Sequence[dict]) -> None:
    if not messages:
        raise ValueError("the conversation is empty; start it with a user message, e.g. "
                         "[{'role': 'user', 'content': 'tell me a story about a red circle.'}]")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i} must be a dict with a role of 'system', 'user' or 'assistant', "
                             f"got {message!r:.80}")
    if messages[-1]["role"] != "user":
        raise ValueError("the last message must be the user's: the pipeline writes the assistant's reply to it")
    last = messages[-1]["content"]
    words = last if isinstance(last, str) else " ".join(s.get("text", "") for s in last if isinstance(s, dict))
    has_picture = not isinstance(last, str) and any(isinstance(s, dict) and s.get("type") == "image" for s in last)
    if not words.strip() and not has_picture:
        raise ValueError("the user's message is empty; write a request, e.g. 'draw a red circle at the top left.'")


def _split_pictures(messages: Sequence[dict]) -> tuple[list[dict], list]:
    """Messages with image segments reduced to ``{"type": "image"}`` (what ``encode_chat`` reads), and the
    pictures in order (each checked and made a square RGB picture by ``load_image`` later)."""
    plain, pictures = [], []
    for i, message in enumerate(messages):
        content = message["content"]
        if isinstance(content, str):
            plain.append({"role": message["role"], "content": content})
            continue
        segments = []
        for segment in content:
            if isinstance(segment, dict) and segment.get("type") == "image":
                if segment.get("image") is None:
                    raise ValueError(f"message {i} has an image segment without its picture; write "
                                     "{'type': 'image', 'image': <PIL picture or file path>}")
                pictures.append(segment["image"])
                segments.append({"type": "image"})
            else:
                segments.append(segment)
        plain.append({"role": message["role"], "content": segments})
    return plain, pictures


class M2ChatPipeline:
    """The whole M²Chat system: ``chat(messages)`` writes a reply with pictures; ``story`` and ``dialogue``
    are the two ways the course uses it. Load with :meth:`from_pretrained`, write with
    :meth:`save_pretrained`."""

    def __init__(self, model: M2ChatModel, tokenizer, generator: TinyDiffusionPipeline,
                 parts: dict[str, Path] | None = None):
        self.model, self.tokenizer, self.generator = model.eval(), tokenizer, generator
        self.parts = parts or {}  # where the frozen LM, CLIP and generator folders were loaded from
        vocab = tokenizer.get_added_vocab()
        self.gen_ids = tokenizer.convert_tokens_to_ids(image_gen_tokens(len(model.fused.gen_token_ids)))
        # the end of the assistant's turn: the course tokenizer's <|end|>, a pretrained one's eos (<|im_end|>)
        self.image_id, self.end_id = vocab[IMAGE_TOKEN], vocab.get(END_TOKEN, tokenizer.eos_token_id)
        # tokens the assistant never writes itself: structure, pictures in context, the span after [IMG0]
        never = {vocab[t] for t in (PAD_TOKEN, BOS_TOKEN, IMAGE_TOKEN, *ROLE_TOKENS.values()) if t in vocab}
        never |= set(tokenizer.all_special_ids) - {self.end_id, self.gen_ids[0]}  # a pretrained chat template's
        self.banned = sorted(never | set(self.gen_ids[1:]))
        self.max_length = model.fused.lm.config.max_position_embeddings
        self.image_size = generator.image_size

    # --- loading and saving ------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, folder=None, device: str | None = None) -> "M2ChatPipeline":
        """Load a system folder (``m2chat.json`` with ``fused/`` and ``adapter/``); by default the shipped
        reference (:func:`default_system_dir`)."""
        folder = Path(folder) if folder is not None else default_system_dir()
        model, tokenizer, generator = load_system(folder, device=get_device(device))
        meta = model.source
        return cls(model, tokenizer, generator, parts={"lm": meta["lm"], "clip": meta["clip"],
                                                      "diffusion": meta["diffusion"]})

    def save_pretrained(self, folder) -> Path:
        """A self-contained copy of the system in ``folder`` (the frozen LM, CLIP and generator folders
        beside the trained parts), written all or nothing; ``from_pretrained(folder)`` loads it anywhere.
        An ``hf-small`` system writes its trained parts and the checkpoint ids its frozen parts load from."""
        if getattr(self.model, "hf_config", None) is not None:  # hf-small: the checkpoints are named, not copied
            from .hf import save_system as save_hf_system

            return save_hf_system(self.model, self.tokenizer, folder, self.model.hf_config, self.model.record)
        missing = [name for name in ("lm", "clip", "diffusion") if not Path(self.parts.get(name, "")).is_dir()]
        if missing:
            raise ValueError(f"this pipeline does not know where its {', '.join(missing)} folders are (it was not "
                             "made by from_pretrained); save the system with m3ft.save_system next to them instead")
        folder = Path(folder)

        def add_parts(tmp: Path) -> None:
            for name in ("lm", "clip", "diffusion"):
                shutil.copytree(self.parts[name], tmp / name)

        return save_system(self.model, folder, record=self.model.record, lm_dir="../lm", clip_dir="../clip",
                           diffusion_dir="diffusion", extra=add_parts)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # --- the decoding loop -------------------------------------------------------------------------

    def encode(self, messages: Sequence[dict]) -> "Context":
        """The conversation as the LM reads it, ready for the assistant's next token: ids (each picture as
        ``V`` ``<image>`` slots) and the pictures as tensors."""
        plain, pictures = _split_pictures(messages)
        encoded = encode_chat(self.tokenizer, plain, add_generation_prompt=True)
        ids, _ = expand_image_tokens(encoded["input_ids"], None, self.image_id, self.model.fused.tokens_per_image)
        tensors = [image_to_tensor(load_image(p, size=self.image_size)) for p in pictures]
        context = Context(ids, tensors)
        self._check_length(context, 0)
        return context

    def _check_length(self, context: Context, extra: int) -> None:
        if len(context.ids) + extra > self.max_length:
            raise ValueError(f"the conversation is {len(context.ids)} tokens (pictures count "
                             f"{self.model.fused.tokens_per_image} each), and with {extra} more it would pass the "
                             f"{self.max_length} this LM reads; start a new conversation or drop early turns")

    def _batch(self, context: Context) -> dict:
        item = {"input_ids": context.ids, "labels": None,
                "pixel_values": torch.stack(context.pictures) if context.pictures
                else torch.zeros(0, 3, self.image_size, self.image_size)}
        return collate([item], self.tokenizer.pad_token_id)

    @torch.no_grad()
    def next_token(self, context: Context, allow_picture: bool = True, do_sample: bool = False,
                   temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None) -> int:
        """The assistant's next token after ``context``: the LM's choice among the tokens it may write
        (never structure, ``<image>`` or the middle of a span; ``[IMG0]`` only if ``allow_picture``)."""
        batch = self._batch(context)
        with autocast_context(self.device):
            logits = self.model.fused(batch["input_ids"].to(self.device), batch["pixel_values"].to(self.device),
                                      use_cache=False).logits[0, -1].float().cpu()
        logits[self.banned] = float("-inf")
        if not allow_picture:
            logits[self.gen_ids[0]] = float("-inf")
        if not do_sample:
            return int(logits.argmax())
        logits = logits / temperature
        if top_k:
            kth = torch.topk(logits, min(top_k, len(logits))).values[-1]
            logits[logits < kth] = float("-inf")
        return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))

    @torch.no_grad()
    def condition(self, context: Context, return_visual: bool = False):
        """The adapter's output (``m3ft.AdapterOutput``) for the ``[IMG]`` span that ends ``context``: what
        :meth:`draw` hands the generator. The reference is the last picture in ``context`` (none: the gate is 0);
        ``return_visual``: the visual branch's output alone too (``visual_embeds``)."""
        batch = self._batch(context)
        reference = context.pictures[-1] if context.pictures else torch.zeros(3, self.image_size, self.image_size)
        batch["reference"] = reference[None]
        batch["has_reference"] = torch.tensor([bool(context.pictures)])
        with autocast_context(self.device):
            return self.model.condition(batch, return_visual=return_visual)

    @torch.no_grad()
    def draw(self, context: Context, seed: int = 0, **generator_kwargs) -> tuple[torch.Tensor, float]:
        """The picture (``[3, H, W]`` in [-1, 1]) for the ``[IMG]`` span that ends ``context``, and the
        adapter's mean gate (:meth:`condition`); ``seed`` fixes the starting noise; ``generator_kwargs`` go to
        the generator."""
        condition = self.condition(context)
        noise = torch.randn(1, *self.generator.latent_shape, generator=torch.Generator().manual_seed(seed))
        picture = self.generator(prompt_embeds=condition.prompt_embeds.float(),
                                 pooled_prompt_embeds=condition.pooled.float(), latents=noise,
                                 output_type="pt", **generator_kwargs)[0]
        return picture, float(condition.gate.float().mean())

    def chat(self, messages: Sequence[dict], max_new_tokens: int = 160, do_sample: bool = False,
             temperature: float = 1.0, top_k: int | None = 20, seed: int = 0, max_pictures: int = 6,
             num_inference_steps: int | None = None, guidance_scale: float | None = None) -> Reply:
        """The assistant's reply to ``messages`` (ending with the user's turn), its pictures drawn.

        ``do_sample=False`` decodes greedily; ``True`` samples with ``temperature`` and ``top_k``. ``seed``
        fixes the sampling and each picture's starting noise. At most ``max_pictures`` pictures per reply
        (after that ``[IMG0]`` is not allowed). ``num_inference_steps`` and ``guidance_scale`` go to the
        generator (default: its recipe's)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature must be above 0 when sampling, got {temperature}")
        _check_messages(messages)
        start = time.perf_counter()
        context = self.encode(messages)
        generator = torch.Generator().manual_seed(seed)
        k, v = len(self.gen_ids), self.model.fused.tokens_per_image
        content, words, written, pictures, finished = [], [], 0, 0, False
        drawn = sum(1 for m in messages for s in (m["content"] if not isinstance(m["content"], str) else [])
                    if isinstance(s, dict) and s.get("type") == "image")

        def flush():
            text = self.tokenizer.decode(words).strip()
            if text:
                content.append({"type": "text", "text": text})
            words.clear()

        while written < max_new_tokens:
            room = len(context.ids) + k + v + 1 <= self.max_length
            token = self.next_token(context, pictures < max_pictures and room, do_sample, temperature, top_k, generator)
            if token == self.end_id:
                finished = True
                break
            self._check_length(context, 1)
            if token != self.gen_ids[0]:
                context.ids.append(token)
                words.append(token)
                written += 1
                continue
            flush()
            context.ids += self.gen_ids  # the whole span: the adapter reads it
            picture, gate = self.draw(context, seed * 1_000_003 + drawn, num_inference_steps=num_inference_steps,
                                       guidance_scale=guidance_scale)
            drawn, pictures = drawn + 1, pictures + 1
            context.ids += [self.image_id] * v  # the picture's V slots, as expand_image_tokens writes <image>
            image = tensor_to_image(picture)
            context.pictures.append(image_to_tensor(image))  # as 8-bit, like any picture read from a file
            content.append({"type": "image", "image": image, "gate": gate})
            written += k
        flush()
        message = {"role": "assistant", "content": content}
        return Reply(message, finished, written, time.perf_counter() - start)

    @torch.no_grad()
    def illustrate(self, messages: Sequence[dict], seed: int = 0, **generator_kwargs) -> list[dict]:
        """Draw every picture of the assistant's turns that has none (``{"type": "image"}``), with the words
        as given: the LM reads the conversation up to each ``[IMG]`` span, its own earlier pictures
        included, and the adapter and generator draw. This is how a benchmark story or dialogue is
        illustrated by the system with its text held fixed (notebook 10). Returns a copy of ``messages``
        with the pictures (and their gates) filled in."""
        done: list[dict] = []
        drawn = 0
        for message in messages:
            content = message["content"]
            if message["role"] != "assistant" or isinstance(content, str):
                done.append(message)
                continue
            context = self.encode(done) if done and done[-1]["role"] == "user" else None
            if context is None:
                raise ValueError("an assistant turn to illustrate must follow a user turn")
            segments = []
            for segment in content:
                if segment.get("type") == "text":
                    context.ids += self.tokenizer(segment["text"], add_special_tokens=False,
                                                  split_special_tokens=True)["input_ids"]
                    segments.append(segment)
                    continue
                picture, gate = segment.get("image"), segment.get("gate")
                context.ids += self.gen_ids
                self._check_length(context, self.model.fused.tokens_per_image)
                if picture is None:
                    tensor, gate = self.draw(context, seed * 1_000_003 + drawn, **generator_kwargs)
                    picture = tensor_to_image(tensor)
                context.ids += [self.image_id] * self.model.fused.tokens_per_image
                context.pictures.append(image_to_tensor(load_image(picture, size=self.image_size)))
                segments.append({"type": "image", "image": picture, "gate": gate})
                drawn += 1
            done.append({"role": "assistant", "content": segments})
        return done

    # --- the two ways the course uses it -----------------------------------------------------------

    def story(self, subject: str, frames: int = 4, **chat_kwargs) -> list[dict]:
        """An illustrated story about ``subject`` ("a small red square"): the conversation, its last message
        the story with at most ``frames`` pictures. A whole request ("tell me a story about ...") is used as
        written."""
        if not subject or not subject.strip():
            raise ValueError("the story needs a subject, e.g. 'a small red square'")
        subject = subject.strip()
        request = subject if subject.split()[0].lower() in ("tell", "write", "can") else \
            STORY_PROMPT.format(subject=subject.rstrip("."))
        messages = [{"role": "user", "content": request}]
        reply = self.chat(messages, max_pictures=frames, **chat_kwargs)
        return messages + [reply.message]

    def dialogue(self, requests: Sequence[str | dict], **chat_kwargs) -> list[dict]:
        """A multi-turn conversation: each request (text, or a user message with a picture) gets a reply
        with the conversation so far, pictures included, in context; edits ("make it blue") act on the
        picture before. Returns every message."""
        if not requests:
            raise ValueError("the dialogue needs at least one request, e.g. ['draw a red circle.', 'make it blue.']")
        messages: list[dict] = []
        for request in requests:
            messages.append(request if isinstance(request, dict) else {"role": "user", "content": request})
            messages.append(self.chat(messages, **chat_kwargs).message)
        return messages


def default_system_dir(preset: str = "tiny") -> Path:
    """The shipped system the pipeline loads by default: after both M³FT stages (``stage2``) if shipped,
    otherwise after stage 1."""
    for name in ("stage2", "stage1"):
        folder = reference_system_dir(name, preset)
        if folder.is_dir():
            return folder
    raise FileNotFoundError(f"no shipped M²Chat system in {reference_system_dir('stage1', preset).parent}; train one "
                            "with `m2chat-lite train --preset tiny --stage all`")


def story_frames(message: dict) -> tuple[list[str], list]:
    """A reply's ``(sentences, pictures)``: each picture with the words written before it (for
    ``plotting.show_story``); words after the last picture are left out."""
    sentences, pictures, words = [], [], []
    content = message["content"]
    for segment in [{"type": "text", "text": content}] if isinstance(content, str) else content:
        if segment["type"] == "text":
            words.append(segment["text"])
        else:
            sentences.append(" ".join(words))
            pictures.append(segment["image"])
            words = []
    return sentences, pictures


def user_message(text: str = "", image=None) -> dict:
    """A user message with optional picture (a PIL picture or a file path), the picture first."""
    content = ([{"type": "image", "image": image}] if image is not None else []) + \
        ([{"type": "text", "text": text}] if text else [])
    return {"role": "user", "content": content}
