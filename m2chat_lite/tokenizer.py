"""The tokenizer: text to ids, chat turns to a labelled sequence, and the special tokens M²Chat needs.

Taught in notebook ``03_language_model`` (and used from ``01_shapeworld`` to show how an interleaved
sample becomes tokens).

The special tokens
------------------
- ``<image>`` is an image *in* the context. The tokenizer only writes the placeholder; the model
  replaces its embedding with (gated) image features, so it is never a prediction target.
- ``[IMG0] ... [IMG{K-1}]`` (``image_gen_tokens(K)``) is an image the model *writes*: the LM learns to
  emit these K tokens where a picture belongs, and their hidden states condition the image generator.
- ``<|system|>``, ``<|user|>``, ``<|assistant|>`` start a turn, ``<|end|>`` ends it (and is the eos:
  generation stops there), ``<|begin|>`` is the bos and ``<|pad|>`` the padding token.

The chat template
-----------------
A turn renders as ``<|role|>\\n`` + content + ``<|end|>\\n``, after one ``<|begin|>``; with
``add_generation_prompt=True`` the prompt ends with ``<|assistant|>\\n``. Content is a string or a list of
segments ``{"type": "text", "text": ...}`` / ``{"type": "image"}``. An image in a system or user turn
renders as ``<image>``. An image in an assistant turn renders as ``[IMG0]...[IMG{K-1}]<image>``: the
model writes the span, the generator draws the picture, and the generated picture is then fed back into
the context at ``<image>``, so later turns can refer to it ("now make it blue"). This is this package's
choice: the paper (see ``reference/M2CHAT_METHOD.md``) says the generated image goes back into the
context, but not with which token.

Labels and safety (``encode_chat``)
-----------------------------------
Only the assistant's own tokens are trained (its content, including ``[IMGk]`` spans, and its
end-of-turn token, so the LM learns when to draw and when to stop); everything else is ``-100``, and so is
every ``<image>``. ``encode_chat`` works with our template and with any tokenizer's own template (e.g. a
ChatML one from a pretrained checkpoint, after ``add_m2chat_tokens``). Text typed by a person is always
tokenized as plain text: a user who types ``"<image>"`` or ``"<|assistant|>"`` gets the characters, never
the special token.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# transformers 5 renamed `additional_special_tokens` to `extra_special_tokens` (4.x used that name for a dict)
_EXTRA = "extra_special_tokens" if int(transformers.__version__.split(".")[0]) >= 5 else "additional_special_tokens"

IMAGE_TOKEN = "<image>"
BOS_TOKEN = "<|begin|>"
END_TOKEN = "<|end|>"  # end of a turn, and the eos
PAD_TOKEN = "<|pad|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {role: f"<|{role}|>" for role in ROLES}
IGNORE_INDEX = -100  # label value that the cross-entropy loss skips


def image_gen_tokens(k: int) -> list[str]:
    """The K tokens the LM writes for an image it generates: ``["[IMG0]", ..., f"[IMG{k-1}]"]``."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"The number of image tokens must be a positive int, got {k!r}; M²Chat uses 4 or 8.")
    return [f"[IMG{i}]" for i in range(k)]


def make_chat_template(num_image_tokens: int = 4) -> str:
    """The Jinja chat template of our tokenizer, with the generation span ``[IMG0..K-1]`` written in."""
    span = "".join(image_gen_tokens(num_image_tokens))
    roles = ", ".join(f"'{role}': '{token}'" for role, token in ROLE_TOKENS.items())
    return (
        "{%- set role_tokens = {" + roles + "} -%}\n"
        "{{- bos_token -}}\n"
        "{%- for message in messages -%}\n"
        "  {%- if message['role'] not in role_tokens -%}\n"
        "    {{- raise_exception('Unknown role ' + message['role'] + '; use system, user or assistant.') -}}\n"
        "  {%- endif -%}\n"
        "  {{- role_tokens[message['role']] + '\\n' -}}\n"
        "  {%- if message['content'] is string -%}\n"
        "    {{- message['content'] -}}\n"
        "  {%- else -%}\n"
        "    {%- for segment in message['content'] -%}\n"
        "      {%- if segment['type'] == 'text' -%}\n"
        "        {{- segment['text'] -}}\n"
        "      {%- elif segment['type'] == 'image' -%}\n"
        f"        {{%- if message['role'] == 'assistant' -%}}{{{{- '{span}' -}}}}{{%- endif -%}}\n"
        f"        {{{{- '{IMAGE_TOKEN}' -}}}}\n"
        "      {%- endif -%}\n"
        "    {%- endfor -%}\n"
        "  {%- endif -%}\n"
        f"  {{{{- '{END_TOKEN}\\n' -}}}}\n"
        "{%- endfor -%}\n"
        f"{{%- if add_generation_prompt -%}}{{{{- '{ROLE_TOKENS['assistant']}\\n' -}}}}{{%- endif -%}}\n"
    )


def _special_tokens(num_image_tokens: int) -> list[str]:
    # A fixed order, so the ids are the same for every corpus: pad=0, bos=1, the roles 2-4, eos=5, ...
    # eos must not be id 2: transformers' CLIP text model treats eos_token_id == 2 as a legacy config and
    # then pools at the largest token id instead of at the end token (the tiny CLIP of notebook 02).
    return [PAD_TOKEN, BOS_TOKEN, *ROLE_TOKENS.values(), END_TOKEN, IMAGE_TOKEN, *image_gen_tokens(num_image_tokens)]


def train_tokenizer(
    texts: Iterable[str], vocab_size: int = 512, num_image_tokens: int = 4
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts`` and return it with M²Chat's special tokens and template.

    Byte-level means every string (any language, emoji, newlines) encodes without unknown tokens and
    decodes back exactly. Training is deterministic: the same texts give the same vocabulary.
    """
    specials = _special_tokens(num_image_tokens)
    if vocab_size < 256 + len(specials):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE needs 256 byte tokens plus "
            f"{len(specials)} special tokens; use vocab_size >= {256 + len(specials)} (512 is the tiny default)."
        )

    def checked(texts):
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"train_tokenizer needs strings, but item {i} is a {type(text).__name__}: {text!r}")
            yield text

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,  # also registered as special added tokens of `backend`
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(checked(texts), trainer)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=END_TOKEN,
        pad_token=PAD_TOKEN,
        **{_EXTRA: [t for t in specials if t not in (PAD_TOKEN, BOS_TOKEN, END_TOKEN)]},  # roles, <image>, [IMGk]
        clean_up_tokenization_spaces=False,  # keep decode(encode(text)) == text
    )
    tokenizer.chat_template = make_chat_template(num_image_tokens)
    return tokenizer


def _count_image_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    added = tokenizer.get_added_vocab()
    k = 0
    while f"[IMG{k}]" in added:
        k += 1
    return k


def num_image_tokens(tokenizer: PreTrainedTokenizerBase) -> int:
    """K, the length of the ``[IMG0..K-1]`` span this tokenizer knows (0 if it has none)."""
    return _count_image_tokens(tokenizer)


def add_m2chat_tokens(tokenizer: PreTrainedTokenizerBase, num_image_tokens: int = 4) -> int:
    """Add ``<image>``, ``[IMG0..K-1]`` (and ``<|pad|>`` if there is no pad token) to any tokenizer.

    The tokenizer keeps its own chat template. Returns how many tokens were added, so the caller can
    ``model.resize_token_embeddings(len(tokenizer))``. Calling it again with the same K adds nothing.
    """
    wanted = [IMAGE_TOKEN, *image_gen_tokens(num_image_tokens)]
    have = _count_image_tokens(tokenizer)
    if have > num_image_tokens:
        raise ValueError(
            f"This tokenizer already has {have} image tokens [IMG0..{have - 1}], but num_image_tokens="
            f"{num_image_tokens} was asked for; use num_image_tokens={have} (K must match the model)."
        )
    known = tokenizer.get_added_vocab()
    new = [token for token in wanted if token not in known]
    special = {_EXTRA: new} if new else {}
    if tokenizer.pad_token is None:
        special["pad_token"] = PAD_TOKEN
    return tokenizer.add_special_tokens(special, **{f"replace_{_EXTRA}": False})


def _as_segments(message, index: int) -> tuple[str, list[dict]]:
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ValueError(f"Message {index} must be a dict with 'role' and 'content', got {message!r}.")
    role, content = message["role"], message["content"]
    if role not in ROLES:
        raise ValueError(f"Message {index} has unknown role {role!r}; valid roles are {', '.join(ROLES)}.")
    if isinstance(content, str):
        return role, [{"type": "text", "text": content}]
    if not isinstance(content, (list, tuple)):
        raise ValueError(
            f"Message {index} content must be a string or a list of segments, got {type(content).__name__}."
        )
    for segment in content:
        kind = segment.get("type") if isinstance(segment, dict) else None
        if kind == "text" and isinstance(segment.get("text"), str):
            continue
        if kind != "image":
            raise ValueError(
                f"Message {index} has a bad segment {segment!r}; use {{'type': 'text', 'text': str}} "
                "or {'type': 'image'}."
            )
    return role, list(content)


def _sentinels(used: set[str]):
    """Private-use characters that appear in no text of the conversation, one per text segment."""
    for code in range(0xE000, 0xF900):
        if chr(code) not in used:
            yield chr(code)
    raise ValueError("This conversation has too many text segments (over 6000); split it into shorter ones.")


def encode_chat(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict],
    add_generation_prompt: bool = False,
    max_length: int | None = None,
) -> dict[str, list[int]]:
    """Tokenize a conversation with the tokenizer's chat template and label the assistant's tokens.

    Returns ``input_ids``, ``labels`` (``-100`` except on assistant content and its end-of-turn token;
    always ``-100`` on ``<image>``) and ``image_positions`` (the indices of the ``<image>`` tokens).

    How: each message is flattened into a string where images become ``<image>`` (or
    ``[IMG0..K-1]<image>`` in assistant turns) and each run of text becomes one private-use sentinel
    character; the template renders that; the rendered string is cut at the sentinels (the person's text
    goes back in, tokenized with ``split_special_tokens=True``) and at the assistant spans, found by
    rendering the conversation up to each assistant turn.
    """
    if not messages:
        raise ValueError("encode_chat needs at least one message, e.g. [{'role': 'user', 'content': 'hi'}].")
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("This tokenizer has no chat template; use train_tokenizer() or a chat (instruct) checkpoint.")
    parsed = [_as_segments(message, i) for i, message in enumerate(messages)]

    k = _count_image_tokens(tokenizer)
    has_images = any(segment["type"] == "image" for _, segments in parsed for segment in segments)
    if has_images and (k == 0 or IMAGE_TOKEN not in tokenizer.get_added_vocab()):
        raise ValueError("This tokenizer has no <image>/[IMGk] tokens; call add_m2chat_tokens(tokenizer, K) first.")
    gen_span = "".join(image_gen_tokens(k)) if k else ""

    used = {char for _, segments in parsed for s in segments if s["type"] == "text" for char in s["text"]}
    free = _sentinels(used)
    texts: dict[str, str] = {}  # sentinel -> the text it stands for
    flat = []
    for role, segments in parsed:
        parts, run = [], []
        for segment in segments + [None]:  # None flushes the last run of text
            if segment is not None and segment["type"] == "text":
                run.append(segment["text"])
                continue
            if "".join(run):  # adjacent text segments are one piece, as the template would join them
                sentinel = next(free)
                texts[sentinel] = "".join(run)
                parts.append(sentinel)
            run = []
            if segment is not None:
                parts.append(gen_span + IMAGE_TOKEN if role == "assistant" else IMAGE_TOKEN)
        flat.append({"role": role, "content": "".join(parts)})

    def render(msgs, generation_prompt):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)

    full = render(flat, add_generation_prompt)
    spans = [_assistant_span(render, flat, i, full) for i, m in enumerate(flat) if m["role"] == "assistant"]

    cuts = {0, len(full)}
    for start, end in spans:
        cuts.update((start, end))
    for i, char in enumerate(full):
        if char in texts:
            cuts.update((i, i + 1))
    cuts = sorted(cuts)

    image_id = tokenizer.get_added_vocab().get(IMAGE_TOKEN)
    input_ids, labels = [], []
    for a, b in zip(cuts, cuts[1:]):
        piece = full[a:b]
        if piece in texts:  # a person's text: never a special token
            ids = tokenizer(texts[piece], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        else:  # structure written by the template: special tokens are recognised
            ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
        trained = any(start <= a and b <= end for start, end in spans)
        input_ids += ids
        labels += [i if trained and i != image_id else IGNORE_INDEX for i in ids]

    if max_length is not None and len(input_ids) > max_length:
        raise ValueError(
            f"The conversation is {len(input_ids)} tokens long, over max_length={max_length}; drop early turns "
            "or images, split it into shorter conversations, or raise max_length."
        )
    image_positions = [i for i, token in enumerate(input_ids) if token == image_id]
    return {"input_ids": input_ids, "labels": labels, "image_positions": image_positions}


def _assistant_span(render, flat: list[dict], i: int, full: str) -> tuple[int, int]:
    """Character span of assistant turn ``i`` in ``full``: its content and end-of-turn, not its header."""
    upto = render(flat[: i + 1], False)
    if not full.startswith(upto):
        raise ValueError(
            "This chat template renders a conversation differently from its beginning (e.g. it rewrites earlier "
            "turns), so encode_chat cannot find the assistant turns; use a template that appends turns."
        )
    start = -1
    if i > 0:
        prompt = render(flat[:i], True)  # everything up to and including the assistant header
        if upto.startswith(prompt):
            start = len(prompt)
    if start < 0:  # first message, or a generation prompt unlike the header: look for the content itself
        content = flat[i]["content"]
        if not content:
            raise ValueError(f"Assistant message {i} is empty; give it some text or an image.")
        start = upto.find(content, len(render(flat[:i], False)) if i > 0 else 0)
        if start < 0:
            raise ValueError(f"The chat template does not write the content of assistant message {i}.")
    end = len(upto.rstrip())  # structural whitespace after the end-of-turn token is not a target
    return start, max(start, end)


def decode_reply(tokenizer: PreTrainedTokenizerBase, ids) -> str:
    """Decode generated ids up to the first end-of-turn, keeping ``[IMGk]`` and ``<image>`` visible."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    stops = {tokenizer.eos_token_id, tokenizer.get_added_vocab().get(END_TOKEN)} - {None}
    hidden = {tokenizer.pad_token_id, tokenizer.bos_token_id} - {None}
    reply = []
    for token in ids:
        if token in stops:
            break
        if token not in hidden:
            reply.append(token)
    return tokenizer.decode(reply, skip_special_tokens=False)


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer saved with ``save_pretrained`` and check it has M²Chat's tokens and a chat template."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(
            f"No tokenizer folder at {path}. Train one with train_tokenizer(...) (or call add_m2chat_tokens on a "
            "pretrained one) and save it with tokenizer.save_pretrained(path)."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:
        raise ValueError(
            f"Could not load a tokenizer from {path} ({type(error).__name__}: {error}). The folder should hold "
            "tokenizer.json and tokenizer_config.json written by save_pretrained; save the tokenizer again."
        ) from error
    if IMAGE_TOKEN not in tokenizer.get_added_vocab() or _count_image_tokens(tokenizer) == 0:
        raise ValueError(
            f"The tokenizer in {path} has no {IMAGE_TOKEN}/[IMG0..] tokens; call add_m2chat_tokens(tokenizer, K), "
            "resize the model's embeddings and save both again."
        )
    if tokenizer.chat_template is None:
        raise ValueError(f"The tokenizer in {path} has no chat template; set tokenizer.chat_template and save again.")
    return tokenizer
