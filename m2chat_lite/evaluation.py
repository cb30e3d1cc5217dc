"""The benchmark harness: ``m2chat-lite eval --suite t2i|story|dialog|vqa|all`` (notebook 10).

Each suite runs a system (an :class:`~m2chat_lite.pipeline.M2ChatPipeline`) on the frozen benchmark split and
returns ``{metric: value}`` with the sample count and seed, using ``metrics.py``:

- ``t2i``: benchmark captions drawn through the LM, the adapter and the generator, beside the generator fed
  its own text encoder from the same noise (the upper-bound row): the oracle's scores, FID on the tiny
  CLIP's features against the benchmark's own pictures, CLIP score;
- ``story``: each benchmark story's words held fixed and its pictures drawn by the system
  (``pipeline.illustrate``): frame–sentence alignment, the character's consistency, the gate; the written
  part teacher-forced (loss, token accuracy, ``[IMG]`` placement) and, for ``text_samples`` stories, the
  story the system writes in its own words (greedy): its BLEU against the benchmark's, its frames, and each
  picture against what its own sentence says (``own_*``, read back by ``world.read_story``);
- ``dialog``: each benchmark dialogue illustrated the same way: the first picture against its scene,
  every later one as an edit of the one before (success on what changed, preservation of the rest), also
  split by the kind of edit and by the number of objects in the scene;
- ``chat``: the same dialogues, each picture turn answered by the system in its own words (free-running, greedy):
  the first picture and the edits scored as in ``dialog``, and how often the reply's words are the benchmark's;
- ``vqa``: exact answers to the visual questions, per kind and by how many objects the picture holds.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Sequence

from tqdm.auto import tqdm

from . import metrics
from .benchmark import load_benchmark
from .data import Image, Sample
from .world import Obj, read_story, score
from .world.samples import scenes_of

SUITES = ("t2i", "story", "dialog", "chat", "vqa")


def messages_of(sample: Sample, assistant_pictures: bool = False) -> list[dict]:
    """A benchmark conversation as pipeline messages: the user's pictures loaded, the assistant's pictures
    left empty (``{"type": "image"}``) for ``pipeline.illustrate`` to draw, or with ``assistant_pictures``
    loaded too (the benchmark's own renderings of its scenes, the context :func:`eval_chat` replies to)."""
    messages = []
    for turn in sample.turns:
        content = []
        for segment in turn.content:
            if isinstance(segment, Image):
                content.append({"type": "image"} if turn.role == "assistant" and not assistant_pictures
                               else {"type": "image", "image": segment.load()})
            else:
                content.append({"type": "text", "text": segment.text})
        messages.append({"role": turn.role, "content": content})
    return messages


def illustrate_two_step(pipe, messages: Sequence[dict], seed: int = 0) -> list[dict]:
    """The baseline a user would build without M²Chat: each picture the assistant draws is drawn from the
    words just before it (or, if there are none, the user's last words) by the generator with its own text
    encoder. No hidden states, no reference picture. Same noise as ``pipe.illustrate``."""
    import torch

    from .data import tensor_to_image

    done, drawn, last_user = [], 0, ""
    for message in messages:
        content = message["content"]
        if message["role"] == "user":
            last_user = content if isinstance(content, str) else " ".join(
                s.get("text", "") for s in content if s.get("type") == "text")
        if message["role"] != "assistant" or isinstance(content, str):
            done.append(message)
            continue
        segments, words = [], last_user
        for segment in content:
            if segment.get("type") == "text":
                words = segment["text"]
                segments.append(segment)
                continue
            noise = torch.randn(1, *pipe.generator.latent_shape,
                                generator=torch.Generator().manual_seed(seed * 1_000_003 + drawn))
            picture = pipe.generator(prompt=[words], latents=noise, output_type="pt")[0]
            segments.append({"type": "image", "image": tensor_to_image(picture), "gate": None})
            drawn += 1
        done.append({"role": "assistant", "content": segments})
    return done


def pictures_in_order(messages: Sequence[dict]) -> list[tuple[str, dict]]:
    """Every picture segment of ``messages`` with the role of its message, ``(role, segment)``, in the order of the
    conversation: the i-th is the benchmark's i-th scene (``scenes_of``)."""
    return [(m["role"], s) for m in messages if not isinstance(m["content"], str) for s in m["content"]
            if s["type"] == "image"]


def drawn_pictures(messages: Sequence[dict]) -> list[dict]:
    """The picture segments the assistant drew in ``messages`` (each ``{"image", "gate"}``), in order."""
    return [s for role, s in pictures_in_order(messages) if role == "assistant"]


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def eval_t2i(pipe, samples: Sequence[Sample], seed: int = 0) -> dict:
    from .diffusion import evaluate_generator
    from .encoders import clip_score
    from .m3ft import evaluate_alignment

    clip, tokenizer = pipe.generator.text_encoder, pipe.generator.tokenizer
    real = [s.images()[0].load() for s in samples]
    captions = [s.meta["caption"] for s in samples]
    rows = {"m2chat": evaluate_alignment(pipe.model, pipe.tokenizer, pipe.generator, samples, seed=seed,
                                         return_images=True),
            "teacher": evaluate_generator(pipe.generator, samples, seed=seed, return_images=True)}
    out = {}
    for name, r in rows.items():
        pictures = r.pop("images")
        out[name] = {"exact": r["all"]["all"]["exact"], "exact_1_object": r["all"]["1 object"]["exact"],
                     **{k: r["all"]["all"][k] for k in ("position", "shape", "color", "size", "count")},
                     "fid_tiny_clip": metrics.fid(clip, real, pictures),
                     "clip_score": clip_score(clip, tokenizer, metrics.picture_batch(pictures), captions),
                     "seconds_per_image": r["seconds_per_image"]}
    out["real_pictures_clip_score"] = clip_score(clip, tokenizer, metrics.picture_batch(real), captions)
    out["gap_exact_points"] = 100 * (out["teacher"]["exact"] - out["m2chat"]["exact"])
    return out


def _illustrate(pipe, sample: Sample, seed: int, two_step: bool) -> list[dict]:
    messages = messages_of(sample)
    return illustrate_two_step(pipe, messages, seed) if two_step else pipe.illustrate(messages, seed=seed)


def eval_story(pipe, samples: Sequence[Sample], seed: int = 0, text_samples: int = 20, progress: bool = True,
               two_step: bool = False) -> dict:
    """``two_step=True`` draws the frames with :func:`illustrate_two_step` (the baseline row)."""
    from .m3ft import teacher_forced_scores
    from .pipeline import story_frames

    rows, gates = [], []
    for sample in tqdm(samples, desc="stories", disable=not progress):
        drawn = drawn_pictures(_illustrate(pipe, sample, seed, two_step))
        rows.append(metrics.story_scores([s["image"] for s in drawn], scenes_of(sample), Obj(**sample.meta["character"])))
        gates += [s["gate"] for s in drawn[1:] if s["gate"] is not None]
    written = teacher_forced_scores(pipe.model.fused, pipe.tokenizer, list(samples))
    candidates, references, told = [], [], []
    for sample in list(samples)[:text_samples]:
        request = sample.turns[0].content[0].text
        reply = pipe.chat([{"role": "user", "content": request}], seed=seed)
        sentences, pictures = story_frames(reply.message)
        candidates.append(" ".join(sentences))
        references.append(" ".join(seg.text for seg in sample.turns[1].content if not isinstance(seg, Image)))
        told.append(own_story_scores(sentences, pictures))
    return {"alignment_exact": _mean(r["alignment"]["exact"] for r in rows),
            **{f"alignment_{k}": _mean(r["alignment"][k] for r in rows) for k in ("position", "shape", "color", "size")},
            "consistency": _mean(r["consistency"] for r in rows), "gate_mean": _mean(gates),
            "text_loss": written["loss"], "text_token_accuracy": written["token_accuracy"],
            "img_recall": written["img_recall"], "img_precision": written["img_precision"],
            "bleu_greedy_story": metrics.bleu(candidates, references) if candidates else None,
            "bleu_samples": len(candidates), "frames": sum(r["frames"] for r in rows),
            "frames_per_story": sum(r["frames"] for r in rows) / len(rows) if rows else None,
            **own_words_summary(told)}


def own_story_scores(sentences: Sequence[str], pictures: Sequence) -> dict:
    """A story the system wrote in its own words, scored against what its own sentences say
    (``world.read_story``): how many frames, how many of them can be read, each read frame's picture against
    its scene (the oracle's exact), and the character kept as in ``metrics.story_scores``."""
    scenes = read_story(sentences)
    read = sum(scene is not None for scene in scenes)  # the sentences read are a prefix of the story
    exact = [score(picture, scene)["exact"] for picture, scene in zip(pictures[:read], scenes[:read])]
    kept = None
    if read >= 2:
        kept = metrics.story_scores(pictures[:read], scenes[:read], scenes[0].objects[0])["consistency"]
    return {"frames": len(pictures), "read": read, "exact": exact, "consistency": kept}


def own_words_summary(told: Sequence[dict]) -> dict:
    """The ``own_*`` entries of the story suite: the greedy stories in the system's own words. A story of the
    same length every time, or one that stops making sense, shows here and nowhere else (the other story
    scores hold the benchmark's words fixed)."""
    if not told:
        return {}
    counts = Counter(str(t["frames"]) for t in told)
    frames = sum(t["frames"] for t in told)
    exact = [e for t in told for e in t["exact"]]
    return {"own_stories": len(told), "own_frames_per_story": frames / len(told),
            "own_frame_counts": dict(sorted(counts.items(), key=lambda kv: int(kv[0]))),
            "own_frames_read": sum(t["read"] for t in told) / frames if frames else None,
            "own_alignment_exact": _mean(exact), "own_consistency": _mean(t["consistency"] for t in told)}


def picture_kinds(sample: Sample) -> list[str]:
    """For each picture of a benchmark dialogue (in the order of ``scenes_of``), what made it: ``"upload"`` for
    a user's picture, else the kind of the user's turn before the reply that drew it (``"request"`` for a new
    picture, ``"move"``, ``"recolor"``, ``"resize"`` or ``"add"`` for an edit)."""
    turns = sample.meta["turns"]
    return [t["kind"] if t["kind"] == "upload" else turns[i - 1]["kind"]
            for i, t in enumerate(turns) if t["scene"] is not None]


def eval_dialog(pipe, samples: Sequence[Sample], seed: int = 0, progress: bool = True, two_step: bool = False) -> dict:
    """``two_step=True`` draws the pictures with :func:`illustrate_two_step` (the baseline row). Besides the
    means over all edits, ``edit_success_by_kind`` and ``edit_preservation_by_kind`` split them by what the
    user asked (move, recolor, resize, add), ``edit_*_by_objects`` by how many objects the edited scene
    holds, and ``edit_*_by_reference`` by the picture the edit starts from: the user's ``upload``, the system's
    ``first drawing``, or an ``earlier edit`` of the system's. Each edit is scored against the benchmark's scene
    before it, so an object lost in one edit is lost again in the next: the last group shows how misses
    compound over a conversation. Where the system fails, not only how often."""
    first, edits, gates = [], [], []
    for sample in tqdm(samples, desc="dialogues", disable=not progress):
        messages = _illustrate(pipe, sample, seed, two_step)
        scenes, kinds = scenes_of(sample), picture_kinds(sample)
        reference = None
        for index, (role, segment) in enumerate(pictures_in_order(messages)):
            if role == "assistant":
                if index == 0:
                    first.append(metrics.scene_scores([segment["image"]], [scenes[0]])["exact"])
                else:
                    edits.append({**metrics.edit_scores(segment["image"], scenes[index - 1], scenes[index]),
                                  "kind": kinds[index], "objects": len(scenes[index]), "reference": reference})
                    if segment["gate"] is not None:
                        gates.append(segment["gate"])
            reference = "upload" if role == "user" else "first drawing" if reference is None else "earlier edit"

    def split(key: str, by: str) -> dict:
        return {str(group): _mean(e[key] for e in edits if e[by] == group)
                for group in sorted({e[by] for e in edits}, key=str)}

    return {"first_picture_exact": _mean(first), "edit_success": _mean(e["success"] for e in edits),
            "edit_preservation": _mean(e["preservation"] for e in edits), "edit_exact": _mean(e["exact"] for e in edits),
            "edit_success_by_kind": split("success", "kind"), "edit_preservation_by_kind": split("preservation", "kind"),
            "edit_success_by_objects": split("success", "objects"),
            "edit_preservation_by_objects": split("preservation", "objects"),
            "edit_success_by_reference": split("success", "reference"),
            "edit_preservation_by_reference": split("preservation", "reference"),
            "gate_mean": _mean(gates), "edits": len(edits), "first_pictures": len(first)}


def eval_chat(pipe, samples: Sequence[Sample], seed: int = 0, progress: bool = True) -> dict:
    """Each benchmark dialogue's picture turns answered by the system **in its own words**: the conversation up
    to the user's request as the benchmark has it (its words, its pictures), then the reply the system writes
    (greedy) and the first picture it draws, scored by the oracle against the scene the user asked for, as
    :func:`eval_dialog` scores a picture drawn for the benchmark's words. The two suites side by side say
    whether a miss is in what the LM writes or in how the adapter and generator draw it. Also: how often the
    reply has a picture at all, and how often its words are the benchmark's reply (the templates are fixed, so a
    right reply is word for word)."""
    first, edits, words_right, drew = [], [], [], []
    for sample in tqdm(samples, desc="chats", disable=not progress):
        scenes, kinds = scenes_of(sample), picture_kinds(sample)
        conversation = messages_of(sample, assistant_pictures=True)  # each reply is to a prefix of it
        index = 0
        for position, turn in enumerate(sample.turns):
            pictures = [s for s in turn.content if isinstance(s, Image)]
            if turn.role == "assistant" and pictures:
                reply = pipe.chat(conversation[:position], seed=seed * 1_000_003 + index)
                drawn = reply.images
                said = " ".join(s["text"] for s in reply.message["content"] if s["type"] == "text")
                words_right.append(metrics.exact_match([said], [" ".join(s.text for s in turn.content
                                                                         if not isinstance(s, Image))]))
                drew.append(float(bool(drawn)))
                if index == 0:
                    first.append(metrics.scene_scores(drawn[:1], scenes[:1])["exact"] if drawn else 0.0)
                else:
                    edits.append({**metrics.edit_scores(drawn[0] if drawn else None, scenes[index - 1], scenes[index]),
                                  "kind": kinds[index]})
            index += len(pictures)
    return {"first_picture_exact": _mean(first), "edit_success": _mean(e["success"] for e in edits),
            "edit_preservation": _mean(e["preservation"] for e in edits), "edit_exact": _mean(e["exact"] for e in edits),
            "edit_success_by_kind": {k: _mean(e["success"] for e in edits if e["kind"] == k)
                                     for k in sorted({e["kind"] for e in edits})},
            "replies_with_a_picture": _mean(drew), "reply_words_exact": _mean(words_right),
            "edits": len(edits), "first_pictures": len(first)}


def eval_vqa(pipe, samples: Sequence[Sample]) -> dict:
    from .fusion import vqa_accuracy

    result = vqa_accuracy(pipe.model.fused, pipe.tokenizer, list(samples))
    return {"exact": metrics.exact_match(result["replies"], [s.meta["answer"] for s in samples]),
            **{f"exact_{kind}": value for kind, value in result["per_kind"].items()},
            "exact_by_objects": {str(n): value for n, value in result.get("per_objects", {}).items()}}


BENCHMARK_TASK = {"t2i": "caption", "story": "story", "dialog": "dialogue", "chat": "dialogue", "vqa": "vqa"}


def run(pipe, suites: Sequence[str] = SUITES, split: str = "test", limit: int | None = None, seed: int = 0,
        progress: bool = True) -> dict:
    """Run ``suites`` on the benchmark ``split`` (the first ``limit`` samples of each task, or all):
    ``{suite: {metric: value, "n": samples, "seconds": ...}, "meta": {...}}``."""
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"unknown suite {unknown[0]!r}; choose from {', '.join(SUITES)} or all")
    results = {"meta": {"split": split, "seed": seed, "limit": limit, "system": pipe.model.record}}
    for suite in suites:
        samples = load_benchmark(BENCHMARK_TASK[suite], split=split)[:limit]
        start = time.perf_counter()
        if suite == "t2i":
            scores = eval_t2i(pipe, samples, seed)
        elif suite == "story":
            scores = eval_story(pipe, samples, seed, progress=progress)
        elif suite == "dialog":
            scores = eval_dialog(pipe, samples, seed, progress=progress)
        elif suite == "chat":
            scores = eval_chat(pipe, samples, seed, progress=progress)
        else:
            scores = eval_vqa(pipe, samples)
        results[suite] = {**scores, "n": len(samples), "seed": seed, "seconds": time.perf_counter() - start}
    return results


def format_table(results: dict) -> str:
    """The results as a two-column text table, one block per suite (rows in the teacher/m2chat pairs
    flattened as ``m2chat.exact``)."""
    lines = []
    for suite, scores in results.items():
        if suite == "meta":
            continue
        lines.append(f"== {suite} ({scores['n']} samples, seed {scores['seed']}, {scores['seconds']:.0f} s) ==")
        for key, value in scores.items():
            if key in ("n", "seed", "seconds"):
                continue
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in items:
                name = f"{key}.{sub}" if sub else key
                shown = "—" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)
                lines.append(f"  {name:<34} {shown}")
    return "\n".join(lines)


def save_json(results: dict, path) -> None:
    from .utils import atomic_write_json

    atomic_write_json(path, json.loads(json.dumps(results, default=str)))
