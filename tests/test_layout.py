"""The layout planner: its targets, its map, its loss, and that it learns to read scenes (tiny models, seconds)."""

import json

import pytest
import torch
import torch.nn.functional as F

from m2chat_lite.layout import (ATTRIBUTES, IGNORE, LayoutPlanner, cell_targets, layout_channels, planner_accuracy,
                                planner_loss)
from m2chat_lite.world.scene import Obj, Scene

RED_CIRCLE = Obj(0, 2, "circle", "red", "large")  # top right
BLUE_SQUARE = Obj(2, 0, "square", "blue", "small")  # bottom left


def test_cell_targets_name_each_cells_object_and_ignore_the_attributes_of_empty_cells():
    targets = cell_targets(Scene((RED_CIRCLE, BLUE_SQUARE)))
    assert targets.shape == (9, 4)
    assert targets[2].tolist() == [1, ATTRIBUTES["shape"].index("circle"), ATTRIBUTES["color"].index("red"),
                                   ATTRIBUTES["size"].index("large")]
    assert targets[6, 0] == 1 and targets[6, 3] == ATTRIBUTES["size"].index("small")
    empty = [i for i in range(9) if i not in (2, 6)]
    assert (targets[empty, 0] == 0).all() and (targets[empty, 1:] == IGNORE).all()


def test_the_map_gives_every_place_its_cells_probabilities_and_nothing_for_a_dropped_caption():
    torch.manual_seed(0)
    planner = LayoutPlanner(cond_dim=16, side=6, width=16, blocks=1)
    embeds = torch.randn(2, 5, 16)
    embeds[1] = 0  # a caption dropped for classifier-free guidance
    maps = planner(embeds)
    assert maps.shape == (2, layout_channels(), 6, 6) and layout_channels() == 1 + 3 + 6 + 2
    assert (maps[1] == 0).all()
    present, shape, color, size = planner.logits(embeds[:1])
    here = present.softmax(-1)[0, :, 1]  # [9]
    for cell in range(9):  # a 6x6 grid: each cell is a 2x2 block of places
        r, c = cell // 3 * 2, cell % 3 * 2
        block = maps[0, :, r:r + 2, c:c + 2]
        assert torch.allclose(block, block[:, :1, :1].expand_as(block))
        assert torch.allclose(block[0, 0, 0], here[cell])
        assert torch.allclose(block[1:4, 0, 0], shape.softmax(-1)[0, cell] * here[cell])
        assert torch.allclose(block[1:4, 0, 0].sum(), here[cell])  # the attribute channels share "present"
    with pytest.raises(ValueError, match="side"):
        LayoutPlanner(side=2)


def test_the_loss_is_a_cross_entropy_per_attribute_and_the_planner_learns_to_read_scenes():
    torch.manual_seed(0)
    planner = LayoutPlanner(cond_dim=16, side=3, width=32, blocks=1)
    scenes = [Scene((RED_CIRCLE,)), Scene((BLUE_SQUARE,)), Scene((RED_CIRCLE, BLUE_SQUARE)),
              Scene((Obj(1, 1, "triangle", "green", "small"),))]
    embeds = torch.randn(len(scenes), 6, 16)  # stand-ins for four captions' token states
    targets = torch.stack([cell_targets(s) for s in scenes])
    by_hand = sum(F.cross_entropy(x.flatten(0, 1), targets[..., i].flatten(), ignore_index=IGNORE)
                  for i, x in enumerate(planner.logits(embeds)))
    assert torch.allclose(planner_loss(planner, embeds, targets), by_hand)
    assert planner_accuracy(planner, embeds, scenes)["all"] < 1
    optimizer = torch.optim.AdamW(planner.parameters(), lr=3e-3)
    for _ in range(150):
        optimizer.zero_grad()
        planner_loss(planner, embeds, targets).backward()
        optimizer.step()
    assert planner.read(embeds) == scenes
    assert planner_accuracy(planner, embeds, scenes) == {"1 object": 1.0, "2 objects": 1.0, "all": 1.0}


def test_rereading_lets_the_first_words_state_see_the_last_word_and_survives_save_and_load(tmp_path):
    torch.manual_seed(0)
    words = torch.randn(1, 5, 16)
    later = words.clone()
    later[:, -1] = torch.randn(16)  # change only the caption's last word
    plain = LayoutPlanner(cond_dim=16, side=3, width=16, blocks=1)
    assert torch.equal(plain.reread(plain.words(words))[:, 0], plain.reread(plain.words(later))[:, 0])
    rereader = LayoutPlanner(cond_dim=16, side=3, width=16, blocks=1, reread_blocks=1).eval()
    assert not torch.allclose(rereader.reread(rereader.words(words))[:, 0],
                              rereader.reread(rereader.words(later))[:, 0])
    rereader.save_pretrained(tmp_path / "planner")
    loaded = LayoutPlanner.from_pretrained(tmp_path / "planner").eval()
    assert loaded.config.reread_blocks == 1
    assert torch.equal(loaded(words), rereader(words))
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="reread_blocks"):
            LayoutPlanner(cond_dim=16, side=3, reread_blocks=bad)


def test_a_planner_saved_before_rereading_existed_loads_without_it(tmp_path):
    LayoutPlanner(cond_dim=16, side=3, width=16, blocks=1).save_pretrained(tmp_path / "planner")
    config = tmp_path / "planner" / "config.json"
    fields = json.loads(config.read_text())
    del fields["reread_blocks"]
    config.write_text(json.dumps(fields))
    assert LayoutPlanner.from_pretrained(tmp_path / "planner").config.reread_blocks == 0
