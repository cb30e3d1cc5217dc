"""Benchmark: where the objects a dialogue edit leaves alone are lost, step by step.

    python benchmarks/kept_probe.py --model data/checkpoints/tiny/stage2
    python benchmarks/kept_probe.py --model data/checkpoints/tiny/stage1 --limit 20 --json OUT

The test dialogues are illustrated with the benchmark's words, as ``m2chat-lite eval --suite dialog`` does. For every
object an edit leaves alone, the probe looks for it three times, in three readings of the same drawing:

1. **seen**: in the scene the generator's layout planner reads from the adapter's visual branch alone
   (``AdapterOutput.visual_embeds``, what stage 1's reference terms train): did the branch see it in the picture
   before?
2. **asked**: in the scene the planner reads from the adapter's output, the fused branches (what the generator is
   asked to draw);
3. **drawn**: in the picture, read by the oracle.

An object missed at 1 is lost to perception; seen but missed at 2, to the fusion of the branches; asked for but
missed at 3, to the drawing. ``benchmarks/M2CHAT_RECIPE.md`` ("The visual branch says what it sees, in the
planner's terms") has the shipped systems' tables. "Kept" here counts whole objects (all four attributes in their
cell); the dialogue suite's ``edit_preservation`` counts the same objects per edit and averages over edits, so the
two differ by a point or so. Needs a generator with a layout planner (the tiny preset's). About 2.5 minutes on one
CPU thread for the 100 test dialogues.
"""

from __future__ import annotations

import argparse
from collections import Counter

from m2chat_lite.benchmark import load_benchmark
from m2chat_lite.diffusion import layout_of
from m2chat_lite.evaluation import messages_of, picture_kinds, pictures_in_order
from m2chat_lite.pipeline import M2ChatPipeline
from m2chat_lite.utils import atomic_write_json
from m2chat_lite.world import read_scene
from m2chat_lite.world.samples import scenes_of

READINGS = ("seen", "asked", "drawn")


def record_readings(pipe: M2ChatPipeline) -> list:
    """Make ``pipe`` note, for every picture it draws, the scenes its planner reads from the visual branch alone
    and from the adapter's output; returns the list they are appended to, as ``(seen, asked)`` pairs."""
    planner = layout_of(pipe.generator.unet)
    if planner is None:
        raise ValueError("this probe reads scenes with the generator's layout planner, and this generator has none "
                         "(the tiny preset's has one)")
    readings, condition = [], pipe.condition

    def condition_and_read(context, return_visual: bool = False):
        output = condition(context, return_visual=True)
        readings.append((planner.read(output.visual_embeds.float())[0], planner.read(output.prompt_embeds.float())[0]))
        return output

    pipe.condition = condition_and_read  # on this pipeline only: draw() conditions through self.condition
    return readings


def probe(pipe: M2ChatPipeline, samples, seed: int = 0) -> list[dict]:
    """One row per object an edit of ``samples`` leaves alone: the edit's kind, the object, and whether it was
    seen, asked for and drawn (see the module docstring)."""
    readings = record_readings(pipe)
    rows = []
    for sample in samples:
        readings.clear()
        messages = pipe.illustrate(messages_of(sample), seed=seed)
        scenes, kinds, read = scenes_of(sample), picture_kinds(sample), iter(readings)
        for index, (role, segment) in enumerate(pictures_in_order(messages)):
            if role != "assistant":
                continue
            seen, asked = next(read)  # one reading per picture drawn, in order
            if index == 0:
                continue
            before, after, drawn = scenes[index - 1], scenes[index], read_scene(segment["image"])
            for obj in (o for o in after if o in before.objects):
                rows.append({"kind": kinds[index], "object": obj.to_dict(), "seen": obj in seen.objects,
                             "asked": obj in asked.objects, "drawn": obj in drawn.objects})
    return rows


def summary(rows: list[dict]) -> dict:
    """Shares of the objects seen, asked for and drawn, overall and by edit kind, and where the drawn ones
    were lost: ``lost_to`` perception (not seen), fusion (seen, not asked) or drawing (asked, not drawn)."""
    def shares(group):
        return {"objects": len(group), **{r: sum(x[r] for x in group) / len(group) if group else None
                                          for r in READINGS}}
    lost = Counter("perception" if not x["seen"] else "fusion" if not x["asked"] else "drawing"
                   for x in rows if not x["drawn"])
    by_kind = {kind: shares([x for x in rows if x["kind"] == kind]) for kind in sorted({x["kind"] for x in rows})}
    return {"all": shares(rows), "by_kind": by_kind, "lost_to": dict(lost)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="data/checkpoints/tiny/stage2", help="a saved M²Chat system folder")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=None, help="the first N dialogues only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the summary and the rows here")
    args = parser.parse_args(argv)
    pipe = M2ChatPipeline.from_pretrained(args.model)
    samples = load_benchmark("dialogue", split=args.split)[:args.limit]
    rows = probe(pipe, samples, seed=args.seed)
    result = {"model": str(args.model), "split": args.split, "dialogues": len(samples), **summary(rows)}
    print(f"{result['all']['objects']} objects left alone by the edits of {len(samples)} {args.split} dialogues")
    print(f"{'edit':<10}{'objects':>8}{'seen':>8}{'asked':>8}{'drawn':>8}")
    for name, s in [("all", result["all"]), *result["by_kind"].items()]:
        print(f"{name:<10}{s['objects']:>8}" + "".join(f"{s[r]:>8.1%}" for r in READINGS))
    print("drawn ones lost to:", ", ".join(f"{k} {v}" for k, v in sorted(result["lost_to"].items())) or "none")
    if args.json:
        atomic_write_json(args.json, {**result, "rows": rows}, indent=1)
    return result


if __name__ == "__main__":
    main()
