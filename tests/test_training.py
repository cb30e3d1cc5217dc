"""The shared training loop: budgets, determinism, checkpoints and resume, the NaN guard."""

import math

import pytest
import torch

from m2chat_lite.training import STATE_FILE, TrainConfig, lr_lambda, train
from m2chat_lite.utils import set_seed


def regression():
    """A tiny linear-regression problem: y = 3x - 1 with a batch per step derived from the step."""
    set_seed(0)
    model = torch.nn.Linear(1, 1)

    def make_batch(step):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(16, 1, generator=g)
        return x, 3 * x - 1

    def loss_fn(batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    return model, loss_fn, make_batch


def test_training_reduces_the_loss_and_is_deterministic():
    runs = []
    for _ in range(2):
        model, loss_fn, make_batch = regression()
        result = train(model, loss_fn, make_batch, TrainConfig(max_steps=200, lr=0.05, warmup_steps=5),
                       progress=False)
        runs.append([p.detach().clone() for p in model.parameters()])
    assert result.steps == 200 and result.history[-1]["loss"] < 0.01 < result.history[0]["loss"]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert abs(model.weight.item() - 3) < 0.1 and abs(model.bias.item() + 1) < 0.1


def test_resume_continues_exactly_where_it_stopped(tmp_path):
    model, loss_fn, make_batch = regression()
    train(model, loss_fn, make_batch, TrainConfig(max_steps=60, lr=0.05, ema_decay=0.9), progress=False)
    straight = [p.detach().clone() for p in model.parameters()]

    model, loss_fn, make_batch = regression()
    first = train(model, loss_fn, make_batch, TrainConfig(max_steps=60, max_seconds=1e-9, lr=0.05, ema_decay=0.9),
                  out_dir=tmp_path, progress=False)  # "interrupted" almost at once
    assert first.steps < 60 and (tmp_path / STATE_FILE).is_file()
    model, loss_fn, make_batch = regression()
    second = train(model, loss_fn, make_batch, TrainConfig(max_steps=60, lr=0.05, ema_decay=0.9),
                   out_dir=tmp_path, progress=False)
    assert second.resumed_from == first.steps and second.steps == 60
    assert all(torch.allclose(a, b) for a, b in zip(straight, model.parameters()))


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path):
    model, loss_fn, make_batch = regression()
    train(model, loss_fn, make_batch, TrainConfig(max_steps=20, lr=0.05), out_dir=tmp_path, progress=False)
    saved = (tmp_path / STATE_FILE).read_bytes()
    bad = lambda batch: loss_fn(batch) * float("nan")  # noqa: E731
    with pytest.raises(FloatingPointError, match="the loss became nan at step 20.*last good checkpoint"):
        train(model, bad, make_batch, TrainConfig(max_steps=40, lr=0.05), out_dir=tmp_path, progress=False)
    assert (tmp_path / STATE_FILE).read_bytes() == saved


def test_bad_budgets_and_damaged_state_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="give a training budget"):
        TrainConfig(max_steps=None, max_seconds=None)
    with pytest.raises(ValueError, match="max_steps must be positive"):
        TrainConfig(max_steps=0)
    with pytest.raises(ValueError, match="max_seconds must be positive"):
        TrainConfig(max_seconds=-1)
    (tmp_path / STATE_FILE).write_bytes(b"not a checkpoint")
    model, loss_fn, make_batch = regression()
    with pytest.raises(ValueError, match="cannot resume from .*delete it to start from scratch"):
        train(model, loss_fn, make_batch, TrainConfig(max_steps=5), out_dir=tmp_path, progress=False)
    frozen = torch.nn.Linear(1, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(frozen, loss_fn, make_batch, TrainConfig(max_steps=5), progress=False)


def test_a_warm_restart_runs_a_second_cycle_at_its_share_of_the_rate():
    config = TrainConfig(max_steps=100, lr=1.0, warmup_steps=10, restart_step=60, restart_lr_ratio=0.25)
    factor = lr_lambda(config)
    first = lr_lambda(TrainConfig(max_steps=60, warmup_steps=10))
    second = lr_lambda(TrainConfig(max_steps=40, warmup_steps=10))
    assert [factor(s) for s in range(60)] == [first(s) for s in range(60)]  # a 60-step schedule of its own
    assert [factor(60 + s) for s in range(40)] == pytest.approx([0.25 * second(s) for s in range(40)])
    assert factor(59) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 50)))  # near the floor
    assert factor(60) == pytest.approx(0.25 / 10)  # warms up again...
    assert max(factor(s) for s in range(60, 100)) == pytest.approx(0.25)  # ...to a quarter of the peak
    assert factor(99) == pytest.approx(0.25 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 29 / 30))))

    model, loss_fn, make_batch = regression()  # and the loop follows it
    result = train(model, loss_fn, make_batch, TrainConfig(max_steps=100, lr=0.05, warmup_steps=10, restart_step=60,
                                                           restart_lr_ratio=0.25, log_every=1), progress=False)
    assert [h["lr"] for h in result.history] == pytest.approx([0.05 * factor(s) for s in range(1, 101)])


@pytest.mark.parametrize("budget", [dict(max_steps=100, restart_step=100), dict(max_steps=100, restart_step=0),
                                    dict(max_steps=None, max_seconds=60, restart_step=10),
                                    dict(max_steps=100, restart_step=50, restart_lr_ratio=0.0)])
def test_a_restart_outside_the_budget_or_without_a_rate_is_refused(budget):
    with pytest.raises(ValueError, match="restart"):
        TrainConfig(**budget)


def test_gradient_accumulation_equals_one_step_on_the_union_of_the_micro_batches():
    model, loss_fn, make_batch = regression()
    calls = []
    train(model, loss_fn, lambda i: calls.append(i) or make_batch(i),
          TrainConfig(max_steps=20, lr=0.05, warmup_steps=5, grad_accum_steps=2), progress=False)
    assert calls == list(range(40))  # step s accumulates micro-batches 2s and 2s + 1
    accumulated = [p.detach().clone() for p in model.parameters()]

    model, loss_fn, make_batch = regression()

    def union(step):  # both micro-batches at once: the mean loss over 32 examples
        (x0, y0), (x1, y1) = make_batch(2 * step), make_batch(2 * step + 1)
        return torch.cat([x0, x1]), torch.cat([y0, y1])

    train(model, loss_fn, union, TrainConfig(max_steps=20, lr=0.05, warmup_steps=5), progress=False)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-5) for a, b in zip(accumulated, model.parameters()))


def test_cpu_bf16_trains_in_bfloat16_only_where_the_cpu_has_bfloat16_units(monkeypatch):
    import m2chat_lite.training as training

    def run(cpu_bf16, has_units):
        monkeypatch.setattr(training, "cpu_has_bf16", lambda: has_units)
        model, loss_fn, make_batch = regression()
        dtypes = []

        def watched(batch):  # the dtype the linear layer computes in under the loop's autocast
            dtypes.append(model(batch[0]).dtype)
            return loss_fn(batch)

        train(model, watched, make_batch, TrainConfig(max_steps=200, lr=0.05, warmup_steps=5, cpu_bf16=cpu_bf16),
              progress=False)
        return [p.detach().clone() for p in model.parameters()], set(dtypes)

    plain, plain_dtypes = run(False, True)
    ignored, ignored_dtypes = run(True, False)  # asked for, but this CPU would emulate it: float32 as before
    fast, fast_dtypes = run(True, True)
    assert plain_dtypes == ignored_dtypes == {torch.float32} and fast_dtypes == {torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(plain, ignored))
    # bfloat16 compute, float32 weights: it still fits y = 3x - 1, not bit for bit the same as float32
    assert all(p.dtype == torch.float32 for p in fast)
    assert abs(fast[0].item() - 3) < 0.15 and abs(fast[1].item() + 1) < 0.15
    assert not all(torch.equal(a, b) for a, b in zip(plain, fast))


def test_cpu_has_bf16_instructions_reads_the_cpus_flags(tmp_path, monkeypatch):
    import m2chat_lite.utils as utils

    monkeypatch.setattr(utils, "cpu_has_bf16", lambda: False)  # no AMX tiles: the flags decide
    zen4, older = tmp_path / "zen4", tmp_path / "older"
    zen4.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    older.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_vnni\n")
    assert utils.cpu_has_bf16_instructions(zen4) and not utils.cpu_has_bf16_instructions(older)
    assert not utils.cpu_has_bf16_instructions(tmp_path / "missing")  # no /proc (macOS): say no, do not fail
    monkeypatch.setattr(utils, "cpu_has_bf16", lambda: True)  # AMX tiles are bfloat16 instructions too
    assert utils.cpu_has_bf16_instructions(older)
