"""What a sweep prints while it runs: one line per trial that ends, and how trials and metrics read."""

from __future__ import annotations

import math
from pathlib import Path

from ray.tune import Callback


def creation_index(tag: str) -> int:
    """Where a trial came in the sweep, from its experiment tag (`3_lr=...`, PBT's `3_lr=...@perturbed[...]`):
    Tune numbers the trials it creates. The default point is always the first one a searcher creates."""
    head = str(tag).split("_", 1)[0].split("@", 1)[0]
    return int(head) if head.isdigit() else 1 << 30


def default_trial_id(trials: list[tuple[str, int, dict]], point: dict, pbt: bool) -> str | None:
    """The default recipe's trial among (trial_id, creation index, config): the first created whose searched
    values are the defaults. Under PBT, simply the first created: it started there, and exploits and mutations
    change its config as it trains."""
    found = [(index, trial_id) for trial_id, index, config in trials
             if pbt or all(config.get(k) == v for k, v in point.items())]
    return min(found)[1] if found else None


def fmt_value(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def fmt_metric(metric: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}%" if "accuracy" in metric else f"{value:.4f}"


def best_row(df, metric: str, sign: int):
    """The row with the best `metric`, the latest epoch on ties: the checkpoint Ray keeps of tied ones."""
    scored = df[df[metric].notna()]
    return scored.assign(_score=sign * scored[metric]).sort_values(["_score", "epoch"], kind="stable").iloc[-1]


def trial_frame(result):
    """A trial's reported rows. Tune prefers result.json, but when a trial restarts (PBT's pauses and exploits) it
    restores that file from storage, which can lag behind and lose rows; progress.csv gets the same rows, so on
    local storage the longer of the two wins."""
    import pandas as pd

    df = result.metrics_dataframe
    csv = Path(result.path, "progress.csv") if "://" not in str(result.path) else None
    if csv is not None and csv.is_file():
        try:
            other = pd.read_csv(csv, dtype={"trial_id": str}, float_precision="round_trip")
        except (ValueError, pd.errors.EmptyDataError):
            other = None
        if other is not None and (df is None or len(other) > len(df)):
            return other
    return df


class ProgressLines(Callback):
    """One line per trial that ends: finished, stopped by the scheduler (ASHA), or failed; Tune's own tables stay
    off. A trial the scheduler stops gets `done=True` on the very result that stopped it, before callbacks see it;
    a trial that runs all its epochs never reports `done` itself (Tune adds it after the function returns)."""

    def __init__(self, metric: str, mode: str, max_epochs: int, point: dict, total: int, scheduler: str,
                 stream=None):
        self.metric, self.mode, self.max_epochs = metric, mode, max_epochs
        self.point, self.total, self.scheduler = point, total, scheduler
        self.stopped: set[str] = set()
        self.stream = stream

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("done"):
            self.stopped.add(trial.trial_id)

    def on_trial_complete(self, iteration, trials, trial, **info):
        epochs = self._epochs(trial)
        if trial.trial_id in self.stopped and epochs < self.max_epochs:
            how = f"stopped by {'ASHA' if self.scheduler == 'asha' else 'the scheduler'}"
        else:
            how = "finished"
        self._line(trials, trial, how)

    def on_trial_error(self, iteration, trials, trial, **info):
        error = None
        try:
            err = trial.get_pickled_error() or trial.get_error()
            error = str(err).strip().splitlines()[-1][:200] if err else None
        except Exception:
            pass
        self._line(trials, trial, "error", error)

    def _epochs(self, trial) -> int:
        value = (trial.metric_analysis.get("epoch") or {}).get("max")
        return int(value) if value is not None and not math.isnan(value) else 0

    def _line(self, trials, trial, how: str, error: str | None = None) -> None:
        ended = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        best = (trial.metric_analysis.get(self.metric) or {}).get(self.mode)
        config = trial.config or {}
        default = default_trial_id([(t.trial_id, creation_index(t.experiment_tag), t.config or {}) for t in trials],
                                   self.point, self.scheduler == "pbt")
        mark = " (default)" if trial.trial_id == default else ""
        settings = " ".join(f"{k}={fmt_value(config.get(k))}" for k in self.point)
        line = (f"[{ended}/{self.total}] trial {trial.trial_id}{mark} {how}: {self._epochs(trial)}/{self.max_epochs} "
                f"epochs, best {self.metric} {fmt_metric(self.metric, best)} | {settings}")
        print(line + (f" | {error}" if error else ""), file=self.stream, flush=True)
