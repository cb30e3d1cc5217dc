"""The M³Adapter: from the LM's hidden states (and the picture in context) to the generator's conditioning.

Taught in notebook ``06_m3adapter``; trained by M³FT stage 1 (``m3ft.py``, notebook 07). Written by hand,
because this is the part of M²Chat a student should see built:

- **N learnable queries** ``[N, d]``, one per position of the generator's ``prompt_embeds``;
- a **semantic branch**: ``L`` blocks of cross-attention from the queries to the LM's hidden states (input
  embeddings and last layer side by side, ``m3ft.LM_LAYERS``)
  over the span that asks for the picture (the words before it and the ``[IMG0..K-1]`` tokens,
  located by token ids: ``condition_span``), each block ``x + Attn(LN(x), mem)`` then ``x + FFN(LN(x))``;
  the memory gets a learned embedding per position, so queries can address words by place as well as content;
- a **visual branch**: the same blocks over *low-level* patch features (an early layer of the vision
  encoder) of the **reference picture**, the most recent picture in the conversation, given or drawn;
  a row with none skips the branch (its output is zero and its gate 0);
- a **gate** ``g`` that fuses them, ``fused = semantic + g · visual``, in one of four modes:

  ========== ===================================================================================
  ``off``       ``g = 0``: the visual branch is ignored (a GILL-style mapper)
  ``static``    ``g = tanh(a)`` with one learned number ``a``, 0 at first
  ``adaptive``  ``g = tanh(w · [semantic ; visual] + b)`` per query, computed from the context
                (``w``, ``b`` start at 0, so it starts closed too)
  ``fixed``     ``g`` = a value you choose (``gate_value``), to sweep creativity against consistency
  ========== ===================================================================================

- two **outputs** in the generator's text-encoder space: the sequence ``[B, N, d_ctx]``
  (``prompt_embeds``) and a pooled vector ``[B, d_pool]`` (mean over the queries, then a linear layer).

Every call returns the gate it used (``[B, N]``, zero where there was no reference picture), so it can be
logged with each image and plotted. Design notes and the official code's defects it avoids are in
``reference/M2CHAT_METHOD.md``: the queries here are trained, and the span is found by token ids.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .checkpoints import save_folder

GATE_MODES = ("off", "static", "adaptive", "fixed")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter.safetensors"


@dataclass
class AdapterConfig:
    lm_dim: int  # width of the LM's hidden states
    vision_dim: int  # width of the vision encoder's patch features
    cond_dim: int  # width of the generator's prompt_embeds
    pooled_dim: int  # width of the pooled embedding
    num_queries: int = 40  # N, the length of prompt_embeds
    num_layers: int = 2  # cross-attention blocks per branch
    num_heads: int = 4
    gate_mode: str = "adaptive"
    gate_value: float = 0.5  # the gate in "fixed" mode
    semantic_positions: int = 64  # longest span of LM states the semantic branch reads
    visual_positions: int = 65  # patch features per reference picture (class token + 8x8 patches)
    visual_reads_words: bool = False  # the visual branch also reads the LM's span (zero-initialised way in)

    def __post_init__(self):
        if self.gate_mode not in GATE_MODES:
            raise ValueError(f"unknown gate mode {self.gate_mode!r}; choose one of {', '.join(GATE_MODES)}")
        if self.cond_dim % self.num_heads:
            raise ValueError(f"cond_dim ({self.cond_dim}) must be divisible by num_heads ({self.num_heads})")
        for name in ("lm_dim", "vision_dim", "cond_dim", "pooled_dim", "num_queries", "num_layers", "num_heads",
                     "semantic_positions", "visual_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not -1.0 <= float(self.gate_value) <= 1.0:
            raise ValueError(f"gate_value must be in [-1, 1], got {self.gate_value}")


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention then a feed-forward layer, each with a residual connection."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.norm_query, self.norm_memory = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_mask: torch.Tensor,
                need_weights: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x [B, N, d]`` attends to ``memory [B, M, d]`` where ``memory_mask [B, M]`` is True."""
        attended, weights = self.attention(self.norm_query(x), self.norm_memory(memory), self.norm_memory(memory),
                                           key_padding_mask=~memory_mask, need_weights=need_weights,
                                           average_attn_weights=True)
        x = x + attended
        return x + self.ffn(self.norm_ffn(x)), weights


def check_length(memory: torch.Tensor, positions: nn.Parameter) -> None:
    if memory.shape[1] > len(positions):
        raise ValueError(f"the memory has {memory.shape[1]} positions but this branch was built for at most "
                         f"{len(positions)}; shorten the span or raise the adapter's *_positions")


class Branch(nn.Module):
    """Project a memory to the adapter's width and add a learned embedding of each memory position (so a
    query can ask for "the third word of the span" or "the top-left patch", not only for content), then
    ``num_layers`` cross-attention blocks from the queries.

    With ``words_dim`` the branch reads a second memory beside the first (the visual branch: the picture's
    patches and the LM's span, so "the square" can find the square among the patches). Its projection starts
    at zero, so at step 0 the branch reads the words as nothing but a position."""

    def __init__(self, memory_dim: int, dim: int, num_layers: int, num_heads: int, max_positions: int,
                 words_dim: int | None = None, word_positions: int = 0):
        super().__init__()
        self.project = nn.Linear(memory_dim, dim)
        self.positions = nn.Parameter(torch.zeros(max_positions, dim))
        self.blocks = nn.ModuleList(CrossAttentionBlock(dim, num_heads) for _ in range(num_layers))
        if words_dim is not None:
            self.project_words = nn.Linear(words_dim, dim)
            nn.init.zeros_(self.project_words.weight)
            nn.init.zeros_(self.project_words.bias)
            self.word_positions = nn.Parameter(torch.zeros(word_positions, dim))

    def forward(self, queries, memory, memory_mask, need_weights=False, words=None, words_mask=None):
        check_length(memory, self.positions)
        memory = self.project(memory) + self.positions[:memory.shape[1]]
        if words is not None:
            check_length(words, self.word_positions)
            memory = torch.cat([memory, self.project_words(words) + self.word_positions[:words.shape[1]]], 1)
            memory_mask = torch.cat([memory_mask, words_mask.bool()], 1)
        attention = []
        x = queries
        for block in self.blocks:
            x, weights = block(x, memory, memory_mask, need_weights)
            attention.append(weights)
        return x, attention


@dataclass
class AdapterOutput:
    prompt_embeds: torch.Tensor  # [B, N, cond_dim]: the generator's prompt_embeds
    pooled: torch.Tensor  # [B, pooled_dim]
    gate: torch.Tensor  # [B, N]: the gate used for each query (0 where there was no reference picture)
    attention: dict | None = None  # {"semantic": [layers of B x N x M], "visual": [...]}, if asked for
    visual_embeds: torch.Tensor | None = None  # [B, N, cond_dim]: the visual branch alone through the output head


class M3Adapter(nn.Module):
    """Learnable queries, a semantic and a visual cross-attention branch, a gate, two outputs."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        self.config = config
        d = config.cond_dim
        self.queries = nn.Parameter(torch.randn(config.num_queries, d) * 0.02)
        self.semantic = Branch(config.lm_dim, d, config.num_layers, config.num_heads, config.semantic_positions)
        self.visual = Branch(config.vision_dim, d, config.num_layers, config.num_heads, config.visual_positions,
                             *((config.lm_dim, config.semantic_positions) if config.visual_reads_words else ()))
        self.static_gate = nn.Parameter(torch.zeros(()))  # "static": tanh(0) = 0 at first
        self.adaptive_gate = nn.Linear(2 * d, 1)  # "adaptive": zero-initialised, so it starts closed too
        nn.init.zeros_(self.adaptive_gate.weight)
        nn.init.zeros_(self.adaptive_gate.bias)
        self.norm_out = nn.LayerNorm(d)
        self.to_sequence = nn.Linear(d, d)
        self.to_pooled = nn.Linear(d, config.pooled_dim)
        # with visual_reads_words: True hides the words from the visual branch, which then computes exactly
        # what an adapter without them would (M³FT stage 1 opens them part-way: m3ft.train_stage1)
        self.words_closed = False

    @property
    def gate_mode(self) -> str:
        return self.config.gate_mode

    def set_gate(self, mode: str, value: float | None = None) -> None:
        """Switch the gate mode (and the fixed value) of a trained adapter, e.g. to sweep it."""
        self.config = AdapterConfig(**{**asdict(self.config), "gate_mode": mode,
                                       "gate_value": self.config.gate_value if value is None else value})

    def gate(self, semantic: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """The gate ``[B, N]`` for the current mode."""
        b, n = semantic.shape[:2]
        mode = self.config.gate_mode
        if mode == "off":
            return semantic.new_zeros(b, n)
        if mode == "fixed":
            return semantic.new_full((b, n), float(self.config.gate_value))
        if mode == "static":
            return torch.tanh(self.static_gate).expand(b, n)
        return torch.tanh(self.adaptive_gate(torch.cat([semantic, visual], -1))).squeeze(-1)

    def forward(self, hidden: torch.Tensor, hidden_mask: torch.Tensor, visual: torch.Tensor | None = None,
                visual_mask: torch.Tensor | None = None, has_reference: torch.Tensor | None = None,
                return_attention: bool = False, return_visual: bool = False) -> AdapterOutput:
        """``hidden [B, S, lm_dim]`` with ``hidden_mask [B, S]`` (the LM's states over the condition span);
        ``visual [B, P, vision_dim]`` with ``visual_mask [B, P]`` (the reference picture's patch features) and
        ``has_reference [B]`` (False where the conversation has no picture yet). ``return_visual``: also the
        visual branch's output alone through the output head (``visual_embeds``: what the picture says by itself,
        which M³FT stage 1's reference term scores)."""
        b = hidden.shape[0]
        if hidden_mask.shape != hidden.shape[:2] or not hidden_mask.any(1).all():
            raise ValueError("hidden_mask must be [B, S] with at least one True per row (the [IMG] span)")
        queries = self.queries.expand(b, -1, -1)
        semantic, semantic_attention = self.semantic(queries, hidden, hidden_mask.bool(), return_attention)
        if visual is None:
            has_reference = torch.zeros(b, dtype=torch.bool, device=hidden.device)
            visual_out, visual_attention = torch.zeros_like(semantic), None
        else:
            has_reference = (torch.ones(b, dtype=torch.bool, device=hidden.device) if has_reference is None
                             else has_reference.bool().to(hidden.device))
            mask = torch.ones(visual.shape[:2], dtype=torch.bool, device=hidden.device) if visual_mask is None \
                else visual_mask.bool()
            reads_words = self.config.visual_reads_words and not self.words_closed
            words = (hidden, hidden_mask) if reads_words else (None, None)
            visual_out, visual_attention = self._visual_branch(queries, visual, mask, has_reference, words,
                                                               return_attention)
        gate = self.gate(semantic, visual_out) * has_reference[:, None]
        fused = semantic + gate.unsqueeze(-1) * visual_out
        fused = self.norm_out(fused)
        attention = {"semantic": semantic_attention, "visual": visual_attention} if return_attention else None
        visual_embeds = self.to_sequence(self.norm_out(visual_out)) if return_visual else None
        return AdapterOutput(self.to_sequence(fused), self.to_pooled(fused.mean(1)), gate, attention, visual_embeds)

    def _visual_branch(self, queries, visual, mask, has_reference, words, return_attention):
        """The visual branch on the rows that have a reference picture; zeros (output and attention) on the
        rows that have none, whose gate is 0 anyway. Skipping those rows computes exactly what running the
        branch on every row and zeroing them would, for about half the cost in stage 1, where about half the
        examples have no picture before theirs (``benchmarks/M2CHAT_RECIPE.md``, "The visual branch only
        where there is a picture")."""
        if bool(has_reference.all()):
            return self.visual(queries, visual, mask, return_attention, *words)
        rows = has_reference.nonzero().flatten()
        out = torch.zeros_like(queries)
        attention = None
        if len(rows):  # (not run on an empty batch: nn.MultiheadAttention cannot return its weights for one)
            words = tuple(w[rows] if w is not None else None for w in words)
            part, part_attention = self.visual(queries[rows], visual[rows], mask[rows], return_attention, *words)
            out = out.index_copy(0, rows, part)
            if return_attention:
                attention = [w.new_zeros(len(queries), *w.shape[1:]).index_copy(0, rows, w) for w in part_attention]
        if return_attention and attention is None:  # no row has a picture: nothing was read
            positions = visual.shape[1] + (words[0].shape[1] if words[0] is not None else 0)
            attention = [queries.new_zeros(len(queries), queries.shape[1], positions)] * len(self.visual.blocks)
        return out, attention

    # --- saving and loading ------------------------------------------------------------------------

    def save_pretrained(self, folder, dtype: torch.dtype | None = None) -> Path:
        """``adapter_config.json`` + ``adapter.safetensors``, written all or nothing; ``dtype`` (e.g.
        ``torch.float16``, half the bytes) for the stored weights, which load back as float32."""
        from safetensors.torch import save_file

        def write(tmp: Path) -> None:
            (tmp / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))
            save_file({k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in self.state_dict().items()},
                      tmp / WEIGHTS_FILE)
        return save_folder(folder, write)

    @classmethod
    def from_pretrained(cls, folder, device: str = "cpu") -> "M3Adapter":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        redo = "save it again with adapter.save_pretrained(folder), or train one (m2chat-lite train --stage stage1)"
        missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (folder / f).is_file()]
        if missing:
            raise FileNotFoundError(f"no complete M³Adapter in {folder} (missing {', '.join(missing)}); {redo}")
        try:
            config = AdapterConfig(**json.loads((folder / CONFIG_FILE).read_text()))
            adapter = cls(config)
            adapter.load_state_dict(load_file(folder / WEIGHTS_FILE))
        except (ValueError, TypeError, RuntimeError, SafetensorError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot load the M³Adapter in {folder} ({type(error).__name__}: {error}); {redo}") \
                from error
        return adapter.to(device).eval()


# ---------------------------------------------------------------------------------------------
# Where the condition is: the span of hidden states the semantic branch reads
# ---------------------------------------------------------------------------------------------


def condition_span(input_ids: torch.Tensor, gen_token_ids: torch.Tensor, context_tokens: int = 32,
                   attention_mask: torch.Tensor | None = None) -> list[tuple[int, int, int]]:
    """Every complete ``[IMG0..K-1]`` span in a batch, found by token ids: ``(row, start, end)`` with
    ``end`` one past ``[IMG{K-1}]`` and ``start`` up to ``context_tokens`` earlier (the words that ask for
    the picture), never before the row's first real token. Spans are listed row by row, in order."""
    k = len(gen_token_ids)
    first, last = int(gen_token_ids[0]), int(gen_token_ids[-1])
    spans = []
    for row in range(input_ids.shape[0]):
        ids = input_ids[row]
        begin = 0 if attention_mask is None else int(attention_mask[row].float().argmax())
        for end in (ids == last).nonzero().flatten().tolist():
            start_img = end - k + 1
            if start_img < 0 or not torch.equal(ids[start_img:end + 1], gen_token_ids.to(ids.device)):
                raise ValueError(f"row {row}: [IMG{k - 1}] at position {end} is not the end of a whole "
                                 f"[IMG0..{k - 1}] span; the LM must write the span in order")
            spans.append((row, max(begin, start_img - context_tokens), end + 1))
        if int((ids == first).sum()) != int((ids == last).sum()):
            raise ValueError(f"row {row} has an incomplete [IMG0..{k - 1}] span")
    return spans


def gather_spans(hidden: torch.Tensor, spans: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden states of each span, right-padded: ``[n_spans, max_len, d]`` and a mask ``[n_spans, max_len]``."""
    width = max(end - start for _, start, end in spans)
    out = hidden.new_zeros(len(spans), width, hidden.shape[-1])
    mask = torch.zeros(len(spans), width, dtype=torch.bool, device=hidden.device)
    for i, (row, start, end) in enumerate(spans):
        out[i, :end - start], mask[i, :end - start] = hidden[row, start:end], True
    return out, mask
