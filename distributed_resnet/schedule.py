"""Learning-rate policies: the reference's step schedule with Keras' ReduceLROnPlateau (per epoch), and the fast
recipe's one cycle (per step).

In Keras, `LearningRateScheduler` sets the LR from the schedule at the start of every epoch, so a cut that
`ReduceLROnPlateau` makes at the end of an epoch is overwritten before it acts (see docs/recipe.md). Two
policies therefore:
- "keras": the LR is the schedule alone; the plateau monitor still runs, and its (ineffective) cuts are logged.
- "compose": each plateau cut persists as a multiplier on the schedule, which is what the recipe meant;
  `min_lr` is a floor under the product, as `ReduceLROnPlateau(min_lr=...)` promises.
`schedule_epochs` N places the reference's steps at the same fractions of N (80/200, 120/200, ...), so a short
run (a sweep trial) goes through the whole recipe in miniature; N = 200 is the reference exactly. The plateau's
patience and cooldown can be given as fractions of N too (TrainConfig.patience_epochs), so that a setting found
on a short run means the same at full length.
`OneCycle` sets the LR at every step from the step's index in the run alone: a warm-up from
`start_factor * peak` to the peak over the first `warmup_fraction` of the steps, then a linear or cosine decay
to `final_lr` at the last step. A resumed run (even mid-epoch) continues at the same step, with nothing to restore.
Pure Python, no torch: the state is a small dict that goes into every checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# (threshold on the 0-based epoch, multiplier of the initial LR), from the reference's lr_schedule():
# `if epoch > 180: lr *= 0.5e-3 elif epoch > 160: lr *= 1e-3 elif epoch > 120: lr *= 1e-2 elif epoch > 80: lr *= 1e-1`
STEPS = ((180, 0.5e-3), (160, 1e-3), (120, 1e-2), (80, 1e-1))
REFERENCE_EPOCHS = 200


def step_schedule(epoch: int, base_lr: float, schedule_epochs: int = REFERENCE_EPOCHS) -> float:
    """LR for 0-based `epoch` (Keras passes the 0-based index), thresholds scaled to `schedule_epochs`."""
    for threshold, factor in STEPS:
        if epoch * REFERENCE_EPOCHS > threshold * schedule_epochs:  # epoch > threshold * N / 200, in integers
            return base_lr * factor
    return base_lr


@dataclass
class PlateauState:
    best: float = math.inf
    wait: int = 0
    cooldown_counter: int = 0
    multiplier: float = 1.0  # only "compose" uses it
    cuts: list[int] = field(default_factory=list)  # 1-based epochs at whose end a cut was made


class LRPolicy:
    """The reference's policy, per epoch. `lr(epoch)` before each epoch, `end_epoch(epoch, val_loss)` after it; `state_dict` for checkpoints."""

    def __init__(self, base_lr: float, policy: str = "keras", factor: float = math.sqrt(0.1), patience: int = 5,
                 min_lr: float = 0.5e-6, cooldown: int = 0, min_delta: float = 1e-4,
                 schedule_epochs: int = REFERENCE_EPOCHS):
        if policy not in ("keras", "compose"):  # "onecycle" is OneCycle's
            raise ValueError(f"policy must be 'keras' or 'compose', got {policy!r}")
        self.base_lr, self.policy, self.schedule_epochs = base_lr, policy, schedule_epochs
        self.factor, self.patience, self.min_lr = factor, patience, min_lr
        self.cooldown, self.min_delta = cooldown, min_delta
        self.state = PlateauState()

    per_step = False

    @classmethod
    def from_config(cls, cfg) -> "LRPolicy":
        return cls(cfg.lr, cfg.lr_policy, cfg.plateau_factor, cfg.patience_epochs, cfg.plateau_min_lr,
                   cfg.cooldown_epochs, cfg.plateau_min_delta, cfg.schedule_epochs)

    def lr(self, epoch: int) -> float:
        scheduled = step_schedule(epoch, self.base_lr, self.schedule_epochs)
        if self.policy == "keras":
            return scheduled
        return max(scheduled * self.state.multiplier, self.min_lr)

    def end_epoch(self, epoch: int, monitored: float) -> bool:
        """Keras' ReduceLROnPlateau.on_epoch_end on the monitored loss; True when it cut the LR."""
        s = self.state
        if s.cooldown_counter > 0:
            s.cooldown_counter -= 1
            s.wait = 0
        if monitored < s.best - self.min_delta:
            s.best, s.wait = monitored, 0
            return False
        if s.cooldown_counter > 0:
            return False
        s.wait += 1
        if s.wait < self.patience:
            return False
        current = self.lr(epoch)
        if current <= self.min_lr:
            return False
        new = max(current * self.factor, self.min_lr)
        if self.policy == "compose":
            s.multiplier *= new / current
        s.cooldown_counter, s.wait = self.cooldown, 0
        s.cuts.append(epoch + 1)
        return True

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = PlateauState(**state)


@dataclass(frozen=True)
class OneCycle:
    """The one-cycle policy over `total_steps` steps: `lr_at(step)` with the 0-based step of the whole run."""

    peak: float
    total_steps: int
    warmup_fraction: float = 0.15
    start_factor: float = 0.1
    anneal: str = "linear"
    final_lr: float = 0.0
    steps_per_epoch: int = 1

    per_step = True

    @classmethod
    def from_config(cls, cfg, steps_per_epoch: int) -> "OneCycle":
        return cls(cfg.lr, cfg.schedule_epochs * steps_per_epoch, cfg.warmup_fraction, cfg.warmup_start_factor,
                   cfg.anneal, cfg.final_lr, steps_per_epoch)

    def lr_at(self, step: int) -> float:
        warmup = round(self.warmup_fraction * self.total_steps)
        if step < warmup:
            return self.peak * (self.start_factor + (1 - self.start_factor) * step / warmup)
        frac = min(1.0, (step - warmup) / max(1, self.total_steps - 1 - warmup))
        shape = 1 - frac if self.anneal == "linear" else 0.5 * (1 + math.cos(math.pi * frac))
        return self.final_lr + (self.peak - self.final_lr) * shape

    def lr(self, epoch: int, step: int = 0) -> float:
        """The LR at `step` of 0-based `epoch` (the epoch's first step by default)."""
        return self.lr_at(epoch * self.steps_per_epoch + step)

    def end_epoch(self, epoch: int, monitored: float) -> bool:
        return False  # no plateau monitor: the cycle is fixed in advance

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def lr_policy(cfg, steps_per_epoch: int):
    """The policy `cfg.lr_policy` names: OneCycle for "onecycle", else the reference's LRPolicy."""
    return OneCycle.from_config(cfg, steps_per_epoch) if cfg.lr_policy == "onecycle" else LRPolicy.from_config(cfg)
