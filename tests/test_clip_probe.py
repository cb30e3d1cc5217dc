"""benchmarks/clip_probe.py: the text-similarity table and the attribute probes, on a tiny random CLIP."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from m2chat_lite.config import get_config
from m2chat_lite.encoders import build_clip, save_clip
from m2chat_lite.tokenizer import train_tokenizer
from m2chat_lite.utils import set_seed
from m2chat_lite.world import text_corpus
from m2chat_lite.world.scene import Obj, Scene

# benchmarks/ is no package, and putting it on sys.path would shadow other modules (it holds a diffusion.py)
_spec = importlib.util.spec_from_file_location(
    "clip_probe", Path(__file__).resolve().parents[1] / "benchmarks" / "clip_probe.py")
clip_probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(clip_probe)

CONFIG = get_config("tiny", text_encoder_hidden_size=32, vision_hidden_size=32, vision_num_layers=1,
                    text_encoder_num_layers=1, pooled_dim=32, cond_dim=32)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    tok = train_tokenizer(text_corpus(100, seed=0), vocab_size=400, num_image_tokens=4)
    set_seed(0)
    folder = tmp_path_factory.mktemp("probe") / "clip"
    save_clip(build_clip(CONFIG, tok), tok, folder)
    return folder


def test_each_object_is_read_from_its_own_cell():
    scenes = [Scene((Obj(0, 2, "square", "blue", "small"), Obj(2, 1, "circle", "red", "large")))]
    cells = torch.eye(9).unsqueeze(0)  # cell i's feature is the i-th unit vector
    x, y = clip_probe.object_rows(scenes, cells, "shape")
    assert x.argmax(-1).tolist() == [2, 7] and y.tolist() == [1, 0]  # square, circle


def test_swapping_an_attribute_exchanges_it_between_the_two_objects():
    scene = Scene((Obj(0, 2, "square", "blue", "small"), Obj(2, 1, "circle", "red", "small")))
    colours = clip_probe.swapped(scene, "color")
    assert [(o.cell, o.shape, o.color) for o in colours] == [((0, 2), "square", "red"), ((2, 1), "circle", "blue")]
    assert clip_probe.swapped(scene, "size") is None  # both small: nothing to swap


def test_cell_labels_name_each_cell_and_leave_the_rest_empty():
    scene = Scene((Obj(0, 2, "square", "blue", "small"), Obj(2, 1, "circle", "red", "large")))
    labels = clip_probe.cell_labels(scene)
    assert labels.tolist().count(0) == 7
    assert clip_probe.OBJECT_CLASSES[labels[2] - 1] == ("square", "blue", "small")
    assert clip_probe.OBJECT_CLASSES[labels[7] - 1] == ("circle", "red", "large")
    with pytest.raises(ValueError, match="source"):
        clip_probe.SceneReadout("words", 32, 32)


def test_a_probe_reads_a_plain_signal_and_not_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (300,), generator=g)
    signal = torch.nn.functional.one_hot(labels, 3).float() + 0.1 * torch.randn(300, 3, generator=g)
    noise = torch.randn(300, 3, generator=g)
    split = lambda x: ((x[:200], labels[:200]), (x[200:], labels[200:]))  # noqa: E731
    assert clip_probe.probe_accuracy(*split(signal), classes=3, hidden=None, steps=100) > 0.95
    assert clip_probe.probe_accuracy(*split(noise), classes=3, hidden=16, steps=100) < 0.6


def test_main_prints_and_writes_every_table(clip_dir, tmp_path, capsys):
    out = tmp_path / "probe.json"
    results = clip_probe.main(["--clip", str(clip_dir), "--train", "150", "--test", "60", "--steps", "60",
                               "--readout-captions", "300", "--readout-steps", "20", "--json", str(out)])
    text = results[f"text cosine to '{clip_probe.BASE_CAPTION}'"]
    assert set(text) == set(clip_probe.CHANGED) and all(-1 <= v <= 1 for v in text.values())
    for layer in ("vision layer 0", "vision layer -1"):
        assert set(results[layer]) == {"shape", "color", "size"}
        assert all(0 <= v <= 1 for table in results[layer].values() for v in table.values())
    # colour is plain in the patch embeddings of any CLIP, even an untrained one: far above chance (1/6)
    assert results["vision layer 0"]["color"]["linear"] > 0.5
    bound = results["binding (two objects, one attribute swapped)"]
    assert set(bound) == {"shape", "color", "size"} and all(0 < row["n"] <= 60 for row in bound.values())
    assert all(0 <= row["picture picks its caption"] <= 1 for row in bound.values())
    readout = results["scene readout (test captions with all nine cells right)"]
    assert set(readout) == {"sequence", "pooled"}
    assert all(set(row) == {"1 object", "2 objects", "3 objects"} and all(0 <= v <= 1 for v in row.values())
               for row in readout.values())
    assert json.loads(out.read_text())["vision layer 0"] == results["vision layer 0"]
    printed = capsys.readouterr().out
    assert "shape (square)" in printed and "vision layer -1" in printed
