"""The confirmation stage: the search's `top_k` best configurations and the default recipe, each re-run with
`seeds` fresh seeds at `epochs` (default: the full length), as Tune trials of their own experiment
(`<sweep>/confirm`), so they use the cluster, the concurrency limit and `--resume` as the search does.

Why: a search ranks one run per configuration, on a val split whose standard error (about 0.4 points on 5,000
images) is as large as the differences it ranks, and often at a shorter length than the answer is for. The
winner is the best *median* val accuracy over the seeds; it is said to beat the default only when its median is
ahead by more than the seeds' spread (the larger max - min of the two). Each confirmed run's best checkpoint is
evaluated once on test, for the record: test never takes part in the choice.
"""

from __future__ import annotations

import json
import math
import statistics

from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator

from .progress import best_row, fmt_metric, trial_frame
from .spec import at_length, confirm_epochs, default_point, full_length, train_command, trial_config
from .trials import run_trial


def candidates(summary: dict, spec: dict) -> list[dict]:
    """The `confirm.top_k` best searched trials with a result (the default's trial left out), then the default."""
    k = spec["confirm"].get("top_k", 2)
    metric = summary["metric"]
    searched = [t for t in summary["trials"] if not t["default"] and t[metric] is not None]
    out = [{"name": f"search #{i + 1} ({t['trial_id']})", "search_trial": t["trial_id"], "default": False,
            "values": t["config"], f"search_{metric}": t[metric]} for i, t in enumerate(searched[:k])]
    default = next((t for t in summary["trials"] if t["default"]), None)
    out.append({"name": "default recipe", "search_trial": default and default["trial_id"], "default": True,
                "values": default_point(spec), f"search_{metric}": default and default[metric]})
    return out


CANDIDATES_FILE = "confirm_candidates.json"


def candidates_once(summary: dict, spec: dict, exp_path: str) -> list[dict]:
    """The candidates, picked once: a resumed sweep re-reads the ones its confirmation started with, since the
    search's summary (rebuilt from storage on resume) may order tied or re-reported trials differently."""
    from ..storage import read_file, write_file

    saved = read_file(exp_path, CANDIDATES_FILE)
    if saved is not None:
        return json.loads(saved)
    cands = candidates(summary, spec)
    write_file(exp_path, CANDIDATES_FILE, json.dumps(cands, indent=1).encode())
    return cands


def seeds(spec: dict) -> list[int]:
    """Fresh seeds: the `seeds` after the one the search trained with."""
    base = trial_config(spec, {}).get("seed", 0)
    return [base + 1 + i for i in range(spec["confirm"].get("seeds", 2))]


def run_confirmed(params: dict, candidates: list[dict], epochs: int, spec: dict, **common) -> None:
    """One confirmed run: candidate `params["candidate"]` at `epochs`, with seed `params["seed"]`."""
    c = candidates[params["candidate"]]
    values = {**at_length(spec, c["values"], epochs, default=c["default"]), "seed": params["seed"]}
    run_trial(values, spec, **common)


class ConfirmLines(tune.Callback):
    """One line per confirmed run that ends."""

    def __init__(self, candidates: list[dict], epochs: int, total: int, metric: str, mode: str):
        self.candidates, self.epochs, self.total, self.metric, self.mode = candidates, epochs, total, metric, mode

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trials, trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trials, trial, "error")

    def _line(self, trials, trial, how: str) -> None:
        ended = 1 + sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial)
        best = (trial.metric_analysis.get(self.metric) or {}).get(self.mode)
        name = self.candidates[trial.config["candidate"]]["name"]
        print(f"[confirm {ended}/{self.total}] {name}, seed {trial.config['seed']} {how}: best {self.metric} "
              f"{fmt_metric(self.metric, best)} in {self.epochs} epochs", flush=True)


def run_confirmation(spec: dict, cands: list[dict], exp_path: str, metric: str, mode: str, resume: bool,
                     resources: dict, verbose: bool, **common):
    """Tune's ResultGrid of the confirmed runs; `--resume` keeps the finished ones."""
    epochs = confirm_epochs(spec)
    trainable = tune.with_resources(
        tune.with_parameters(run_confirmed, candidates=cands, epochs=epochs, spec=spec, **common), resources)
    path = f"{exp_path}/confirm"
    if resume and tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=False).fit()
    limit = spec.get("max_concurrent_trials") or 0
    total = len(cands) * spec["confirm"].get("seeds", 2)
    tuner = tune.Tuner(
        trainable,
        param_space={"candidate": tune.grid_search(list(range(len(cands)))), "seed": tune.grid_search(seeds(spec))},
        tune_config=tune.TuneConfig(metric=metric, mode=mode, search_alg=BasicVariantGenerator(max_concurrent=limit)),
        run_config=tune.RunConfig(name="confirm", storage_path=exp_path, verbose=1 if verbose else 0,
                                  callbacks=[ConfirmLines(cands, epochs, total, metric, mode)],
                                  failure_config=tune.FailureConfig(max_failures=spec.get("max_failures", 0))),
    )
    return tuner.fit()


def summarize_confirmation(grid, cands: list[dict], spec: dict, metric: str, mode: str, data_dir: str,
                           exp_path: str, trials_root: str) -> dict:
    """Every confirmed run (best val, its epoch and checkpoint, that checkpoint's test accuracy), each candidate's
    median and spread, the winner by median and the verdict against the default."""
    from .. import checkpoint as ckpt
    from ..evaluate import test_accuracy_of
    from ..storage import as_uri

    sign = 1 if mode == "max" else -1
    runs = []
    for result in grid:
        c = cands[result.config["candidate"]]
        df = trial_frame(result)
        run = {"stage": "confirm", "candidate": c["name"], "default": c["default"], "seed": result.config["seed"],
               "trial_id": str(df["trial_id"].dropna().iloc[0]) if df is not None and "trial_id" in df else None,
               "epochs": 0, metric: None, "best_epoch": None, "test_accuracy": None, "checkpoint": None,
               "status": "error" if result.error else "done"}
        if df is not None and metric in df and df[metric].notna().any():
            best = best_row(df, metric, sign)
            path = best.get("checkpoint_path")
            if not (isinstance(path, str) and path) and run["trial_id"]:
                # A run Tune restarted after it had trained its last epoch restores that checkpoint and reports
                # the epoch again, without the path: the Ray Train run keeps it under the trial's name.
                path = f"{trials_root}/{run['trial_id']}/{ckpt.dir_name(int(best['epoch']))}"
            run.update({"epochs": int(df["epoch"].max()), metric: float(best[metric]),
                        "best_epoch": int(best["epoch"]), "checkpoint": as_uri(path, exp_path)})
            if run["checkpoint"]:
                run["test_accuracy"] = test_accuracy_of(run["checkpoint"], data_dir)
        runs.append(run)
    order = {c["name"]: i for i, c in enumerate(cands)}
    runs.sort(key=lambda r: (order[r["candidate"]], r["seed"]))
    table = []
    for c in cands:
        mine = [r for r in runs if r["candidate"] == c["name"]]
        row = {"candidate": c["name"], "default": c["default"], "search_trial": c["search_trial"],
               "config": c["values"], f"search_{metric}": c[f"search_{metric}"], "runs": len(mine)}
        for key in (metric, "test_accuracy"):
            values = [r[key] for r in mine if r[key] is not None]
            row[f"median_{key}"] = statistics.median(values) if values else None
            row[f"spread_{key}"] = max(values) - min(values) if values else None
            row[f"{key}s"] = values
        table.append(row)
    for r in runs:
        r.update({k: v for k, v in next(t for t in table if t["candidate"] == r["candidate"]).items()
                  if k.startswith(("median_", "spread_"))})
    scored = [t for t in table if t[f"median_{metric}"] is not None]
    winner = max(scored, key=lambda t: (sign * t[f"median_{metric}"], t["default"])) if scored else None
    default = table[-1]
    verdict, recommended, beats = verdict_of(winner, default, metric, sign)
    return {"epochs": confirm_epochs(spec), "seeds": seeds(spec), "metric": metric, "candidates": table,
            "runs": runs, "winner": winner and winner["candidate"], "verdict": verdict, "beats_default": beats,
            "recommended": recommended and {
                "candidate": recommended["candidate"], "config": recommended["config"],
                "train_command": train_command(spec, at_length(spec, recommended["config"], full_length(spec),
                                                               default=recommended["default"]))}}


def verdict_of(winner: dict | None, default: dict, metric: str, sign: int) -> tuple[str, dict | None, bool]:
    """(a sentence, the candidate to use, whether it beats the default): the winner only when it leads the default
    by more than the spread, which takes at least 2 runs of each to measure."""
    m, s = f"median_{metric}", f"spread_{metric}"
    if winner is None:
        return "no confirmed run reported a result", None, False
    if default[m] is None:
        return (f"the default recipe's confirmed runs reported no {metric}, so nothing was confirmed against it; "
                f"{winner['candidate']} leads the others"), winner, False
    if winner is default:
        return (f"the default recipe has the best median {metric} ({fmt_metric(metric, default[m])}): "
                f"use the default"), default, False
    gain = sign * (winner[m] - default[m])
    spread = max(winner[s] or 0.0, default[s] or 0.0)
    both = (f"median {fmt_metric(metric, winner[m])} vs {fmt_metric(metric, default[m])}, seed spread "
            f"{100 * spread:.2f} points" if "accuracy" in metric else f"{winner[m]:.4f} vs {default[m]:.4f}")
    runs = min(len(winner[f"{metric}s"]), len(default[f"{metric}s"]))
    if runs < 2:
        return (f"{winner['candidate']} leads the default recipe ({both}), but one run each cannot measure the "
                f"seeds' spread: confirm with seeds >= 2; use the default"), default, False
    if gain > spread and not math.isclose(gain, spread):
        return (f"{winner['candidate']} beats the default recipe by more than the seeds' spread ({both})",
                winner, True)
    return (f"{winner['candidate']} leads the default recipe by no more than the seeds' spread ({both}): "
            f"the lead is noise at this number of seeds; use the default"), default, False


def print_confirmation(confirmation: dict) -> None:
    metric = confirmation["metric"]
    print(f"confirmation: {len(confirmation['seeds'])} seeds x {confirmation['epochs']} epochs per candidate")
    print(f"  {'candidate':<28}{'search':>9}{'median val':>12}{'spread':>8}{'median test':>13}{'spread':>8}")
    for t in confirmation["candidates"]:
        spread = (lambda v: "-" if v is None else f"{100 * v:.2f}")
        print(f"{'*' if t['default'] else ' '} {t['candidate'][:27]:<28}{fmt_metric(metric, t[f'search_{metric}']):>9}"
              f"{fmt_metric(metric, t[f'median_{metric}']):>12}{spread(t[f'spread_{metric}']):>8}"
              f"{fmt_metric('test_accuracy', t['median_test_accuracy']):>13}{spread(t['spread_test_accuracy']):>8}")
    print(f"verdict: {confirmation['verdict']}")
    if confirmation["recommended"]:
        print(f"full length: {confirmation['recommended']['train_command']}", flush=True)
