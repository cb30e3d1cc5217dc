"""The M³Adapter (adapter.py): shapes, masking, the four gate modes, the condition span, save and load."""

import pytest
import torch

from m2chat_lite.adapter import AdapterConfig, M3Adapter, condition_span, gather_spans

CONFIG = AdapterConfig(lm_dim=24, vision_dim=16, cond_dim=32, pooled_dim=20, num_queries=6, num_layers=2,
                       num_heads=4, gate_mode="adaptive")


def adapter(mode="adaptive", value=0.5, seed=0, **settings):
    torch.manual_seed(seed)
    a = M3Adapter(AdapterConfig(**{**CONFIG.__dict__, "gate_mode": mode, "gate_value": value, **settings})).eval()
    return a


def inputs(b=3, s=7, p=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, s, 24, generator=g)
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 4:] = False
    visual = torch.randn(b, p, 16, generator=g)
    return hidden, mask, visual


def test_outputs_have_the_generators_shapes():
    hidden, mask, visual = inputs()
    out = adapter()(hidden, mask, visual, return_attention=True)
    assert out.prompt_embeds.shape == (3, 6, 32) and out.pooled.shape == (3, 20) and out.gate.shape == (3, 6)
    assert len(out.attention["semantic"]) == 2 and out.attention["semantic"][0].shape == (3, 6, 7)
    assert out.attention["visual"][0].shape == (3, 6, 5)


@pytest.mark.parametrize("visual_reads_words", [False, True])
def test_masked_hidden_states_do_not_matter(visual_reads_words):
    hidden, mask, visual = inputs()
    a = adapter("fixed", 0.8, visual_reads_words=visual_reads_words)
    changed = hidden.clone()
    changed[0, 4:] = 100.0  # behind the mask
    with torch.no_grad():
        assert torch.allclose(a(hidden, mask).prompt_embeds, a(changed, mask).prompt_embeds, atol=1e-6)
        assert torch.allclose(a(hidden, mask, visual).prompt_embeds, a(changed, mask, visual).prompt_embeds, atol=1e-6)


def test_the_visual_branch_alone_can_be_read_through_the_output_head():
    hidden, mask, visual = inputs()
    a = adapter("fixed", 0.0)  # the gate shut: the fused output does not show the picture, visual_embeds does
    with torch.no_grad():
        assert a(hidden, mask, visual).visual_embeds is None
        out = a(hidden, mask, visual, return_visual=True)
        other = a(hidden, mask, torch.randn_like(visual), return_visual=True)
    assert out.visual_embeds.shape == out.prompt_embeds.shape
    assert torch.allclose(out.prompt_embeds, other.prompt_embeds) and not torch.allclose(out.visual_embeds,
                                                                                          other.visual_embeds)


def test_no_reference_picture_means_no_visual_influence_and_a_zero_gate():
    hidden, mask, visual = inputs()
    a = adapter("fixed", 0.8)
    no_ref = torch.tensor([False, True, False])
    with torch.no_grad():
        out = a(hidden, mask, visual, has_reference=no_ref)
        alone = a(hidden, mask)
        other = a(hidden, mask, torch.randn_like(visual), has_reference=no_ref)
    assert torch.allclose(out.prompt_embeds[0], alone.prompt_embeds[0], atol=1e-6)
    assert torch.allclose(out.prompt_embeds[0], other.prompt_embeds[0], atol=1e-6)
    assert not torch.allclose(out.prompt_embeds[1], other.prompt_embeds[1])
    assert out.gate[0].eq(0).all() and out.gate[1].eq(0.8).all()


@pytest.mark.parametrize("visual_reads_words", [False, True])
def test_the_visual_branch_runs_only_on_rows_with_a_picture_and_computes_the_same(visual_reads_words):
    """Rows without a reference skip the visual branch; the batch's outputs and gradients are those of each row
    run alone (a row with a picture runs the branch on the whole batch, a row without one skips it)."""
    hidden, mask, visual = inputs(b=4)
    a = adapter("adaptive", visual_reads_words=visual_reads_words)
    with torch.no_grad():  # open the gate and the words' way in, so that both matter
        a.adaptive_gate.bias.fill_(0.7)
        if visual_reads_words:
            a.visual.project_words.weight.normal_(0, 0.1)
    has_ref = torch.tensor([True, False, True, False])
    out = a(hidden, mask, visual, has_reference=has_ref, return_attention=True)
    (out.prompt_embeds.square().sum() + out.pooled.square().sum()).backward()
    batch_grad = {n: p.grad.clone() for n, p in a.named_parameters() if p.grad is not None}
    a.zero_grad()
    rows = [a(hidden[i:i + 1], mask[i:i + 1], visual[i:i + 1], has_reference=has_ref[i:i + 1]) for i in range(4)]
    sum(r.prompt_embeds.square().sum() + r.pooled.square().sum() for r in rows).backward()
    for i, r in enumerate(rows):
        assert torch.allclose(out.prompt_embeds[i], r.prompt_embeds[0], atol=1e-5)
        assert torch.allclose(out.gate[i], r.gate[0], atol=1e-6)
    for name, grad in batch_grad.items():
        assert torch.allclose(grad, dict(a.named_parameters())[name].grad, atol=1e-4), name
    assert out.gate[1].eq(0).all() and out.gate[0].gt(0).all()
    words = 7 if visual_reads_words else 0
    assert [w.shape for w in out.attention["visual"]] == [(4, 6, 5 + words)] * 2
    assert out.attention["visual"][0][[1, 3]].eq(0).all() and out.attention["visual"][0][[0, 2]].sum(-1).allclose(
        torch.ones(2, 6))
    none = a(hidden, mask, visual, has_reference=torch.zeros(4, dtype=torch.bool), return_attention=True)
    assert none.gate.eq(0).all() and [w.shape for w in none.attention["visual"]] == [(4, 6, 5 + words)] * 2


@pytest.mark.parametrize("mode", ["off", "static", "adaptive"])
def test_gates_that_start_closed_ignore_the_picture(mode):
    hidden, mask, visual = inputs()
    a = adapter(mode)
    with torch.no_grad():
        with_picture = a(hidden, mask, visual)
        without = a(hidden, mask)
    assert with_picture.gate.eq(0).all()
    assert torch.allclose(with_picture.prompt_embeds, without.prompt_embeds, atol=1e-6)


def test_open_gates_let_the_picture_in_and_modes_can_be_switched():
    hidden, mask, visual = inputs()
    a = adapter("static")
    a.static_gate.data.fill_(0.5)
    with torch.no_grad():
        static = a(hidden, mask, visual)
        a.set_gate("fixed", 1.0)
        fixed = a(hidden, mask, visual)
        a.set_gate("off")
        off = a(hidden, mask, visual)
    assert torch.allclose(static.gate, torch.full((3, 6), float(torch.tanh(torch.tensor(0.5)))))
    assert fixed.gate.eq(1).all() and off.gate.eq(0).all()
    assert not torch.allclose(static.prompt_embeds, off.prompt_embeds)
    a.adaptive_gate.bias.data.fill_(1.0)
    a.adaptive_gate.weight.data.normal_()
    a.set_gate("adaptive")
    with torch.no_grad():
        adaptive = a(hidden, mask, visual).gate
    assert adaptive.std() > 0 and adaptive.abs().max() <= 1  # differs per query and picture


def test_bad_settings_and_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="gate mode"):
        AdapterConfig(24, 16, 32, 20, gate_mode="sometimes")
    with pytest.raises(ValueError, match="divisible"):
        AdapterConfig(24, 16, 30, 20, num_heads=4)
    with pytest.raises(ValueError, match="gate_value"):
        AdapterConfig(24, 16, 32, 20, gate_value=2.0)
    hidden, mask, _ = inputs()
    with pytest.raises(ValueError, match="at least one True"):
        adapter()(hidden, torch.zeros_like(mask))


def test_every_part_gets_gradients_when_the_gate_is_trainable():
    hidden, mask, visual = inputs()
    a = adapter("static").train()
    out = a(hidden, mask, visual)
    (out.prompt_embeds.pow(2).mean() + out.pooled.pow(2).mean()).backward()
    assert a.queries.grad.abs().sum() > 0 and a.static_gate.grad is not None and a.static_gate.grad != 0
    assert a.semantic.project.weight.grad.abs().sum() > 0


def test_a_visual_branch_that_reads_the_words_starts_deaf_to_them_and_learns_to_listen():
    hidden, mask, visual = inputs()
    a = adapter("fixed", 0.8, visual_reads_words=True).train()
    out = a(hidden, mask, visual, return_attention=True)
    assert out.attention["visual"][0].shape == (3, 6, 5 + 7)  # the patches, then the LM's span
    assert a.visual.project_words.weight.eq(0).all() and a.visual.word_positions.eq(0).all()
    queries, picture = a.queries.expand(3, -1, -1), torch.ones(3, 5, dtype=torch.bool)
    with torch.no_grad():  # at step 0 every word enters as the same zero vector: their content is unread
        heard = a.visual(queries, visual, picture, False, hidden, mask)[0]
        other = a.visual(queries, visual, picture, False, torch.randn_like(hidden), mask)[0]
    assert torch.allclose(heard, other, atol=1e-6)
    out.prompt_embeds.pow(2).mean().backward()
    assert a.visual.project_words.weight.grad.abs().sum() > 0
    # an adapter without the words' way in warm-starts one with it: only the new parts are missing
    missing, unexpected = a.load_state_dict(adapter().state_dict(), strict=False)
    assert sorted(missing) == ["visual.project_words.bias", "visual.project_words.weight", "visual.word_positions"]
    assert not unexpected


def test_condition_span_is_found_by_token_ids():
    gen = torch.tensor([90, 91, 92])
    ids = torch.tensor([[0, 0, 5, 6, 7, 90, 91, 92, 8, 9, 90, 91, 92],
                        [5, 6, 7, 8, 9, 10, 11, 12, 90, 91, 92, 3, 3]])
    mask = torch.tensor([[0, 0] + [1] * 11, [1] * 13])
    spans = condition_span(ids, gen, context_tokens=4, attention_mask=mask)
    assert spans == [(0, 2, 8), (0, 6, 13), (1, 4, 11)]  # never into the left padding
    hidden = torch.arange(2 * 13, dtype=torch.float).view(2, 13, 1)
    states, span_mask = gather_spans(hidden, spans)
    assert states.shape == (3, 7, 1) and span_mask.sum(1).tolist() == [6, 7, 7]
    assert states[2, :7, 0].tolist() == list(range(13 + 4, 13 + 11))
    with pytest.raises(ValueError, match="incomplete"):
        condition_span(torch.tensor([[5, 90, 91]]), gen)
    with pytest.raises(ValueError, match="in order"):
        condition_span(torch.tensor([[5, 91, 90, 92]]), gen)


def test_save_and_load_round_trip(tmp_path):
    a = adapter("static")
    a.static_gate.data.fill_(0.3)
    a.save_pretrained(tmp_path / "adapter")
    b = M3Adapter.from_pretrained(tmp_path / "adapter")
    hidden, mask, visual = inputs()
    with torch.no_grad():
        assert torch.equal(a(hidden, mask, visual).prompt_embeds, b(hidden, mask, visual).prompt_embeds)
    assert b.gate_mode == "static"
    (tmp_path / "adapter" / "adapter.safetensors").write_bytes(b"not weights")
    with pytest.raises(ValueError, match="cannot load"):
        M3Adapter.from_pretrained(tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="missing"):
        M3Adapter.from_pretrained(tmp_path / "nowhere")
