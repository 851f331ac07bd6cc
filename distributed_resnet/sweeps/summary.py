"""What a sweep leaves: its trials sorted by their best metric, the default trial marked, the winner's best
checkpoint evaluated once on test (test never takes part in the selection), the winner carried to the full length
as a `train` command, best.json, trials.json (with the confirmed runs, when there are), the table and the
default-vs-winner sentence."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..config import TrainConfig
from .progress import best_row, creation_index, default_trial_id, fmt_metric, trial_frame
from .spec import at_length, default_notes, default_point, full_length, scheduler_spec, train_command, trial_config


def summarize_sweep(grid, spec, metric, mode, base: TrainConfig, exp_path: str, seconds: float) -> dict:
    """Trials sorted by their best `metric`; the default trial marked; the best trial's best checkpoint, evaluated
    once on test."""
    from ..evaluate import test_accuracy_of
    from ..storage import as_uri

    searched = list((spec.get("search") or {}).keys())
    sign = 1 if mode == "max" else -1
    pbt = scheduler_spec(spec)["type"] == "pbt"
    point = default_point(spec)
    trials = []
    for result in grid:
        df = trial_frame(result)
        ids = df["trial_id"].dropna() if df is not None and "trial_id" in df else []
        # Under PBT, result.metrics can be the donor's (an exploit hands over its last result): the rows are not.
        trial_id = str(ids.iloc[0]) if len(ids) else (result.metrics or {}).get("trial_id") or Path(result.path).name
        row = {"trial_id": trial_id,
               "config": {k: result.config.get(k) for k in searched}, "epochs": 0, metric: None,
               "best_epoch": None, "checkpoint": None, "status": "error" if result.error else "done"}
        if df is not None and len(df) and all(f"config/{k}" in df for k in searched):
            # The config the trial last trained with (under PBT, result.config can be the donor's).
            row["config"] = {k: _plain(df[f"config/{k}"].iloc[-1]) for k in searched}
        if result.error:
            row["error"] = str(result.error).strip().splitlines()[-1][:200]
        if df is not None and metric in df and df[metric].notna().any():
            best = best_row(df, metric, sign)
            row.update({"epochs": int(df["epoch"].max()), metric: float(best[metric]), "best_epoch": int(best["epoch"]),
                        "checkpoint": as_uri(_checkpoint_of(df, best, metric, sign), exp_path)})
        if not result.error and row["epochs"] < base.epochs:
            # Stopped by ASHA (a diverged trial raises, so it is an error); otherwise the sweep was interrupted.
            row["status"] = "stopped" if scheduler_spec(spec)["type"] == "asha" else "unfinished"
        row["created"] = creation_index(Path(result.path).name.split(f"{row['trial_id']}_", 1)[-1])
        trials.append(row)
    default_id = default_trial_id([(t["trial_id"], t["created"], t["config"]) for t in trials], point, pbt)
    for t in trials:
        del t["created"]
        t["default"] = t["trial_id"] == default_id
    trials.sort(key=lambda r: -math.inf if r[metric] is None else sign * r[metric], reverse=True)
    best = next((t for t in trials if t["checkpoint"]), None)
    default = next((t for t in trials if t["default"]), None)
    for t in trials:
        t["vs_default"] = (t[metric] - default[metric] if default and default[metric] is not None
                           and t[metric] is not None else None)
    out = {"experiment_path": exp_path, "wall_seconds": seconds, "metric": metric, "trials": trials,
           "default": {"trial_id": default and default["trial_id"], "config": point,
                       metric: default and default[metric],
                       "notes": default_notes(spec)},
           "vs_default": vs_default_text(best, default, metric, sign, pbt)}
    exploits = Path(exp_path, "pbt_global.txt")
    if pbt and exploits.is_file():
        out["pbt_exploits"] = len(exploits.read_text().splitlines())
    if best is not None:
        test_accuracy = test_accuracy_of(best["checkpoint"], base.data_dir)
        out["best"] = {"trial_id": best["trial_id"], "config": {**trial_config(spec, {}), **best["config"]},
                       "val_accuracy": best[metric] if metric == "val_accuracy" else None, metric: best[metric],
                       "best_epoch": best["best_epoch"], "checkpoint": best["checkpoint"],
                       "test_accuracy": test_accuracy, "is_default": best["default"],
                       "default_trial_id": default and default["trial_id"],
                       f"default_{metric}": default and default[metric],
                       "beats_default_by": (sign * (best[metric] - default[metric]) if default
                                            and default[metric] is not None else None),
                       "vs_default": out["vs_default"]}
        full = full_length(spec)
        command = train_command(spec, at_length(spec, best["config"], full))
        out["best"]["full_length"] = {"epochs": full, "train_command": command}
        out["best"]["recommended"] = {"candidate": f"search winner ({best['trial_id']}), unconfirmed",
                                      "config": best["config"], "train_command": command}
    return out


def _plain(value):
    """numpy scalars from a data frame as plain Python values (for JSON and for comparing with the default)."""
    return value.item() if hasattr(value, "item") else value


def _checkpoint_of(df, best, metric: str, sign: int) -> str | None:
    """The best epoch's checkpoint. Every epoch of a whole-run trial has one; a PBT trial reports the paths of the
    checkpoints its segments kept (each segment's best and last), so a missing one falls back to the best kept."""
    path = best.get("checkpoint_path")
    if isinstance(path, str) and path:
        return path
    if "checkpoint_path" not in df:
        return None
    saved = df[df["checkpoint_path"].apply(lambda p: isinstance(p, str) and bool(p))]
    return best_row(saved, metric, sign)["checkpoint_path"] if len(saved) else None


def vs_default_text(best: dict | None, default: dict | None, metric: str, sign: int, pbt: bool) -> str:
    """One sentence: by how much the winner beats the default recipe on `metric`, or that it does not."""
    if default is None:
        return "no trial of this sweep ran the default recipe"
    if default[metric] is None:
        return f"the default recipe's trial {default['trial_id']} reported no {metric} ({default['status']})"
    caveat = " (under PBT the default trial only started from the default recipe)" if pbt else ""
    if best is None:
        return f"no trial left a checkpoint; the default recipe reached {fmt_metric(metric, default[metric])}"
    if best is default:
        return f"the default recipe is the best trial ({fmt_metric(metric, default[metric])}){caveat}"
    gain = sign * (best[metric] - default[metric])
    amount = f"{100 * gain:+.2f} points of {metric}" if "accuracy" in metric else f"{gain:+.4f} {metric}"
    both = f"({fmt_metric(metric, best[metric])} vs {fmt_metric(metric, default[metric])})"
    if gain > 0:
        return f"the best trial beats the default recipe by {amount} {both}{caveat}"
    return f"the best trial does not beat the default recipe {both}{caveat}"


def print_table(summary: dict) -> None:
    metric, trials = summary["metric"], summary["trials"]
    keys = sorted({k for t in trials for k in t["config"]})
    head = f"  {'trial':<14}" + "".join(f"{k[:16]:>17}" for k in keys) + f"{'epochs':>7}{metric:>14}  status"
    print(head)
    for t in trials:
        cells = "".join(f"{_fmt(t['config'].get(k)):>17}" for k in keys)
        status = "stopped (ASHA)" if t["status"] == "stopped" else t["status"]
        print(f"{'*' if t.get('default') else ' '} {t['trial_id'][:13]:<14}{cells}{t['epochs']:>7}"
              f"{fmt_metric(metric, t[metric]):>14}  {status}" + (f" ({t['error']})" if t.get("error") else ""))
    print("* the default recipe (TrainConfig defaults + the YAML's fixed)")


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_summary(summary: dict) -> None:
    """best.json and trials.json in the experiment folder (local or a URI)."""
    from ..storage import write_file

    write_file(summary["experiment_path"], "best.json", json.dumps(summary["best"], indent=1).encode())
    rows = [{"stage": "search", **t} for t in summary["trials"]]
    rows += (summary.get("confirmation") or {}).get("runs", [])
    write_file(summary["experiment_path"], "trials.json", json.dumps(rows, indent=1).encode())


def print_outcome(summary: dict) -> None:
    """The table, then the winner (val, and test evaluated once after selection) against the default."""
    print_table(summary)
    best = summary["best"]
    test = ("not evaluated (checkpoint gone)" if best["test_accuracy"] is None
            else f"{100 * best['test_accuracy']:.2f}% (evaluated once, after selection)")
    print(f"best trial {best['trial_id']}: val accuracy {100 * best[summary['metric']]:.2f}% at epoch "
          f"{best['best_epoch']}, test accuracy {test}")
    print(f"vs default: {summary['vs_default']}")
    if summary.get("confirmation"):
        from .confirm import print_confirmation

        print_confirmation(summary["confirmation"])
    else:
        print(f"full length (unconfirmed): {best['full_length']['train_command']}")
    if "pbt_exploits" in summary:
        print(f"PBT: {summary['pbt_exploits']} exploit(s), logged in {summary['experiment_path']}/pbt_global.txt")
    print(f"best config and checkpoint: {summary['experiment_path']}/best.json  ({summary['wall_seconds']:.0f}s)",
          flush=True)
