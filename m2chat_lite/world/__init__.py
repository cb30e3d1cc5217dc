"""ShapeWorld: the tiny preset's world of coloured shapes, with exact ground truth (notebook ``01_shapeworld``).

- ``scene``: objects, scenes, the held-out colour–shape pairs, and ``render``;
- ``captions``: the grammar that describes scenes (and ``parse_caption`` / ``read_story`` that read it back);
- ``tasks``: caption pairs, stories, dialogues and visual questions, all deterministic from a seed;
- ``oracle``: reads a scene back from pixels and scores a picture against what was asked.
"""

from .captions import caption, cell_name, describe_object, parse_caption, position_phrase, read_story
from .oracle import read_scene, score
from .scene import (BACKGROUND, COLORS, HELD_OUT, SHAPES, SIZES, SPLITS, Obj, Scene, random_scene,
                    render)
from .tasks import (TASK_NAMES, CaptionPair, Dialogue, DialogueTurn, Story, StoryFrame, VisualQuestion,
                    caption_pairs, dialogues, stories, text_corpus, visual_questions)

__all__ = [
    "BACKGROUND", "COLORS", "HELD_OUT", "SHAPES", "SIZES", "SPLITS", "TASK_NAMES", "Obj", "Scene",
    "CaptionPair", "Dialogue", "DialogueTurn", "Story", "StoryFrame", "VisualQuestion", "caption",
    "caption_pairs", "cell_name", "describe_object", "dialogues", "parse_caption", "position_phrase",
    "random_scene", "read_scene", "read_story", "render", "score", "stories", "text_corpus", "visual_questions",
]
