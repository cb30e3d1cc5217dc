"""Draw the README's pictures into docs/: `python tools/readme_figures.py`.

- docs/story.png: an illustrated story from the frozen benchmark split (ShapeWorld ground truth, drawn by
  the package's renderer). Once the M²Chat pipeline exists, this script draws the story the tiny system
  writes instead.
- docs/pipeline.png: the pipeline diagram of notebook 00.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from m2chat_lite.benchmark import load_benchmark  # noqa: E402
from m2chat_lite.plotting import pipeline_diagram, show_story, story_of  # noqa: E402
from m2chat_lite.utils import atomic_write  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"


def save(fig, name: str) -> None:
    with atomic_write(DOCS / name, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    print("wrote", (DOCS / name).relative_to(DOCS.parent))


if __name__ == "__main__":
    story = load_benchmark("story", split="test")[1]
    sentences, pictures = story_of(story)
    save(show_story(sentences, pictures, size=1.9, title="user: " + story.turns[0].content[0].text), "story.png")
    save(pipeline_diagram(highlight=("adapter",)), "pipeline.png")
