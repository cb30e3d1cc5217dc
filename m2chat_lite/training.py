"""One small training loop for every model in the course, with a budget, checkpoints and resume.

Taught in notebook ``02_tiny_clip`` (the first model we train) and reused by 03, 04, 07 and 08. Each
model supplies only a ``loss_fn(batch) -> loss``; this loop owns the rest:

- a **budget** in steps (deterministic: the same seed gives the same weights) and/or seconds;
- AdamW with linear warm-up and cosine decay (and an optional warm restart: a second, lower cycle from
  ``restart_step``, notebook 07), gradient clipping, an optional EMA copy of the weights;
- mixed precision on CUDA (``utils.autocast_context``; float16 with a gradient scaler), and bfloat16 on a CPU
  with bfloat16 matrix units if asked (``cpu_bf16``);
- a ``tqdm`` progress bar and a loss history to plot;
- **checkpoints** written atomically every ``checkpoint_every`` steps to ``out_dir/trainer_state.pt``
  (weights, optimizer, scheduler, EMA, step, RNG states), and **resume** from it after an interruption;
- a **NaN guard**: a non-finite loss stops training with a clear message; the last good checkpoint stays;
- **gradient accumulation** (``grad_accum_steps``) and **data parallel** training under
  ``accelerate launch --num_processes N`` (or ``torchrun``): one replica of the model per process.

The data-parallel rule: with ``W`` processes and ``A = grad_accum_steps``, process ``r`` trains optimizer
step ``s`` on the micro-batches ``make_batch((s * A + k) * W + r)``, ``k = 0 .. A-1``. Each backward pass
gets ``loss / (A * W)`` and the gradients are summed over the processes (one all-reduce per step), so every
replica takes the same step on the mean gradient of a global batch of ``W × A`` per-process batches. That
batch is still a function of the step (resume is exact), and one process with ``grad_accum_steps = W * A``
sees the same micro-batches. With ``W = A = 1`` this is the plain loop: ``make_batch(step)``, one backward.
"""

from __future__ import annotations

import atexit
import copy
import math
import os
import pickle
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .utils import amp_dtype, atomic_torch_save, autocast_context, cpu_has_bf16

STATE_FILE = "trainer_state.pt"


@dataclass
class TrainConfig:
    max_steps: int | None = 1000  # stop after this many optimizer steps (None: no step limit)
    max_seconds: float | None = None  # and/or after this much wall-clock time
    lr: float = 1e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio (needs max_steps)
    # A warm restart (SGDR, Loshchilov & Hutter 2017): the first cycle ends at restart_step, and a second one,
    # with its own warm-up and cosine, peaks at lr * restart_lr_ratio and runs to max_steps
    restart_step: int | None = None
    restart_lr_ratio: float = 1.0
    grad_clip: float | None = 1.0
    ema_decay: float | None = None  # keep an exponential moving average of the weights
    log_every: int = 10
    checkpoint_every: int | None = None  # steps between checkpoints (None: only at the end)
    seed: int = 0
    grad_accum_steps: int = 1  # micro-batches per optimizer step and process (their gradients are averaged)
    # bfloat16 autocast on a CPU too, when the CPU has bfloat16 matrix units (utils.cpu_has_bf16; ignored
    # elsewhere). CUDA always uses mixed precision.
    cpu_bf16: bool = False

    def __post_init__(self):
        if self.max_steps is None and self.max_seconds is None:
            raise ValueError("give a training budget: max_steps, max_seconds or both")
        if self.max_steps is not None and self.max_steps <= 0:
            raise ValueError(f"max_steps must be positive, got {self.max_steps}")
        if self.max_seconds is not None and self.max_seconds <= 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.restart_step is not None and (self.max_steps is None or not 0 < self.restart_step < self.max_steps):
            raise ValueError(f"restart_step must fall inside the step budget (0 < restart_step < max_steps); got "
                             f"restart_step={self.restart_step}, max_steps={self.max_steps}")
        if self.restart_lr_ratio <= 0:
            raise ValueError(f"restart_lr_ratio must be positive, got {self.restart_lr_ratio}")
        if isinstance(self.grad_accum_steps, bool) or not isinstance(self.grad_accum_steps, int) \
                or self.grad_accum_steps < 1:
            raise ValueError(f"grad_accum_steps must be a positive integer (micro-batches per optimizer step), "
                             f"got {self.grad_accum_steps!r}")


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including before a resume)
    seconds: float  # wall-clock time of this run
    history: list[dict] = field(default_factory=list)  # {"step", "loss", "lr"} every log_every steps
    resumed_from: int = 0

    @property
    def final_loss(self) -> float:
        return self.history[-1]["loss"] if self.history else float("nan")


def lr_lambda(config: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` over ``max_steps`` (flat if no step budget). With
    ``restart_step`` the first cycle ends there and a second one, ``restart_lr_ratio`` as high, runs to the end."""
    def cycle(step: int, length: int | None) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if length is None:
            return 1.0
        progress = min(1.0, (step - config.warmup_steps) / max(1, length - config.warmup_steps))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def factor(step: int) -> float:
        restart = config.restart_step
        if restart is not None and step >= restart:
            return config.restart_lr_ratio * cycle(step - restart, config.max_steps - restart)
        return cycle(step, restart if restart is not None else config.max_steps)
    return factor


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1.0 - decay)


def data_parallel() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: ``(0, 1)`` on its own. Under ``accelerate launch`` or
    ``torchrun`` (they set ``WORLD_SIZE``) the first call joins their process group through ``accelerate``
    (gloo on CPUs, NCCL on GPUs, where it also makes ``"cuda"`` mean this process's own GPU)."""
    if not _joined() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState  # lazy: only a data-parallel run pays for the import

        PartialState(cpu=not torch.cuda.is_available())
        atexit.register(dist.destroy_process_group)  # without it gloo can abort at exit
    return (dist.get_rank(), dist.get_world_size()) if _joined() else (0, 1)


def _joined() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """True in a single process and in process 0 of a data-parallel run: the one that writes files."""
    return data_parallel()[0] == 0


def wait_for_everyone() -> None:
    """A barrier in a data-parallel run (nothing on its own): every process waits for the slowest."""
    if data_parallel()[1] > 1:
        dist.barrier()


def _sum_over_processes(values: torch.Tensor, op=None) -> torch.Tensor:
    dist.all_reduce(values, op=op or dist.ReduceOp.SUM)
    return values


@torch.no_grad()
def _sum_gradients(params: list[torch.nn.Parameter]) -> None:
    """Sum each parameter's gradient over the processes, in one all-reduce. A parameter that got no
    gradient in any process keeps ``grad = None`` (AdamW leaves it alone, as it does in one process)."""
    used = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    flat = _sum_over_processes(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                                          for p in params] + [used]))
    *grads, used = flat.split([p.numel() for p in params] + [len(params)])
    for p, grad, u in zip(params, grads, used.tolist()):
        p.grad = grad.view_as(p).to(p.dtype) if u > 0 else None


def train(model: torch.nn.Module, loss_fn: Callable[[object], torch.Tensor], make_batch: Callable[[int], object],
          config: TrainConfig, out_dir: str | Path | None = None, device: str = "cpu",
          progress: bool = True, description: str = "training",
          log_extra: Callable[[], dict] | None = None) -> TrainResult:
    """Train the parameters of ``model`` that require grad by minimising ``loss_fn(batch)``.

    ``make_batch(step)`` gives the batch for a step: a function of the step index, so a resumed run sees
    exactly the data an uninterrupted one would (with several micro-batches or processes, the index is a
    micro-batch's: see the module's docstring). With ``out_dir``, training resumes from
    ``out_dir/trainer_state.pt`` if it exists and checkpoints there (process 0 writes it; a checkpoint
    resumes with any number of processes). Afterwards, if ``ema_decay`` is set, the EMA weights are copied
    into ``model``. ``log_extra()``, if given, adds its entries to each history record (the fusion gate's
    value, say, to plot it opening).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (every parameter has requires_grad=False)")
    rank, world = data_parallel()
    accum = config.grad_accum_steps
    if world > 1:  # every replica starts from process 0's weights
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                dist.broadcast(tensor, src=0)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=config.betas)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    # float16 autocast (a T4) needs its gradients scaled so small ones do not flush to zero; a no-op elsewhere
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype(device) == torch.float16)
    cpu_bf16 = config.cpu_bf16 and cpu_has_bf16()
    ema = copy.deepcopy(model).eval().requires_grad_(False) if config.ema_decay else None
    history: list[dict] = []
    step = 0
    state_path = Path(out_dir) / STATE_FILE if out_dir is not None else None
    if state_path is not None and state_path.is_file():
        step, history = _load_state(state_path, model, optimizer, scheduler, ema)
    resumed_from = step

    def checkpoint() -> None:
        if state_path is not None:
            if rank == 0:
                atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scheduler": scheduler.state_dict(), "ema": ema.state_dict() if ema else None,
                                   "step": step, "history": history, "rng": _rng_state(),
                                   "config": asdict(config)}, state_path)
            wait_for_everyone()

    def keep_going() -> bool:
        go = (config.max_steps is None or step < config.max_steps) and \
             (config.max_seconds is None or time.perf_counter() - start < config.max_seconds)
        if world > 1 and config.max_seconds is not None:  # clocks differ: stop when the first process must
            go = bool(_sum_over_processes(torch.tensor(float(go), device=params[0].device), dist.ReduceOp.MIN))
        return go

    model.train()
    start = time.perf_counter()
    bar = tqdm(total=config.max_steps, initial=step, desc=description, disable=not progress or rank != 0,
               leave=False)
    running = 0.0
    while keep_going():
        optimizer.zero_grad(set_to_none=True)
        losses = []
        for micro in range(accum):
            batch = make_batch((step * accum + micro) * world + rank)
            with autocast_context(device, cpu_bf16):
                loss = loss_fn(batch)
            scaler.scale(loss / (accum * world)).backward()  # exact when accum * world == 1
            losses.append(loss.detach())
        step_loss = sum(losses) / accum
        if world > 1:  # the mean over processes; a non-finite loss anywhere makes it non-finite everywhere
            step_loss = _sum_over_processes(step_loss.float().reshape(1)) / world
        loss_value = step_loss.item()
        if not math.isfinite(loss_value):
            bar.close()
            kept = f"the last good checkpoint (step {resumed_from if not history else history[-1]['step']}) " \
                   f"is in {state_path}" if state_path and state_path.is_file() else "no checkpoint was written"
            raise FloatingPointError(f"the loss became {loss_value} at step {step}; {kept}. Lower the learning "
                                     f"rate (now {config.lr}) or check the data, then train again")
        if world > 1:
            _sum_gradients(params)
        scaler.unscale_(optimizer)
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        scaler.step(optimizer)  # skipped (float16 only) when a gradient overflowed; the scale then shrinks
        scaler.update()
        scheduler.step()
        if ema is not None:
            update_ema(ema, model, config.ema_decay)
        step += 1
        running += loss_value
        if step % config.log_every == 0:
            history.append({"step": step, "loss": running / config.log_every, "lr": scheduler.get_last_lr()[0],
                            **(log_extra() if log_extra else {})})
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
            running = 0.0
        bar.update(1)
        if config.checkpoint_every and step % config.checkpoint_every == 0:
            checkpoint()
    bar.close()
    checkpoint()
    if ema is not None:
        model.load_state_dict(ema.state_dict())
    model.eval()
    return TrainResult(step, time.perf_counter() - start, history, resumed_from)


def _load_state(path: Path, model, optimizer, scheduler, ema) -> tuple[int, list[dict]]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        _set_rng_state(state["rng"])
    except (RuntimeError, KeyError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(f"cannot resume from {path}: {error}. It belongs to another model or is damaged; "
                         "delete it to start from scratch") from error
    return int(state["step"]), list(state["history"])
