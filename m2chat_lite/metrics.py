"""Metrics: how good are the pictures and the words? Each one small, documented, tested on known answers.

Taught in notebook ``10_evaluation_and_ablations``; ``evaluation.py`` runs them as suites.

Pictures as a distribution
    ``frechet_distance`` between two sets of feature vectors; ``fid`` computes it on the tiny CLIP's image
    features (FID's recipe with our own encoder: comparable between rows of one table, not with published
    FIDs); ``inception_fid`` uses the standard Inception features through ``torchmetrics`` when its
    weights are already on this machine, and says why it is skipped otherwise (nothing is downloaded).

Pictures against what was asked (the ShapeWorld oracle reads the scene back from the pixels)
    ``scene_scores``: per attribute and fully right; ``story_scores``: each frame against its scene
    (*alignment*) and whether the story's character keeps its identity, shape and colour, from frame to
    frame (*consistency*); ``edit_scores``: after a dialogue edit, are the changed objects drawn as asked
    (*edit success*) and the untouched ones kept (*preservation*)?

Words
    ``exact_match`` for answers; ``bleu`` (corpus BLEU-4 with the brevity penalty, written out) for stories.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .data import image_to_tensor
from .encoders import encode_images
from .world import Obj, Scene, read_scene, score

# --------------------------------------------------------------------------------------------- FID


def frechet_distance(real: torch.Tensor | np.ndarray, fake: torch.Tensor | np.ndarray) -> float:
    """The Fréchet distance between Gaussians fitted to two sets of features ``[N, d]``:
    ``|μ₁ − μ₂|² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½)``. 0 for identical sets; it grows as the means and the
    spreads differ. Needs at least 2 rows in each set.

    ``tr((Σ₁ Σ₂)^½)`` is the sum of the square roots of the eigenvalues of ``Σ₁ Σ₂`` (real and not
    negative for two covariance matrices), which stays accurate when the covariances are singular, as
    they are with fewer pictures than feature dimensions."""
    a, b = (np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64) for x in (real, fake))
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise ValueError(f"frechet_distance needs two [N, d] feature sets with the same d and N >= 2; "
                         f"got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    root_trace = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)).sum()
    distance = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * root_trace
    return float(max(distance, 0.0))


def picture_batch(pictures) -> torch.Tensor:
    """Pictures (a PIL list, or already a tensor) as one ``[N, 3, H, W]`` tensor in [-1, 1]."""
    if isinstance(pictures, torch.Tensor):
        return pictures
    return torch.stack([image_to_tensor(p) for p in pictures])


@torch.no_grad()
def image_features(clip, pictures, batch_size: int = 100) -> torch.Tensor:
    """The tiny CLIP's image embeddings ``[N, d]`` of pictures (PIL list, or a tensor in [-1, 1])."""
    pictures = picture_batch(pictures)
    return torch.cat([encode_images(clip, pictures[i:i + batch_size])[1]
                      for i in range(0, len(pictures), batch_size)]).float().cpu()


def fid(clip, real_pictures, fake_pictures) -> float:
    """FID computed on the tiny CLIP's image features (lower is better; 0 = same distribution)."""
    return frechet_distance(image_features(clip, real_pictures), image_features(clip, fake_pictures))


INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"  # what torchmetrics' FID loads (via torch-fidelity)


def inception_fid(real_pictures, fake_pictures) -> tuple[float | None, str]:
    """The standard FID (Inception-v3 features, ``torchmetrics``), or ``None`` and the reason it was skipped:
    ``torchmetrics`` missing, or its Inception weights not in ``torch.hub``'s cache (they are never
    downloaded here)."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        return None, "skipped: torchmetrics is not installed (pip install torchmetrics torch-fidelity)"
    weights = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS
    if not weights.is_file():
        return None, f"skipped: the Inception weights are not in {weights.parent} (nothing is downloaded)"
    metric = FrechetInceptionDistance(feature=2048, normalize=True)
    for pictures, real in ((real_pictures, True), (fake_pictures, False)):
        metric.update((picture_batch(pictures) + 1) / 2, real=real)
    return float(metric.compute()), "Inception-v3 features (torchmetrics)"


# --------------------------------------------------------------------------------------------- the oracle

SCORE_KEYS = ("exact", "position", "shape", "color", "size", "count")


def scene_scores(pictures: Sequence, scenes: Sequence[Scene]) -> dict[str, float]:
    """The oracle's scores (``world.score``) of each picture against its scene, averaged, with ``n``."""
    if len(pictures) != len(scenes) or not scenes:
        raise ValueError(f"scene_scores needs one scene per picture; got {len(pictures)} pictures, {len(scenes)} scenes")
    rows = [score(picture, scene) for picture, scene in zip(pictures, scenes)]
    return {**{k: sum(r[k] for r in rows) / len(rows) for k in SCORE_KEYS}, "n": len(rows)}


def _has(objects: Sequence[Obj], shape: str, color: str) -> bool:
    return any(o.shape == shape and o.color == color for o in objects)


def story_scores(frames: Sequence, scenes: Sequence[Scene], character: Obj) -> dict[str, float]:
    """One illustrated story against its ground truth.

    ``alignment``: the oracle's scores of each frame against its scene (``exact`` and per attribute);
    ``consistency``: over the frames after the first, the fraction in which the character appears with
    its shape and its colour at that point of the story (a story may change the colour; the shape never
    changes), read anywhere in the picture. ``character`` is the story's hero as first drawn."""
    if len(frames) != len(scenes) or len(frames) < 2:
        raise ValueError(f"a story needs one scene per frame and at least 2 frames; got {len(frames)} and {len(scenes)}")
    kept = []
    for frame, scene in zip(frames[1:], scenes[1:]):
        hero = [o for o in scene if o.shape == character.shape]
        if not hero:
            raise ValueError(f"the story's character ({character.shape}) is missing from a ground-truth scene")
        kept.append(_has(read_scene(frame).objects, hero[0].shape, hero[0].color))
    return {"alignment": scene_scores(frames, scenes), "consistency": sum(kept) / len(kept), "frames": len(frames)}


def edit_scores(picture, before: Scene, after: Scene) -> dict[str, float | None]:
    """A dialogue edit: the picture drawn for ``after`` (``None``: none was drawn, so nothing is seen), the
    request made on ``before``.

    ``success``: the fraction of the objects the edit changed or added that the oracle reads exactly
    (cell, shape, colour, size); ``preservation``: the same for the objects the edit left alone (``None``
    if there are none); ``exact``: the whole scene right."""
    if picture is None:
        seen, exact = set(), 0.0
    else:
        seen, exact = set(read_scene(picture).objects), score(picture, after)["exact"]
    changed = [o for o in after if o not in before.objects]
    kept = [o for o in after if o in before.objects]
    return {"success": sum(o in seen for o in changed) / len(changed) if changed else None,
            "preservation": sum(o in seen for o in kept) / len(kept) if kept else None,
            "exact": exact}


# --------------------------------------------------------------------------------------------- words


def _normalise(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The fraction of predictions equal to their reference (case, surrounding space and a final full stop
    ignored)."""
    if len(predictions) != len(references) or not references:
        raise ValueError("exact_match needs one reference per prediction, and at least one")
    return sum(_normalise(p) == _normalise(r) for p, r in zip(predictions, references)) / len(references)


def bleu(candidates: Sequence[str], references: Sequence[str], max_n: int = 4) -> float:
    """Corpus BLEU (Papineni et al., 2002) on lower-cased words, one reference per candidate: the geometric
    mean of the clipped n-gram precisions for n = 1..``max_n``, times the brevity penalty
    ``exp(1 − r/c)`` when the candidates are shorter than the references. 1 for identical texts, 0 if
    some n has no match at all."""
    if len(candidates) != len(references) or not references:
        raise ValueError("bleu needs one reference per candidate, and at least one")
    matched, total = [0] * max_n, [0] * max_n
    cand_len = ref_len = 0
    for cand, ref in zip(candidates, references):
        c, r = _normalise(cand).split(), _normalise(ref).split()
        cand_len, ref_len = cand_len + len(c), ref_len + len(r)
        for n in range(1, max_n + 1):
            c_grams = Counter(tuple(c[i:i + n]) for i in range(len(c) - n + 1))
            r_grams = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            matched[n - 1] += sum(min(k, r_grams[g]) for g, k in c_grams.items())
            total[n - 1] += max(len(c) - n + 1, 0)
    if cand_len == 0 or min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matched, total)) / max_n
    brevity = 1.0 if cand_len > ref_len else math.exp(1 - ref_len / cand_len)
    return brevity * math.exp(log_precision)
