"""The ablations of notebook 10 (ablations.py): one small variant rerun end to end, in the shipped JSON's format."""

import json
import math
from pathlib import Path

import pytest

from m2chat_lite import ablations
from m2chat_lite.benchmark import load_benchmark
from m2chat_lite.diffusion import TinyDiffusionPipeline, reference_pipeline_dir
from m2chat_lite.fusion import reference_fusion_dir

SHIPPED = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def generator():
    return TinyDiffusionPipeline.from_pretrained(reference_pipeline_dir("tiny"))


def small_benchmark():
    return (load_benchmark("story", split="test")[:2], load_benchmark("dialogue", split="test")[:2],
            load_benchmark("caption", split="test")[:4])


def check_row(row, shipped_row):
    assert set(row) == set(shipped_row)
    for key, value in row.items():
        rate = key.endswith(("_exact", "_consistency", "_success", "_preservation", "_recall", "_precision",
                             "_accuracy"))
        if rate and value is not None:
            assert 0 <= value <= 1, key
    assert math.isfinite(row["fid_tiny_clip"]) and row["fid_tiny_clip"] >= 0


@pytest.mark.slow
def test_a_gate_variant_reruns_in_the_shipped_format(generator):
    shipped = json.loads((SHIPPED / "ablations.json").read_text())
    stories, dialogues, captions = small_benchmark()
    pipe, info = ablations.train_gate_variant("off", 2, reference_fusion_dir("tiny"), generator, batch_size=4,
                                              pool_size=12)
    row = {"variant": "gate off (GILL-style mapper)", **info, **ablations.score(pipe, stories, dialogues, captions)}
    check_row(row, shipped["rows"][0])
    assert row["steps"] == 2 and row["story_gate_mean"] == 0  # no gate: the visual branch never reaches it
    again, _ = ablations.train_gate_variant("off", 2, reference_fusion_dir("tiny"), generator, batch_size=4,
                                            pool_size=12)
    assert ablations.score(again, stories, dialogues, captions) == {k: v for k, v in row.items() if k not in info
                                                                    and k != "variant"}  # same seed, same row


@pytest.mark.slow
def test_the_m3ft_variants_share_their_stage_1_and_score_the_written_side(generator):
    shipped = json.loads((SHIPPED / "m3ft_variants.json").read_text())
    stories, dialogues, captions = small_benchmark()
    questions = load_benchmark("vqa", split="test")[:4]
    runs = ablations.train_m3ft_variants(2, 1, reference_fusion_dir("tiny"), generator, batch_size=4, pool_size=12,
                                         variants=(ablations.NO_ALIGNMENT, "both stages (the recipe)", "stage 2 only"))
    seen, rows = [], {}
    for name, pipe, info in runs:
        rows[name] = {"variant": name, **info, **ablations.score(pipe, stories, dialogues, captions, questions)}
        check_row(rows[name], next(r for r in shipped["rows"] if r["variant"] == name))
        seen.append(name)
    # always in the order of M3FT_VARIANTS
    assert seen == ["stage 2 only", "both stages (the recipe)", ablations.NO_ALIGNMENT]
    recipe, no_alignment = rows["both stages (the recipe)"], rows[ablations.NO_ALIGNMENT]
    assert recipe["stage2_alignment_weight"] == 1 and no_alignment["stage2_alignment_weight"] == 0
    assert "alignment" in recipe["stage2_final"] and "alignment" not in no_alignment["stage2_final"]
    # both went on from one stage-1 system: the copy kept it, so their stage 1 is the same
    assert recipe["stage1_final"] == no_alignment["stage1_final"]
    with pytest.raises(ValueError, match="unknown M³FT variant"):
        next(ablations.train_m3ft_variants(1, 1, reference_fusion_dir("tiny"), generator, variants=("stage 3",)))
