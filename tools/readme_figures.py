"""Draw the README's pictures into docs/: `python tools/readme_figures.py`.

- docs/story.png: the story the shipped tiny M²Chat writes and draws (`M2ChatPipeline.story`, greedy, seed 0),
  beside a story from the frozen benchmark split (ShapeWorld ground truth, drawn by the renderer): what it
  learned from.
- docs/pipeline.png: the pipeline diagram of notebook 00.
- docs/gate_tradeoff.png: the creativity–consistency plot of notebook 10, from benchmarks/gate_sweep.json.
- docs/diffusion_samples.png: the reference diffusion generator (data/checkpoints/tiny/diffusion) drawing
  benchmark captions, one- and two-object test captions and held-out colour–shape pairs, each marked with
  the oracle's verdict (skipped if the generator is not there).
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from m2chat_lite.benchmark import load_benchmark  # noqa: E402
from m2chat_lite.plotting import pipeline_diagram, show_images, show_story, story_of  # noqa: E402
from m2chat_lite.utils import atomic_write  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"


def save(fig, name: str) -> None:
    with atomic_write(DOCS / name, "wb") as f:
        fig.savefig(f, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    print("wrote", (DOCS / name).relative_to(DOCS.parent))


def save_diffusion_samples() -> None:
    import torch

    from m2chat_lite.diffusion import TinyDiffusionPipeline, generate_for_prompts, reference_pipeline_dir
    from m2chat_lite.world import score
    from m2chat_lite.world.samples import scenes_of

    folder = reference_pipeline_dir("tiny")
    if not folder.is_dir():
        print(f"skipped docs/diffusion_samples.png: no generator at {folder}")
        return
    torch.set_num_threads(2)
    pipe = TinyDiffusionPipeline.from_pretrained(folder)
    test = load_benchmark("caption", split="test")
    chosen = [s for s in test if len(scenes_of(s)[0]) == 1][:8] + [s for s in test if len(scenes_of(s)[0]) == 2][:8]
    chosen += load_benchmark("caption", split="heldout")[:8]
    images = generate_for_prompts(pipe, [s.meta["caption"] for s in chosen], seed=0)
    marks = ["✓ " if score(im, scenes_of(s)[0])["exact"] == 1.0 else "✗ " for im, s in zip(images, chosen)]
    titles = [m + s.meta["caption"].replace(" on a plain background", "") for m, s in zip(marks, chosen)]
    fig = show_images(images, titles, ncols=8, size=1.9,
                      suptitle="reference generator (seed 0): one object, two objects, held-out pairs; "
                               "✓ = every attribute right (oracle)")
    for ax in fig.axes:
        ax.title.set_fontsize(5)
    save(fig, "diffusion_samples.png")


def save_story() -> None:
    from m2chat_lite.pipeline import M2ChatPipeline, story_frames

    truth = load_benchmark("story", split="test")[1]
    sentences, pictures = story_of(truth)
    pipe = M2ChatPipeline.from_pretrained(device="cpu")
    written = pipe.story("a small red square", seed=0)
    ours, drawn = story_frames(written[-1])
    fig = show_story(ours + sentences, drawn + pictures, size=1.9,
                     title=f"left: the tiny M²Chat's story for \"{written[0]['content']}\" (greedy, seed 0) · "
                           "right: a benchmark story (ground truth)")
    save(fig, "story.png")


def save_gate_tradeoff() -> None:
    import json

    from m2chat_lite.plotting import plot_gate_tradeoff

    sweep = json.loads((DOCS.parent / "benchmarks" / "gate_sweep.json").read_text())
    save(plot_gate_tradeoff(sweep), "gate_tradeoff.png")


if __name__ == "__main__":
    save_gate_tradeoff()
    save_story()
    save(pipeline_diagram(highlight=("adapter",)), "pipeline.png")
    save_diffusion_samples()
