"""The seeded, resumable training loop the weather VAE and UNet share.

Step s (0-based) draws all of its randomness (batch, noise, timesteps, caption dropout) from its own
`torch.Generator` seeded with hash(seed, s), so a run stopped after step s and resumed gives the same
weights as one that never stopped. Optimisation: AdamW; gradients clipped to norm `clip`; the learning rate
of step s (N = steps, W = warmup, D = decay_steps)

    lr_s = lr * min(1, (s + 1) / W) * c_s,  c_s = 1 for s < N - D, else the cosine
    c_s = f + (1 - f) (1 + cos(pi (s - N + D) / D)) / 2   (f = final_lr_fraction),

a pure function of s, so a resumed run follows the same schedule; optional EMA of the weights,

    ema <- d ema + (1 - d) w,   d = min(ema_decay, (1 + s) / (10 + s))   (diffusers' EMAModel warm-up).

Every `checkpoint_every` steps, at the end and when the wall-clock budget runs out, DIR/state.pt is written
with `shards.state.save_state` (module, EMA and optimizer states, the step: plain data, read back with
`load_state`, weights_only) and DIR/train.jsonl gets the mean losses since the last record and the measured
steps/s; on resume the records after the state's step are dropped (`trim_log`), so a killed run and its
resume log each step once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from d4ir.shards.checks import check_positive_ints
from d4ir.shards.io import append_jsonl
from d4ir.shards.layout import LOG_FILE, STATE_FILE
from d4ir.shards.progress import progress_bar
from d4ir.shards.state import load_state, restoring, save_state, trim_log


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation and bookkeeping of one training run.

    Args:
        steps: total optimizer steps.
        lr: peak learning rate.
        warmup: linear warm-up steps.
        weight_decay: AdamW weight decay.
        clip: gradient-norm clip (0 disables).
        ema_decay: EMA decay, or 0 for no EMA.
        seed: seed of every step's generator.
        checkpoint_every: steps between state.pt writes.
        log_every: steps between train.jsonl records.
        budget_minutes: stop (resumably) after this much wall-clock time; 0 means no limit.
        stop_step: stop (resumably) once this many steps are done; 0 means none (a step cap replays a time
            cap exactly: bench/train_weather_sd.py --vae-cap-step / --unet-cap-step).
        decay_steps: the last `decay_steps` steps follow a cosine from lr down to final_lr_fraction * lr.
        final_lr_fraction: where the cosine ends, in [0, 1].
    """

    steps: int
    lr: float = 5e-4
    warmup: int = 100
    weight_decay: float = 0.0
    clip: float = 1.0
    ema_decay: float = 0.0
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 25
    budget_minutes: float = 0.0
    stop_step: int = 0
    decay_steps: int = 0
    final_lr_fraction: float = 0.0

    def __post_init__(self) -> None:
        check_positive_ints(self, ("steps",), owner="LoopConfig.")
        if not (self.lr > 0 and self.warmup >= 0 and self.weight_decay >= 0 and self.clip >= 0):
            raise ValueError("LoopConfig needs lr > 0, warmup >= 0, weight_decay >= 0 and clip >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"LoopConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.checkpoint_every < 1 or self.log_every < 1 or self.budget_minutes < 0 or self.stop_step < 0:
            raise ValueError("LoopConfig needs checkpoint_every >= 1, log_every >= 1, budget_minutes >= 0 and "
                             "stop_step >= 0")
        if not 0 <= self.decay_steps <= self.steps or not 0.0 <= self.final_lr_fraction <= 1.0:
            raise ValueError(f"LoopConfig needs 0 <= decay_steps <= steps ({self.steps}) and final_lr_fraction "
                             f"in [0, 1], got {self.decay_steps} and {self.final_lr_fraction}")

    def lr_at(self, step: int) -> float:
        """The learning rate of step `step` (0-based): warm-up, constant, then the cosine decay."""
        lr = self.lr * min(1.0, (step + 1) / max(1, self.warmup))
        into = step - (self.steps - self.decay_steps)
        if self.decay_steps and into >= 0:
            f = self.final_lr_fraction
            lr *= f + (1 - f) * 0.5 * (1 + math.cos(math.pi * into / self.decay_steps))
        return lr


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one step: a pure function of (seed, step)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(step)) % (2**63))


def _ema_update(ema: dict[str, torch.Tensor], module: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            ema[name].lerp_(p.detach(), 1.0 - decay)


def ema_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A fresh EMA: copies of the module's parameters."""
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def train_loop(
    out_dir: str | Path,
    modules: dict[str, torch.nn.Module],
    loss_fn: Callable[[int, torch.Generator], dict[str, torch.Tensor]],
    config: LoopConfig,
    *,
    ema_of: str | None = None,
    progress: bool = True,
    desc: str = "train",
    load_only: bool = False,
) -> dict:
    """Train `modules` on `loss_fn(step, generator) -> {"loss": scalar, other logged scalars}`; resumable.

    Args:
        out_dir: DIR for state.pt and train.jsonl (created).
        modules: the trained modules by name (their parameters with requires_grad are optimised).
        loss_fn: builds one step's loss; called with the modules in train mode.
        config: optimisation settings.
        ema_of: name of the module whose EMA is kept (needs config.ema_decay > 0).
        progress: show a progress bar.
        desc: progress-bar label.
        load_only: restore the saved state (if any) and return without training.
    Returns:
        {"step", "done", "steps_per_s", "last": mean logged values of the last record, "ema": EMA state or None}.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = [p for m in modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    ema = ema_state(modules[ema_of]) if ema_of is not None and config.ema_decay > 0 else None
    start, state_path = 0, out / STATE_FILE
    if state_path.is_file():
        state = load_state(state_path, schema={"step": int, "modules": dict.fromkeys(modules, dict),
                                               "optimizer": dict})
        for name, m in modules.items():
            with restoring(state_path, f"modules.{name}"):
                m.load_state_dict(state["modules"][name])
        with restoring(state_path, "optimizer"):
            opt.load_state_dict(state["optimizer"])
        if ema is not None and state.get("ema") is not None:
            ema = state["ema"]
        start = state["step"]
        trim_log(out / LOG_FILE, "step", start)

    def save(step: int) -> None:
        save_state(
            state_path,
            {
                "step": step,
                "modules": {n: m.state_dict() for n, m in modules.items()},
                "optimizer": opt.state_dict(),
                "ema": ema,
                "config": asdict(config),
            },
        )

    for m in modules.values():
        m.train()
    t0, sums, count, last, rate = time.perf_counter(), {}, 0, {}, float("nan")
    t_log, step = t0, start
    bar = progress_bar(total=config.steps, initial=start, desc=desc, enabled=progress)
    while step < config.steps and not load_only:
        if config.budget_minutes and time.perf_counter() - t0 > 60 * config.budget_minutes:
            break
        if config.stop_step and step >= config.stop_step:
            break
        for group in opt.param_groups:
            group["lr"] = config.lr_at(step)
        losses = loss_fn(step, step_generator(config.seed, step))
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if config.clip:
            torch.nn.utils.clip_grad_norm_(params, config.clip)
        opt.step()
        if ema is not None:
            decay = min(config.ema_decay, (1 + step) / (10 + step))
            _ema_update(ema, modules[ema_of], decay)
        step += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        count += 1
        bar.update()
        if step % config.log_every == 0 or step == config.steps:
            now = time.perf_counter()
            rate = count / max(now - t_log, 1e-9)
            last = {k: v / count for k, v in sums.items()}
            append_jsonl(out / LOG_FILE, {"step": step, "steps_per_s": round(rate, 4), **last})
            bar.set_postfix(loss=f"{last['loss']:.4f}", it_s=f"{rate:.2f}")
            sums, count, t_log = {}, 0, now
        if step % config.checkpoint_every == 0 and step < config.steps:
            save(step)
    bar.close()
    if step > start or not (state_path.is_file() or load_only):
        save(step)
    for m in modules.values():
        m.eval()
    elapsed = time.perf_counter() - t0
    overall = (step - start) / elapsed if step > start and elapsed > 0 else rate
    return {"step": step, "done": step >= config.steps, "steps_per_s": overall, "last": last, "ema": ema}


def load_ema_into(module: torch.nn.Module, ema: dict[str, torch.Tensor] | None) -> None:
    """Copy EMA weights into `module` (no-op for None)."""
    if ema is None:
        return
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(ema[name])
