"""M³FT (m3ft.py): the system container, alignment examples, the two stages' losses, disjoint groups."""

import dataclasses

import pytest
import torch

from m2chat_lite import adapter as A, backbone, diffusion as D, fusion, m3ft
from m2chat_lite.config import get_config
from m2chat_lite.encoders import build_clip
from m2chat_lite.tokenizer import IMAGE_TOKEN
from m2chat_lite.training import TrainConfig, lr_lambda
from m2chat_lite.utils import set_seed
from m2chat_lite.world.samples import make_samples

CONFIG = get_config("tiny", lm_hidden_size=32, lm_num_layers=2, lm_num_heads=2, max_seq_len=256,
                    text_encoder_hidden_size=32, vision_hidden_size=32, vision_num_layers=1,
                    text_encoder_num_layers=1, pooled_dim=24, cond_dim=32, unet_block_channels=(8, 16),
                    adapter_num_heads=4)


@pytest.fixture(scope="module")
def tok():
    return backbone.build_tokenizer(CONFIG, n_per_task=200)


def system(tok, gate_mode="adaptive", seed=0):
    set_seed(seed)
    clip = build_clip(CONFIG, tok).eval()
    lm = backbone.build_lm(CONFIG, tok)
    fused = fusion.build_fused_lm(lm, clip, tok, tokens_per_image=4, lora_rank=4)
    unet = D.build_unet(CONFIG)
    _, sampler = D.build_schedulers()
    pipeline = D.TinyDiffusionPipeline(unet, sampler, clip, tok, {"num_inference_steps": 3})
    return m3ft.build_m2chat(fused, pipeline, CONFIG, gate_mode=gate_mode)


def test_examples_cover_every_drawn_picture_with_the_one_before_as_reference():
    story = make_samples("story", 1, seed=2)[0]
    examples = m3ft.examples_of(story)
    pictures = story.images()
    assert len(examples) == len(pictures) >= 3
    assert examples[0].reference is None
    for i, example in enumerate(examples):
        assert example.target.tobytes() == pictures[i].load().tobytes()
        assert example.sample.images()[-1].load().tobytes() == pictures[i].load().tobytes()  # cut after it
        if i:
            assert example.reference.tobytes() == pictures[i - 1].load().tobytes()
    dialogue = make_samples("dialogue", 20, seed=0)
    uploads = [d for d in dialogue if d.meta["turns"][0]["kind"] == "upload" and m3ft.examples_of(d)]
    assert uploads and m3ft.examples_of(uploads[0])[0].reference is not None  # the uploaded picture
    caption = m3ft.examples_of(make_samples("caption", 1)[0])
    assert len(caption) == 1 and caption[0].reference is None and caption[0].reference_caption is None
    # the reference's own caption comes with it: what the teacher read for the picture before
    assert [e.reference_caption for e in examples[1:]] == [e.caption for e in examples[:-1]]


def test_the_teacher_reads_a_caption_pairs_own_words_and_a_storys_scene():
    from m2chat_lite import world
    from m2chat_lite.world.samples import scenes_of

    pair = next(s for s in make_samples("caption", 20, seed=0) if s.meta["caption"] != world.caption(scenes_of(s)[0]))
    assert m3ft.picture_captions(pair) == [pair.meta["caption"]]  # what the user typed, as the LM reads it
    assert m3ft.examples_of(pair)[0].caption == pair.meta["caption"]
    story = make_samples("story", 1, seed=0)[0]
    assert m3ft.picture_captions(story) == [world.caption(scene) for scene in scenes_of(story)]


def test_alignment_examples_are_deterministic_and_mixed():
    a = m3ft.alignment_examples(12, seed=3)
    b = m3ft.alignment_examples(12, seed=3)
    assert [e.caption for e in a] == [e.caption for e in b] and len(a) == 12
    assert {e.sample.task for e in a} == {"caption", "story", "dialogue"}


def test_alignment_examples_take_each_task_s_share():
    from collections import Counter

    shares = {"caption": 0.25, "story": 0.25, "dialogue": 0.5}
    examples = m3ft.alignment_examples(40, seed=3, tasks=shares)
    assert Counter(e.sample.task for e in examples) == {"caption": 10, "story": 10, "dialogue": 20}
    # a sequence of tasks is an even split, as before shares existed; the default is the three tasks
    even = m3ft.alignment_examples(12, seed=3, tasks=("caption", "story", "dialogue"))
    assert [e.caption for e in even] == [e.caption for e in m3ft.alignment_examples(12, seed=3)]
    assert Counter(e.sample.task for e in even) == {"caption": 4, "story": 4, "dialogue": 4}
    for bad in ({"caption": 0.5, "story": 0.25}, {"caption": 1.5, "story": -0.5}, (), "dialogue"):
        with pytest.raises(ValueError, match="tasks|shares"):
            m3ft.alignment_examples(8, tasks=bad)


def test_the_edit_task_takes_a_dialogue_s_edits_alone():
    from collections import Counter

    examples = m3ft.alignment_examples(20, seed=3, tasks={"caption": 0.5, m3ft.EDIT_TASK: 0.5})
    assert Counter(e.sample.task for e in examples) == {"caption": 10, "dialogue": 10}
    edits = [e for e in examples if e.sample.task == "dialogue"]
    # each is a picture drawn from the one before it, never a dialogue's first picture
    assert all(e.reference is not None and e.reference_caption is not None for e in edits)
    dialogues = m3ft.alignment_examples(40, seed=3, tasks={"dialogue": 1.0})
    assert any(e.reference is None for e in dialogues)  # the dialogue task keeps its first pictures


def test_drawn_references_replace_only_the_assistants_pictures_in_the_example_and_its_conversation(tok):
    from m2chat_lite.data import Image

    set_seed(0)
    clip = build_clip(CONFIG, tok).eval()
    _, sampler = D.build_schedulers()
    generator = D.TinyDiffusionPipeline(D.build_unet(CONFIG), sampler, clip, tok, {"num_inference_steps": 2})
    examples = m3ft.alignment_examples(30, seed=1)
    before = [(e.reference, e.sample) for e in examples]

    def drawn_by_assistant(e):
        places = [(t, s) for t, turn in enumerate(e.sample.turns) for s in turn.content if isinstance(s, Image)]
        return e.reference is not None and e.sample.turns[places[-2][0]].role == "assistant"

    assert any(drawn_by_assistant(e) for e in examples)
    assert any(e.reference is not None and not drawn_by_assistant(e) for e in examples)  # an upload
    none = m3ft.draw_references(examples, generator, 0.0)
    assert all(a is b for a, b in zip(none, examples))
    every = m3ft.draw_references(examples, generator, 1.0, seed=2, num_inference_steps=2)
    for old, new in zip(examples, every):
        if drawn_by_assistant(old):
            assert new.reference is not old.reference and new.reference.size == old.reference.size
            assert new.sample.images()[-2].image is new.reference  # the LM reads the same drawing
            assert new.sample.images()[-1].load().tobytes() == old.sample.images()[-1].load().tobytes()
            assert (new.caption, new.target, new.reference_caption) == (old.caption, old.target, old.reference_caption)
        else:
            assert new is old  # captions without a reference, and a user's upload, stay as they are
    assert [(e.reference, e.sample) for e in examples] == before  # the input is not changed
    again = m3ft.draw_references(examples, generator, 1.0, seed=2, num_inference_steps=2)
    assert [e.reference.tobytes() for e in again if e.reference is not None] == \
        [e.reference.tobytes() for e in every if e.reference is not None]  # deterministic from the seed
    half = m3ft.draw_references(examples, generator, 0.5, seed=2, num_inference_steps=2)
    redrawn = sum(new is not old for new, old in zip(half, examples))
    assert 0 < redrawn < sum(map(drawn_by_assistant, examples))
    with pytest.raises(ValueError, match="between 0 and 1"):
        m3ft.draw_references(examples, generator, 1.5)
    with pytest.raises(ValueError, match="generator="):
        m3ft.train_stage1(system(tok), tok, TrainConfig(max_steps=1), batch_size=4, pool_size=12, progress=False,
                          drawn_references=0.5)


def test_references_are_drawn_in_bfloat16_only_when_asked_and_the_cpu_has_the_instructions(monkeypatch):
    import types

    import PIL.Image

    examples = m3ft.alignment_examples(30, seed=1)
    generator = types.SimpleNamespace(device=torch.device("cpu"))  # generate_for_prompts is replaced below
    seen = []

    def drawing(_generator, prompts, **_kwargs):  # records the autocast the pictures would be drawn under
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return [PIL.Image.new("RGB", (32, 32)) for _ in prompts]

    monkeypatch.setattr(m3ft, "generate_for_prompts", drawing)
    for asked, has_instructions in ((True, True), (True, False), (False, True)):
        monkeypatch.setattr(m3ft, "cpu_has_bf16_instructions", lambda: has_instructions)
        m3ft.draw_references(examples, generator, 1.0, cpu_bf16=asked)
    assert seen == [True, False, False]
    assert not torch.is_autocast_enabled("cpu")  # and the autocast ends with the drawing


def test_the_batch_stops_right_after_the_img_span_and_conditions_on_it(tok):
    model = system(tok)
    examples = m3ft.alignment_examples(6, seed=1)
    batch = m3ft.alignment_batch(model, tok, examples)
    last = tok.convert_tokens_to_ids("[IMG3]")
    for row in range(len(examples)):
        n = int(batch["attention_mask"][row].sum())
        assert batch["input_ids"][row, n - 1] == last
    slots = int((batch["input_ids"] == tok.convert_tokens_to_ids(IMAGE_TOKEN)).sum())
    assert slots == 4 * len(batch["pixel_values"])  # context pictures only, not the targets
    assert batch["has_reference"].tolist() == [e.reference is not None for e in examples]
    out = model.condition(batch)
    assert out.prompt_embeds.shape == (6, CONFIG.cond_seq_len, 32) and out.pooled.shape == (6, 24)
    assert out.gate[~batch["has_reference"]].eq(0).all()


def test_the_two_stages_train_disjoint_groups():
    tok_ = backbone.build_tokenizer(CONFIG, n_per_task=200)
    model = system(tok_)
    first, second = m3ft.check_disjoint(model)
    assert first and second and not first & second
    assert "fused.gen_embeddings" in first and any(n.startswith("adapter.") for n in first)
    assert all(n.startswith("adapter.") or n == "fused.gen_embeddings" for n in first)
    assert any("lora_" in n for n in second) and "fused.gate" in second
    assert any(n.startswith("fused.projector.") for n in second)
    assert not any(n.startswith("adapter.") for n in second)
    with_gate = set(m3ft.set_stage(model, "stage2", train_adapter_gate=True))
    assert with_gate - second == {"adapter.static_gate", "adapter.adaptive_gate.weight", "adapter.adaptive_gate.bias"}
    with pytest.raises(ValueError, match="unknown stage"):
        m3ft.set_stage(model, "stage3")


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_a_stage_moves_its_group_and_nothing_else(tok, stage):
    model = system(tok)
    before = _snapshot(model)
    config = TrainConfig(max_steps=3, lr=1e-2, warmup_steps=1, log_every=1)
    if stage == "stage1":
        result = m3ft.train_stage1(model, tok, config, batch_size=4, pool_size=12, progress=False)
        assert {"diffusion", "seq_mse", "pooled_mse", "gate"} <= set(result.history[-1])
    else:
        result = m3ft.train_stage2(model, tok, config, batch_size=4, pool_size=12, progress=False)
        last = result.history[-1]  # the LM loss plus stage 1's loss through the frozen adapter
        assert last["loss"] == pytest.approx(last["lm"] + last["alignment"], rel=1e-5)
    trained = set(m3ft.set_stage(model, stage))
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        if name in trained:
            continue  # may or may not move in three steps (e.g. a zero-init gate's LoRA partner)
        assert not moved, f"{stage} changed the frozen {name}"
    assert any(not torch.equal(dict(model.named_parameters())[n], before[n]) for n in trained)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


def test_the_stage_2_objective_adds_stage_1s_loss_and_its_gradient_reaches_the_lora_through_the_adapter(tok):
    model = system(tok)
    trained = set(m3ft.set_stage(model, "stage2"))
    instruction = fusion.sample_batches(tok, make_samples("story", 2), model.fused.tokens_per_image, 2)(0)
    aligned = m3ft.alignment_batch(model, tok, m3ft.alignment_examples(3))
    torch.manual_seed(0)
    loss, parts = m3ft.stage2_objective(model, instruction, aligned, alignment_weight=0.5)
    torch.manual_seed(0)
    alone, _ = m3ft.stage1_loss(model, aligned)
    assert loss.item() == pytest.approx(parts["lm"] + 0.5 * alone.item(), rel=1e-5)
    assert parts["alignment"] == pytest.approx(alone.item(), rel=1e-5)
    # the stage-1 term alone moves the LoRA (through the frozen adapter) and gives the adapter no gradient
    model.zero_grad()
    alone.backward()
    lora = [p for n, p in model.named_parameters() if n in trained and "lora_B" in n]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    assert all(p.grad is None for p in model.adapter.parameters())
    without, parts = m3ft.stage2_objective(model, instruction, aligned, alignment_weight=0.0)
    assert set(parts) == {"lm"} and without.item() == pytest.approx(m3ft.stage2_loss(model, instruction).item())


def test_the_retention_term_is_zero_at_the_teacher_and_pulls_the_lora_back_to_it(tok):
    model = system(tok)
    trained = set(m3ft.set_stage(model, "stage2"))
    questions = fusion.sample_batches(tok, make_samples("vqa", 4), model.fused.tokens_per_image, 4)(0)
    teacher = m3ft.frozen_copy(model.fused)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert m3ft.retention_loss(model, teacher, questions).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():  # stage 2 moves the LoRA: now the model answers differently from its teacher
        for name, param in model.named_parameters():
            if name in trained and "lora_B" in name:
                param.add_(0.1 * torch.randn_like(param))
    moved = m3ft.retention_loss(model, teacher, questions)
    assert moved.item() > 1e-4
    model.zero_grad()
    moved.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n, p in model.named_parameters() if n in trained and "lora_B" in n)
    assert all(p.grad is None for p in teacher.parameters())
    instruction = fusion.sample_batches(tok, make_samples("story", 2), model.fused.tokens_per_image, 2)(0)
    loss, parts = m3ft.stage2_objective(model, instruction, retained=questions, teacher=teacher, retention_weight=2.0)
    assert loss.item() == pytest.approx(parts["lm"] + 2.0 * moved.item(), rel=1e-5)
    with pytest.raises(ValueError, match="frozen_copy"):
        m3ft.stage2_objective(model, instruction, retained=questions, retention_weight=1.0)


def test_stage_2_with_retention_trains_and_logs_the_term_or_says_there_are_no_questions(tok):
    model = system(tok)
    config = TrainConfig(max_steps=2, lr=1e-2, warmup_steps=1, log_every=1)
    result = m3ft.train_stage2(model, tok, config, batch_size=4, pool_size=12, progress=False, alignment_weight=0,
                               retention_weight=1.0, retention_batch_size=2)
    last = result.history[-1]
    assert last["loss"] == pytest.approx(last["lm"] + last["retention"], rel=1e-5) and last["retention"] >= 0
    with pytest.raises(ValueError, match="visual questions"):
        m3ft.train_stage2(system(tok), tok, config, batch_size=2, samples=make_samples("story", 4),
                          alignment_weight=0, retention_weight=1.0, progress=False)


def test_interpolate_lora_moves_only_the_lora_part_of_the_way_back(tok):
    model = system(tok)
    m3ft.set_stage(model, "stage2")
    start = m3ft.lora_weights(model.fused)
    assert start and all("lora_" in name for name in start)
    with torch.no_grad():  # what stage 2 would do: move the LoRA and the projector
        for name, param in model.fused.named_parameters():
            if "lora_" in name or name.startswith("projector"):
                param.add_(torch.randn_like(param))
    trained = {name: param.detach().clone() for name, param in model.fused.named_parameters()}
    m3ft.interpolate_lora(model.fused, start, 0.7)
    for name, param in model.fused.named_parameters():
        expected = start[name] + 0.7 * (trained[name] - start[name]) if name in start else trained[name]
        assert torch.allclose(param, expected, atol=1e-6), name
    m3ft.interpolate_lora(model.fused, start, 0.0)  # keep nothing: fusion's LoRA again
    assert all(torch.equal(param, start[name]) for name, param in model.fused.named_parameters() if name in start)
    with pytest.raises(ValueError, match="between 0 and 1"):
        m3ft.interpolate_lora(model.fused, start, 1.5)
    with pytest.raises(ValueError, match="do not match"):
        m3ft.interpolate_lora(model.fused, dict(list(start.items())[1:]), 0.5)


def short_stage2(tok, steps: int, **kwargs):
    """A few stage-2 steps on a fresh tiny system, seeded: the model, its LoRA before, and the run's result."""
    torch.manual_seed(0)
    model = system(tok)
    start = m3ft.lora_weights(model.fused)
    config = TrainConfig(max_steps=steps, lr=1e-2, warmup_steps=1, log_every=1)
    result = m3ft.train_stage2(model, tok, config, batch_size=4, pool_size=12, progress=False, alignment_weight=0,
                               **kwargs)
    return model, start, result


def test_stage_2_with_lora_keep_ends_part_of_the_way_from_its_start(tok):
    runs = {}
    for keep in (1.0, 0.5):
        model, start, _ = short_stage2(tok, 2, lora_keep=keep)
        runs[keep] = m3ft.lora_weights(model.fused)
    for name, value in start.items():  # the same training, then half of its change kept
        assert torch.allclose(runs[0.5][name], value + 0.5 * (runs[1.0][name] - value), atol=1e-6), name
    assert any(not torch.equal(runs[1.0][name], value) for name, value in start.items())
    with pytest.raises(ValueError, match="lora_keep"):
        short_stage2(tok, 1, lora_keep=-0.1)


def test_lora_drift_is_the_squared_distance_from_the_start_and_trains_the_lora(tok):
    model = system(tok)
    m3ft.set_stage(model, "stage2")
    start = m3ft.lora_weights(model.fused)
    assert m3ft.lora_drift(model.fused, start).item() == 0.0
    with torch.no_grad():
        for name, param in model.fused.named_parameters():
            if "lora_B" in name:
                param.add_(0.1)
    expected = sum(model.fused.get_parameter(name).numel() * 0.01 for name in start if "lora_B" in name)
    drift = m3ft.lora_drift(model.fused, start)
    assert drift.item() == pytest.approx(expected, rel=1e-4)
    drift.backward()
    for name, param in model.fused.named_parameters():
        if "lora_B" in name:  # d/dp (p - p0)^2 = 2 (p - p0)
            assert torch.allclose(param.grad, torch.full_like(param, 0.2), atol=1e-5), name
    with pytest.raises(ValueError, match="do not match"):
        m3ft.lora_drift(model.fused, dict(list(start.items())[1:]))
    instruction = fusion.sample_batches(tok, make_samples("story", 2), model.fused.tokens_per_image, 2)(0)
    loss, parts = m3ft.stage2_objective(model, instruction, anchor=start, anchor_weight=3.0)
    assert parts["anchor_drift"] == pytest.approx(expected, rel=1e-4)
    assert loss.item() == pytest.approx(parts["lm"] + 3.0 * parts["anchor_drift"], rel=1e-5)
    with pytest.raises(ValueError, match="lora_weights"):
        m3ft.stage2_objective(model, instruction, anchor_weight=1.0)


def test_stage_2_with_an_anchor_moves_the_lora_less_and_logs_the_drift(tok):
    drifts = {}
    for weight in (0.0, 100.0):
        model, start, result = short_stage2(tok, 4, anchor_weight=weight)
        drifts[weight] = m3ft.lora_drift(model.fused, start).item()
        assert ("anchor_drift" in result.history[-1]) == bool(weight)
    assert 0 < drifts[100.0] < drifts[0.0]
    with pytest.raises(ValueError, match="anchor_weight"):
        short_stage2(tok, 1, anchor_weight=-1.0)


def test_stage_2_on_real_data_without_drawn_pictures_says_what_to_do(tok):
    model = system(tok)
    questions = make_samples("vqa", 6)  # the assistant answers in words: nothing to keep aligned
    with pytest.raises(ValueError, match="alignment_weight=0"):
        m3ft.train_stage2(model, tok, TrainConfig(max_steps=1), batch_size=2, samples=questions, progress=False)
    result = m3ft.train_stage2(model, tok, TrainConfig(max_steps=1, warmup_steps=1, log_every=1), batch_size=2,
                               samples=questions, alignment_weight=0.0, progress=False)
    assert result.steps == 1 and "alignment" not in result.history[-1]


def test_the_joint_ablation_trains_both_groups_on_both_losses(tok):
    model = system(tok)
    first, second = m3ft.check_disjoint(model)
    assert set(m3ft.set_stage(model, m3ft.JOINT)) == first | second
    before = _snapshot(model)
    config = TrainConfig(max_steps=2, lr=1e-2, warmup_steps=1, log_every=1)
    result = m3ft.train_joint(model, tok, config, batch_size=4, pool_size=12, progress=False)
    last = result.history[-1]
    assert {"stage1", "stage2", "diffusion", "seq_mse"} <= set(last)
    assert last["loss"] == pytest.approx(last["stage1"] + last["stage2"], rel=1e-5)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved & first and moved & second and moved <= first | second


def test_stage1_loss_is_the_weighted_sum_of_its_parts(tok):
    model = system(tok)
    batch = m3ft.alignment_batch(model, tok, m3ft.alignment_examples(4, seed=5))
    g = torch.Generator().manual_seed(0)
    loss, parts = m3ft.stage1_loss(model, batch, lambda_seq=2.0, lambda_pooled=0.5, generator=g)
    expected = parts["diffusion"] + 2.0 * parts["seq_mse"] + 0.5 * parts["pooled_mse"]
    assert abs(loss.item() - expected) < 1e-5
    g = torch.Generator().manual_seed(0)
    zero, parts0 = m3ft.stage1_loss(model, batch, lambda_seq=0.0, lambda_pooled=0.0, generator=g)
    assert abs(zero.item() - parts0["diffusion"]) < 1e-6


def test_the_reference_term_asks_the_visual_branch_alone_for_the_reference_pictures_caption(tok):
    model = system(tok)
    examples = m3ft.alignment_examples(6, seed=5)
    assert any(e.reference is not None for e in examples) and any(e.reference is None for e in examples)
    batch = m3ft.alignment_batch(model, tok, examples)
    with torch.no_grad():
        model.adapter.adaptive_gate.bias.fill_(0.5)  # open, so the fused output differs from the semantic one
    loss, parts = m3ft.stage1_loss(model, batch, generator=torch.Generator().manual_seed(0), lambda_reference=2.0)
    plain, parts0 = m3ft.stage1_loss(model, batch, generator=torch.Generator().manual_seed(0))
    assert parts0["reference"] == pytest.approx(parts["reference"])  # still logged, no longer in the loss
    assert loss.item() == pytest.approx(plain.item() + 2.0 * parts["reference"], abs=1e-5)
    # the term: the visual branch's output through the adapter's head, against the teacher reading the reference's
    # caption, on the rows that have a reference picture only
    rows = batch["has_reference"]
    out = model.condition(batch, return_visual=True)
    teacher, _ = m3ft.encode_text(model.teacher, model.teacher_tokenizer, batch["reference_captions"])
    expected = torch.nn.functional.mse_loss(out.visual_embeds[rows], teacher[rows])
    assert parts["reference"] == pytest.approx(expected.item(), abs=1e-6)
    assert_only_the_visual_branch_learns(model, batch, lambda_reference=1.0)


def assert_only_the_visual_branch_learns(model, batch, **weight):
    """The stage-1 term ``weight`` names, alone: its gradient reaches the visual branch and the output head, not the
    semantic branch."""
    model.adapter.zero_grad()
    m3ft.stage1_loss(model, batch, lambda_seq=0.0, lambda_pooled=0.0, diffusion_rows=0, lambda_layout=0.0,
                     **weight)[0].backward()
    grads = {n: p.grad for n, p in model.adapter.named_parameters()}
    assert grads["visual.project.weight"].abs().sum() > 0 and grads["to_sequence.weight"].abs().sum() > 0
    assert grads["semantic.project.weight"] is None or grads["semantic.project.weight"].abs().sum() == 0


def with_planner(model):
    """``model`` with a generator that reads a (random, frozen) layout planner's map, as the tiny recipe's does."""
    from m2chat_lite.layout import LayoutPlanner

    set_seed(0)
    unet = D.build_unet(CONFIG, **D.unet_kwargs(D.DiffusionRecipe(layout_planner=True)))
    unet.layout_planner = LayoutPlanner(cond_dim=CONFIG.cond_dim, side=CONFIG.image_size // 2, width=32, blocks=1,
                                        reread_blocks=1)
    model.unet = unet.requires_grad_(False)
    return model


def test_with_a_layout_planner_stage1_also_matches_what_it_reads_from_the_teacher(tok):
    model = with_planner(system(tok))
    unet = model.unet
    batch = m3ft.alignment_batch(model, tok, m3ft.alignment_examples(4, seed=5))
    g = torch.Generator().manual_seed(0)
    loss, parts = m3ft.stage1_loss(model, batch, generator=g)
    assert parts["layout"] > 0
    expected = parts["diffusion"] + parts["seq_mse"] + parts["pooled_mse"] + parts["layout"]
    assert abs(loss.item() - expected) < 1e-4
    g = torch.Generator().manual_seed(0)
    without, parts0 = m3ft.stage1_loss(model, batch, generator=g, lambda_layout=0.0)
    assert parts0["layout"] == pytest.approx(parts["layout"])  # still logged, no longer in the loss
    assert abs(loss.item() - without.item() - parts["layout"]) < 1e-4
    # the term's gradient reaches the adapter through the frozen planner, and vanishes where the readings agree
    planner = unet.layout_planner
    teacher = torch.randn(3, 6, CONFIG.cond_dim)
    student = teacher.clone().requires_grad_(True)
    m3ft.layout_matching_loss(planner, student, teacher).backward()
    assert student.grad.abs().max() < 1e-5
    moved = (teacher + torch.randn_like(teacher)).requires_grad_(True)
    m3ft.layout_matching_loss(planner, moved, teacher).backward()
    assert moved.grad.abs().max() > 1e-4 and all(p.grad is None for p in planner.parameters())


def test_the_reference_layout_term_asks_the_planner_to_read_the_reference_from_the_visual_branch_alone(tok):
    examples = m3ft.alignment_examples(6, seed=5)
    plain_model = system(tok)
    batch = m3ft.alignment_batch(plain_model, tok, examples)
    # a generator without a planner has no such term: nothing to read the visual branch with
    loss, parts = m3ft.stage1_loss(plain_model, batch, generator=torch.Generator().manual_seed(0),
                                   lambda_reference_layout=1.0)
    same, _ = m3ft.stage1_loss(plain_model, batch, generator=torch.Generator().manual_seed(0))
    assert parts["reference_layout"] == 0.0 and loss.item() == pytest.approx(same.item())
    model = with_planner(system(tok))
    with torch.no_grad():
        model.adapter.adaptive_gate.bias.fill_(0.5)  # open, so the fused output differs from the semantic one
    loss, parts = m3ft.stage1_loss(model, batch, generator=torch.Generator().manual_seed(0), lambda_reference_layout=3.0)
    plain, parts0 = m3ft.stage1_loss(model, batch, generator=torch.Generator().manual_seed(0))
    assert parts0["reference_layout"] == 0.0 and parts["reference_layout"] > 0  # computed only when asked for
    assert loss.item() == pytest.approx(plain.item() + 3.0 * parts["reference_layout"], abs=1e-4)
    # the term: the planner reading the visual branch's output against its reading of the reference's caption, on
    # the rows with a reference picture only
    rows = batch["has_reference"]
    out = model.condition(batch, return_visual=True)
    teacher, _ = m3ft.encode_text(model.teacher, model.teacher_tokenizer, batch["reference_captions"])
    expected = m3ft.layout_matching_loss(D.layout_of(model.unet), out.visual_embeds[rows], teacher[rows])
    assert parts["reference_layout"] == pytest.approx(expected.item(), abs=1e-5)
    # its gradient reaches the visual branch and the head, not the semantic branch nor the frozen planner
    assert_only_the_visual_branch_learns(model, batch, lambda_reference_layout=1.0)
    assert all(p.grad is None for p in D.layout_of(model.unet).parameters())


def test_the_output_layout_term_can_weigh_more_on_the_cells_of_the_picture_before(tok):
    model = with_planner(system(tok))
    planner = D.layout_of(model.unet)
    examples = m3ft.alignment_examples(8, seed=5)
    batch = m3ft.alignment_batch(model, tok, examples)
    cached = m3ft.collate_precomputed(m3ft.precompute_alignment(model, tok, examples, batch_size=4))
    rows = batch["has_reference"]
    assert rows.any() and not rows.all()
    # the cells: where the planner reads an object in the reference's caption; none on a row without a reference
    cells = m3ft.reference_cells(model, batch)
    assert cells.shape == (8, 9) and cells.dtype == torch.bool and not cells[~rows].any()
    teacher, _ = m3ft.encode_text(model.teacher, model.teacher_tokenizer, batch["reference_captions"])
    present, *_ = planner.logits(teacher[rows])
    assert torch.equal(cells[rows], present.argmax(-1) == 1)
    assert torch.equal(m3ft.reference_cells(model, cached), cells)  # the cache's readings give the same cells
    # all weights 1 is the plain term
    out = model.condition(batch)
    student, target = out.prompt_embeds.detach(), m3ft.encode_text(model.teacher, model.teacher_tokenizer,
                                                                   batch["captions"])[0]
    plain = m3ft.layout_matching_loss(planner, student, target)
    assert m3ft.layout_matching_loss(planner, student, target, cell_weights=torch.ones(8, 9)).item() == \
        pytest.approx(plain.item(), abs=1e-6)
    # each row keeps its total weight: weighing all of a row's cells alike changes nothing, whatever the factor
    per_row = torch.arange(1.0, 9.0)[:, None].expand(8, 9)
    assert m3ft.layout_matching_loss(planner, student, target, cell_weights=per_row).item() == \
        pytest.approx(plain.item(), abs=1e-5)
    # in the stage-1 loss: the layout term with those cells counted 1 + w times, nothing else changed
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    _, parts0 = m3ft.stage1_loss(model, batch, generator=g())
    loss, parts = m3ft.stage1_loss(model, batch, generator=g(), reference_cells_weight=4.0)
    expected = m3ft.layout_matching_loss(planner, student, target, cell_weights=1.0 + 4.0 * cells.float())
    assert parts["layout"] == pytest.approx(expected.item(), abs=1e-5) and parts["layout"] != parts0["layout"]
    assert {k: v for k, v in parts.items() if k != "layout"} == pytest.approx(
        {k: v for k, v in parts0.items() if k != "layout"}, abs=1e-6)
    again, same = m3ft.stage1_loss(model, cached, generator=g(), reference_cells_weight=4.0)
    assert again.item() == pytest.approx(loss.item(), abs=1e-5) and same == pytest.approx(parts, abs=1e-5)
    # a batch with no reference picture: the weight changes nothing
    captions = [i for i, has in enumerate(rows.tolist()) if not has]
    first = m3ft.alignment_batch(model, tok, [examples[i] for i in captions])
    assert m3ft.stage1_loss(model, first, generator=g(), reference_cells_weight=4.0)[1] == pytest.approx(
        m3ft.stage1_loss(model, first, generator=g())[1], abs=1e-6)


def test_the_diffusion_term_can_see_only_the_first_rows_of_the_batch(tok):
    model = system(tok)
    batch = m3ft.alignment_batch(model, tok, m3ft.alignment_examples(6, seed=5))
    _, whole = m3ft.stage1_loss(model, batch, generator=torch.Generator().manual_seed(0))
    _, first = m3ft.stage1_loss(model, batch, generator=torch.Generator().manual_seed(0), diffusion_rows=2)
    # the same two rows alone, from the same noise and timesteps: the diffusion term is theirs only
    condition = model.condition(batch)
    expected = D.diffusion_loss(model.unet, model.scheduler, batch["target"][:2], condition.prompt_embeds[:2],
                                condition.pooled[:2], generator=torch.Generator().manual_seed(0))
    assert abs(first["diffusion"] - expected.item()) < 1e-6 and first["diffusion"] != whole["diffusion"]
    assert first["seq_mse"] == pytest.approx(whole["seq_mse"])  # the MSE terms still see every row
    calls = []
    hook = model.unet.register_forward_hook(lambda *_: calls.append(1))
    loss, none = m3ft.stage1_loss(model, batch, diffusion_rows=0)  # MSE only: the generator is not run
    hook.remove()
    assert none["diffusion"] == 0.0 and loss.item() == pytest.approx(none["seq_mse"] + none["pooled_mse"])
    assert not calls
    with pytest.raises(ValueError, match="diffusion_rows"):
        m3ft.stage1_loss(model, batch, diffusion_rows=-1)


@pytest.mark.parametrize("planned", [False, True], ids=["plain generator", "with a layout planner"])
def test_precomputed_frozen_parts_give_the_same_stage1_loss(tok, planned):
    model = with_planner(system(tok)) if planned else system(tok)
    examples = m3ft.alignment_examples(6, seed=5)
    full = m3ft.alignment_batch(model, tok, examples)
    cached = m3ft.collate_precomputed(m3ft.precompute_alignment(model, tok, examples, batch_size=4))
    assert cached["has_reference"].tolist() == full["has_reference"].tolist()
    # with a planner, its readings of the teacher are cached too (it is frozen): [B, 9 cells, 2 + 3 + 6 + 2 classes],
    # of the caption and of the reference's caption (the caption's own where there is no reference)
    assert ("teacher_layout" in cached) == ("reference_layout" in cached) == planned
    if planned:
        planner = D.layout_of(model.unet)
        assert cached["teacher_layout"].shape == cached["reference_layout"].shape == (6, 9, 13)
        assert torch.allclose(cached["teacher_layout"], m3ft.layout_targets(planner, cached["teacher_seq"]), atol=1e-6)
        assert torch.allclose(cached["reference_layout"], m3ft.layout_targets(planner, cached["reference_seq"]),
                              atol=1e-6)
    for rows, reference in ((None, 0.0), (2, 1.0)):
        weights = {"lambda_reference": reference, "lambda_reference_layout": reference}
        loss, parts = m3ft.stage1_loss(model, full, generator=torch.Generator().manual_seed(0), diffusion_rows=rows,
                                       **weights)
        again, same = m3ft.stage1_loss(model, cached, generator=torch.Generator().manual_seed(0), diffusion_rows=rows,
                                       **weights)
        assert again.item() == pytest.approx(loss.item(), abs=1e-5)
        assert same == pytest.approx(parts, abs=1e-5)


def test_the_cache_reads_in_bfloat16_only_when_asked_and_scores_against_float32_targets(tok, monkeypatch):
    model = system(tok)
    examples = m3ft.alignment_examples(6, seed=5)
    plain = m3ft.precompute_alignment(model, tok, examples, batch_size=4)
    seen = []
    adapter_inputs = m3ft.M2ChatModel.adapter_inputs

    def spy(self, batch):  # records the autocast the adapter's inputs are computed under
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return adapter_inputs(self, batch)
    monkeypatch.setattr(m3ft.M2ChatModel, "adapter_inputs", spy)
    runs = {}
    for asked, has_instructions in ((True, True), (True, False), (False, True)):
        monkeypatch.setattr(m3ft, "cpu_has_bf16_instructions", lambda: has_instructions)
        seen.clear()
        runs[asked, has_instructions] = m3ft.precompute_alignment(model, tok, examples, batch_size=4, cpu_bf16=asked)
        assert seen == [asked and has_instructions] * 2  # two batches of 4 and 2
    assert not torch.is_autocast_enabled("cpu")
    for key in ((True, False), (False, True)):  # not asked, or no instructions: float32, as before
        assert all(torch.equal(a["states"], b["states"]) for a, b in zip(runs[key], plain))
    for cached, exact in zip(runs[True, True], plain):
        # what the adapter reads: float32 tensors, close to the float32 ones; what it is scored against: exact
        assert cached["states"].dtype == cached["visual"].dtype == torch.float32
        assert torch.allclose(cached["states"], exact["states"], atol=0.1)
        assert not torch.equal(cached["states"], exact["states"])
        for key in ("teacher_seq", "teacher_pooled", "reference_seq", "diffusion_target"):
            assert torch.equal(cached[key], exact[key])


def test_train_stage1_hands_caching_cpu_bf16_to_the_cache(tok, monkeypatch):
    seen = []
    precompute = m3ft.precompute_alignment

    def spy(*args, **kwargs):
        seen.append(kwargs.get("cpu_bf16"))
        return precompute(*args, **kwargs)
    monkeypatch.setattr(m3ft, "precompute_alignment", spy)
    for asked in (True, False):
        config = TrainConfig(max_steps=1, lr=1e-3, warmup_steps=1, log_every=1, seed=0)
        m3ft.train_stage1(system(tok), tok, config, batch_size=4, pool_size=8, progress=False, cached_steps=1,
                          caching_cpu_bf16=asked)
    assert seen == [True, False]


def test_cached_steps_train_the_adapter_alone_then_both_groups(tok, tmp_path, monkeypatch):
    def run(steps, cached_steps, out_dir=None):
        set_seed(0)
        model = system(tok)
        config = TrainConfig(max_steps=steps, lr=1e-2, warmup_steps=1, log_every=1, seed=0)
        result = m3ft.train_stage1(model, tok, config, batch_size=4, pool_size=12, progress=False,
                                   cached_steps=cached_steps, out_dir=out_dir)
        return model, result

    start = system(tok).fused.gen_embeddings.detach().clone()
    plain_model, plain = run(1, 0)
    cached_model, cached = run(2, 2)
    # the first step is the plain loop's first step: same batch, same loss
    assert cached.history[0]["loss"] == pytest.approx(plain.history[0]["loss"], abs=1e-5)
    assert torch.equal(cached_model.fused.gen_embeddings, start)  # the [IMG] embeddings waited
    assert not torch.equal(plain_model.fused.gen_embeddings, start)
    assert any(not torch.equal(p, q) for p, q in zip(cached_model.adapter.parameters(),
                                                      system(tok).adapter.parameters()))
    model, _ = run(3, 2, out_dir=tmp_path)  # the third step trains them too
    assert not torch.equal(model.fused.gen_embeddings, start)

    def no_cache(*args, **kwargs):
        raise AssertionError("a run resumed after its cached steps computed the cache")
    monkeypatch.setattr(m3ft, "precompute_alignment", no_cache)
    _, resumed = run(4, 2, out_dir=tmp_path)
    assert resumed.steps == 4 and resumed.resumed_from == 3
    with pytest.raises(ValueError, match="cached_steps"):
        run(1, -1)


def test_the_cache_batches_examples_by_length_and_gives_them_back_in_order(tok, monkeypatch):
    model = system(tok)
    examples = m3ft.alignment_examples(10, seed=3)
    lengths = [len(m3ft.encode_alignment(model, tok, e)["input_ids"]) for e in examples]
    assert len(set(lengths)) > 2  # captions, stories and dialogues: conversations of different lengths
    seen = []
    adapter_inputs = m3ft.M2ChatModel.adapter_inputs

    def spy(self, batch):
        seen.append(batch["attention_mask"].sum(1).tolist())
        return adapter_inputs(self, batch)
    monkeypatch.setattr(m3ft.M2ChatModel, "adapter_inputs", spy)
    monkeypatch.setattr(m3ft, "_CACHE_CHUNK", 8)  # two chunks: 8 examples, then 2
    cached = m3ft.precompute_alignment(model, tok, examples, batch_size=4)
    assert [len(b) for b in seen] == [4, 4, 2]
    assert sorted(seen[0] + seen[1]) == seen[0] + seen[1]  # the first chunk went by length
    assert [c["caption"] for c in cached] == [e.caption for e in examples]  # and comes back in the pool's order
    for item, example in zip(cached, examples):
        alone = model.adapter_inputs(m3ft.alignment_batch(model, tok, [example]))
        assert torch.allclose(item["states"], alone["states"][0], atol=1e-5)


def test_stage2_draws_its_pool_with_the_mix_it_is_given(tok, monkeypatch):
    seen = []
    stage2_samples = m3ft.stage2_samples

    def spy(*args, **kwargs):
        seen.append(kwargs.get("mix"))
        return stage2_samples(*args, **kwargs)
    monkeypatch.setattr(m3ft, "stage2_samples", spy)
    config = TrainConfig(max_steps=1, lr=1e-3, warmup_steps=1, log_every=1, seed=0)
    m3ft.train_stage2(system(tok), tok, config, batch_size=4, pool_size=8, progress=False, alignment_weight=0,
                      mix={"vqa": 1.0})
    assert seen == [{"vqa": 1.0}]
    assert {s.task for s in m3ft.stage2_samples(8, mix={"vqa": 1.0})} == {"vqa"}


def test_stage2_weighs_each_conversation_once_when_asked(tok, monkeypatch):
    """``per_conversation`` reaches the LM loss (``fusion.shifted_loss(per_sequence=True)``) and changes it: a
    batch of stories and one-word answers gives another loss than the token mean."""
    seen = []
    shifted_loss = fusion.shifted_loss

    def spy(logits, labels, per_sequence=False):
        seen.append(per_sequence)
        return shifted_loss(logits, labels, per_sequence)
    monkeypatch.setattr(fusion, "shifted_loss", spy)
    config = TrainConfig(max_steps=1, lr=1e-3, warmup_steps=1, log_every=1, seed=0)
    model = system(tok)
    m3ft.train_stage2(model, tok, config, batch_size=4, pool_size=8, progress=False, alignment_weight=0,
                      per_conversation=True)
    assert seen == [True]
    batch = fusion.sample_batches(tok, m3ft.stage2_samples(8, mix={"story": 0.5, "vqa": 0.5}),
                                  model.fused.tokens_per_image, 8)(0)
    with torch.no_grad():
        assert not torch.allclose(m3ft.stage2_loss(model, batch, per_conversation=True), m3ft.stage2_loss(model, batch))


def test_words_hidden_from_the_visual_branch_until_a_step_leave_it_a_plain_adapter_until_then(tok):
    def run(steps, words_from_step, visual_reads_words=True):
        model = system(tok)
        plain = model.adapter.state_dict()
        if visual_reads_words:  # the same adapter with the words' way in added (zero), as a warm start would
            model.adapter = A.M3Adapter(dataclasses.replace(model.adapter.config, visual_reads_words=True))
            assert len(model.adapter.load_state_dict(plain, strict=False).missing_keys) == 3
        set_seed(0)
        config = TrainConfig(max_steps=steps, lr=1e-2, warmup_steps=1, log_every=1, seed=0)
        result = m3ft.train_stage1(model, tok, config, batch_size=4, pool_size=12, progress=False,
                                   cached_steps=steps, words_from_step=words_from_step)
        return model, [h["loss"] for h in result.history]

    _, plain = run(2, 0, visual_reads_words=False)
    closed, losses = run(2, 2)
    assert losses == pytest.approx(plain, abs=1e-6)  # words hidden: the plain adapter's steps exactly
    assert closed.adapter.visual.project_words.weight.eq(0).all()  # and their way in did not move
    assert not closed.adapter.words_closed  # open again after training
    opened, losses = run(3, 2)
    assert losses[:2] == pytest.approx(plain, abs=1e-6)
    assert opened.adapter.visual.project_words.weight.abs().sum() > 0  # the third step reads them
    with pytest.raises(ValueError, match="words_from_step"):
        run(1, -1)


def test_the_words_open_with_a_warm_restart_of_the_learning_rate_when_asked(tok):
    def lrs(words_lr_ratio):
        model = system(tok)
        model.adapter = A.M3Adapter(dataclasses.replace(model.adapter.config, visual_reads_words=True))
        config = TrainConfig(max_steps=4, lr=1e-2, warmup_steps=1, log_every=1, seed=0)
        result = m3ft.train_stage1(model, tok, config, batch_size=4, pool_size=12, progress=False, cached_steps=4,
                                   words_from_step=2, words_lr_ratio=words_lr_ratio)
        return [h["lr"] for h in result.history], config

    one_cycle, config = lrs(None)
    assert one_cycle == pytest.approx([1e-2 * lr_lambda(config)(s) for s in range(1, 5)])
    restarted, _ = lrs(0.25)
    warm = dataclasses.replace(config, restart_step=2, restart_lr_ratio=0.25)
    assert restarted == pytest.approx([1e-2 * lr_lambda(warm)(s) for s in range(1, 5)])
    assert restarted[1] == pytest.approx(0.25e-2)  # step 2, where the words open: a quarter of the peak again


def test_alignment_is_scored_like_the_teacher_row(tok):
    from m2chat_lite.benchmark import load_benchmark

    model = system(tok)
    pipeline = D.TinyDiffusionPipeline(model.unet, D.build_schedulers()[1], model.teacher, tok,
                                       {"num_inference_steps": 2})
    samples = load_benchmark("caption")[:3]
    embeds, pooled = m3ft.caption_conditions(model, tok, samples, batch_size=2)
    assert embeds.shape == (3, CONFIG.cond_seq_len, 32) and pooled.shape == (3, 24)
    results = m3ft.evaluate_alignment(model, tok, pipeline, samples, batch_size=2, return_images=True)
    teacher = D.evaluate_generator(pipeline, samples, batch_size=2)
    assert set(results) >= {"test", "all", "seconds_per_image", "images"} and results["all"]["all"]["n"] == 3
    assert set(results["all"]) == set(teacher["all"])
    with pytest.raises(ValueError, match="caption samples"):
        m3ft.evaluate_alignment(model, tok, pipeline, make_samples("story", 1))


def saved_parts(tok, folder):
    """A random LM, CLIP and generator saved in ``folder`` as the shipped ones are, loaded back:
    ``(lm, clip, pipeline)``."""
    from m2chat_lite.encoders import load_clip, save_clip

    set_seed(0)
    save_clip(build_clip(CONFIG, tok), tok, folder / "clip")
    backbone.save_lm(backbone.build_lm(CONFIG, tok), tok, folder / "lm")
    clip, _ = load_clip(folder / "clip")
    lm, _ = backbone.load_lm(folder / "lm")
    pipeline = D.TinyDiffusionPipeline(D.build_unet(CONFIG), D.build_schedulers()[1], clip, tok)
    pipeline.save_pretrained(folder / "diffusion", text_encoder_dir="../clip")
    return lm, clip, pipeline


def test_the_system_saves_and_loads_beside_its_shared_folders(tok, tmp_path):
    lm, clip, pipeline = saved_parts(tok, tmp_path)
    fused = fusion.build_fused_lm(lm, clip, tok, tokens_per_image=4, lora_rank=4)
    model = m3ft.build_m2chat(fused, pipeline, CONFIG, gate_mode="static")
    model.adapter.static_gate.data.fill_(0.2)
    fused.gen_embeddings.data += 0.5
    m3ft.save_system(model, tmp_path / "systems" / "stage1", record={"steps": 1},
                     lm_dir="../../../lm", clip_dir="../../../clip", diffusion_dir="../../diffusion")
    loaded, _, _ = m3ft.load_system(tmp_path / "systems" / "stage1")
    batch = m3ft.alignment_batch(model, tok, m3ft.alignment_examples(3, seed=2))
    with torch.no_grad():
        a, b = model.eval().condition(batch), loaded.condition(batch)
    assert torch.allclose(a.prompt_embeds, b.prompt_embeds, atol=1e-5) and loaded.adapter.gate_mode == "static"
    with pytest.raises(FileNotFoundError, match="no M²Chat system"):
        m3ft.load_system(tmp_path / "nowhere")


def test_each_lm_layer_is_normalised_before_the_adapter_reads_it(tok):
    model = system(tok).eval()
    batch = m3ft.alignment_batch(model, tok, m3ft.alignment_examples(3, seed=2))
    args = (batch["input_ids"], batch["pixel_values"])
    kwargs = {"attention_mask": batch["attention_mask"], "position_ids": batch["position_ids"], "layers": (0, -1)}
    with torch.no_grad():
        raw = model.fused.hidden_states(*args, **kwargs)
        normed = model.fused.hidden_states(*args, normalize=True, **kwargs)
    d = CONFIG.lm_hidden_size
    assert raw.shape == normed.shape == (*batch["input_ids"].shape, 2 * d)
    for half in (slice(0, d), slice(d, 2 * d)):  # each layer on its own
        torch.testing.assert_close(normed[..., half], torch.nn.functional.layer_norm(raw[..., half], (d,)))
    # raw, the input embeddings are far smaller than the last layer; normalised, the two are on one scale
    real = batch["attention_mask"].bool()
    assert raw[real][:, :d].std() < raw[real][:, d:].std() / 2
    assert 0.8 < normed[real][:, :d].std() / normed[real][:, d:].std() < 1.25
    assert model.normalize_layers
    with torch.no_grad():
        on = model.condition(batch).prompt_embeds
        model.normalize_layers = False
        off = model.condition(batch).prompt_embeds
    assert not torch.allclose(on, off)


def test_a_system_saved_before_normalisation_loads_reading_raw_states(tok, tmp_path):
    import json

    lm, clip, pipeline = saved_parts(tok, tmp_path)
    model = m3ft.build_m2chat(fusion.build_fused_lm(lm, clip, tok, tokens_per_image=4, lora_rank=4), pipeline, CONFIG)
    folder = m3ft.save_system(model, tmp_path / "systems" / "old", lm_dir="../../../lm", clip_dir="../../../clip",
                              diffusion_dir="../../diffusion")
    meta = json.loads((folder / m3ft.SYSTEM_FILE).read_text())
    assert meta["normalize_layers"] is True and m3ft.load_system(folder)[0].normalize_layers
    del meta["normalize_layers"]  # what systems saved before the option wrote
    (folder / m3ft.SYSTEM_FILE).write_text(json.dumps(meta))
    assert m3ft.load_system(folder)[0].normalize_layers is False


def test_the_stage2_loss_never_reads_the_adapter(tok):
    model = system(tok)
    batch = fusion.sample_batches(tok, m3ft.stage2_samples(6, seed=1), 4, 3)(0)
    with torch.no_grad():
        a = m3ft.stage2_loss(model, batch).item()
        for param in model.adapter.parameters():
            param.add_(1.0)
        b = m3ft.stage2_loss(model, batch).item()
    assert a == b


def test_teacher_forced_scores_on_known_answers(tok, monkeypatch):
    model = system(tok)
    samples = make_samples("story", 3, seed=4)
    forward = model.fused.forward
    img0 = int(model.fused.gen_token_ids[0])

    def oracle(input_ids, *args, **kwargs):
        """Logits that put all weight on the true next token: a perfect LM for these ids."""
        out = forward(input_ids, *args, **kwargs)
        logits = torch.full_like(out.logits, -1e4)
        logits[:, :-1].scatter_(-1, input_ids[:, 1:, None], 1e4)
        out.logits = logits
        return out

    monkeypatch.setattr(model.fused, "forward", oracle)
    perfect = m3ft.teacher_forced_scores(model.fused, tok, samples, batch_size=2)
    assert perfect["token_accuracy"] == 1.0 and perfect["img_recall"] == 1.0 and perfect["img_precision"] == 1.0
    assert perfect["loss"] < 1e-3 and perfect["n"] == 3

    def never_draws(input_ids, *args, **kwargs):
        out = oracle(input_ids, *args, **kwargs)
        out.logits[..., img0] = -1e5
        return out

    monkeypatch.setattr(model.fused, "forward", never_draws)
    blind = m3ft.teacher_forced_scores(model.fused, tok, samples)
    assert blind["img_recall"] == 0.0 and blind["img_precision"] == 0.0 and blind["token_accuracy"] < 1.0
    with pytest.raises(ValueError, match="at least one sample"):
        m3ft.teacher_forced_scores(model.fused, tok, [])


def test_a_half_precision_adapter_and_a_shared_adapter_folder_load(tok, tmp_path):
    lm, clip, pipeline = saved_parts(tok, tmp_path)
    model = m3ft.build_m2chat(fusion.build_fused_lm(lm, clip, tok, tokens_per_image=4, lora_rank=4), pipeline, CONFIG)
    m3ft.save_system(model, tmp_path / "stage1", adapter_dtype=torch.float16)
    m3ft.save_system(model, tmp_path / "stage2", adapter_dir="../stage1/adapter")
    assert not (tmp_path / "stage2" / "adapter").exists()
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "stage1" / "adapter" / "adapter.safetensors")
    assert {t.dtype for t in stored.values()} == {torch.float16}
    half, _, _ = m3ft.load_system(tmp_path / "stage2")
    assert all(p.dtype == torch.float32 for p in half.adapter.parameters())
    for name, param in model.adapter.named_parameters():
        assert torch.equal(dict(half.adapter.named_parameters())[name], param.detach().half().float())
    assert half.source["lm"] == (tmp_path / "lm").resolve() and half.source["diffusion"] == (tmp_path / "diffusion").resolve()
