"""benchmarks/kept_probe.py: where the objects an edit leaves alone are lost, on the shipped system's first dialogues."""

import importlib.util
import json
from pathlib import Path

import pytest

from m2chat_lite.benchmark import load_benchmark
from m2chat_lite.foundation import REFERENCE_DIR
from m2chat_lite.world.samples import scenes_of

# benchmarks/ is no package, and putting it on sys.path would shadow other modules (it holds a diffusion.py)
_spec = importlib.util.spec_from_file_location(
    "kept_probe", Path(__file__).resolve().parents[1] / "benchmarks" / "kept_probe.py")
kept_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kept_probe)


def test_every_object_an_edit_leaves_alone_is_looked_for_three_times(tmp_path):
    out = tmp_path / "kept.json"
    result = kept_probe.main(["--model", str(REFERENCE_DIR / "stage2"), "--limit", "4", "--json", str(out)])
    saved = json.loads(out.read_text())
    rows = saved["rows"]
    # one row per object the benchmark's edits keep: counted here from the scenes alone
    expected = 0
    for sample in load_benchmark("dialogue", split="test")[:4]:
        scenes = scenes_of(sample)
        expected += sum(o in before.objects for before, after in zip(scenes, scenes[1:]) for o in after)
    assert result["all"]["objects"] == len(rows) == expected > 0
    assert {row["kind"] for row in rows} <= {"add", "move", "recolor", "resize"}
    # the summary is the rows' own counts, and every object not drawn is lost at exactly one step
    assert result["all"]["drawn"] == pytest.approx(sum(r["drawn"] for r in rows) / len(rows))
    assert sum(result["lost_to"].values()) == sum(not r["drawn"] for r in rows)
    assert sum(s["objects"] for s in result["by_kind"].values()) == len(rows)


def test_a_generator_without_a_layout_planner_is_refused_with_a_reason():
    class NoPlanner:
        class generator:
            unet = object()

    with pytest.raises(ValueError, match="layout planner"):
        kept_probe.record_readings(NoPlanner())
