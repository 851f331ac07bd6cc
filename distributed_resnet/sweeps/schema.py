"""The sweep file's schema: a pydantic model of the YAML (see tune_configs/), and its errors as one line.

Sections: `num_samples` (trials, the default-recipe trial included), `max_concurrent_trials`, `metric`/`mode`,
`max_failures` (Tune's retries of a failed trial); `resources` per trial; `search_alg` (random, or optuna's TPE);
`scheduler` (asha, pbt or none); `target_epochs` (the full length the winner is for) and `confirm` (the
re-run of the best configurations with fresh seeds); `fixed` (training settings) and `search` (training settings as
`{loguniform|uniform|randint: [lo, hi]}` (randint inclusive), `{choice: [...]}` or `{grid: [...]}`).
`search_alg_spec`/`scheduler_spec` give a section with the schema's defaults filled in. No Ray import here.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, PlainValidator, Tag, ValidationError


DISTRIBUTIONS = ("choice", "grid", "loguniform", "randint", "uniform")


def _integer(low: int):
    def check(value):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
            raise ValueError(f"must be an integer >= {low}, got {value!r}")
        return value
    return PlainValidator(check)


def _number(test, words: str):
    def check(value):
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and test(value)):
            raise ValueError(f"must be {words}, got {value!r}")
        return value
    return PlainValidator(check)


def _seed(value):
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool)):
        raise ValueError(f"must be an integer, got {value!r}")
    return value


def _flag(value):
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _names(value):
    if not (isinstance(value, list) and value and all(isinstance(k, str) for k in value)):
        raise ValueError(f"must be a non-empty list of searched keys, got {value!r}")
    return value


def _distribution(dist):
    """`{kind: args}`: a range [low, high] or a non-empty list."""
    if not (isinstance(dist, dict) and len(dist) == 1 and next(iter(dist)) in DISTRIBUTIONS):
        raise ValueError(f"must be one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {dist!r}")
    kind, args = next(iter(dist.items()))
    if kind in ("loguniform", "uniform", "randint") and not (isinstance(args, list) and len(args) == 2
                                                              and args[0] < args[1]):
        raise ValueError(f"{kind} needs [low, high] with low < high, got {args!r}")
    if kind in ("choice", "grid") and not (isinstance(args, list) and args):
        raise ValueError(f"{kind} needs a non-empty list, got {args!r}")
    return dist


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Resources(_Section):
    """Per trial."""
    num_workers: Annotated[int, _integer(0)] = 1
    cpus_per_worker: Annotated[int, _integer(1)] = 1
    gpus_per_worker: Annotated[float, _number(lambda v: v >= 0, "a number >= 0")] = 0


class RandomSearch(_Section):
    """Tune's BasicVariantGenerator."""
    type: Literal["random"] = "random"
    seed: Annotated[int | None, PlainValidator(_seed)] = 0


class OptunaSearch(_Section):
    """Optuna's TPE through Tune's OptunaSearch; `n_startup_trials` random suggestions first (Optuna's default 10)."""
    type: Literal["optuna"]
    seed: Annotated[int | None, PlainValidator(_seed)] = 0
    n_startup_trials: Annotated[int, _integer(1)] | None = None


class ASHA(_Section):
    """`grace_period` in epochs, or `grace_fraction` of the trials' schedule_epochs (the same at any length)."""
    type: Literal["asha"] = "asha"
    grace_period: Annotated[int, _integer(1)] | None = None  # default 1 epoch
    grace_fraction: Annotated[float, _number(lambda v: 0 < v <= 1, "in (0, 1]")] | None = None
    reduction_factor: Annotated[float, _number(lambda v: v > 1, "a number above 1")] = 2


class PBT(_Section):
    type: Literal["pbt"]
    perturbation_interval: Annotated[int, _integer(1)]
    mutate: Annotated[list, PlainValidator(_names)] = ["lr"]
    quantile_fraction: Annotated[float, _number(lambda v: 0 < v <= 0.5, "in (0, 0.5]")] = 0.25
    resample_probability: Annotated[float, _number(lambda v: 0 <= v <= 1, "in [0, 1]")] = 0.25
    synch: Annotated[bool, PlainValidator(_flag)] = False


class NoScheduler(_Section):
    type: Literal["none"]


SEARCH_ALGS = {"random": RandomSearch, "optuna": OptunaSearch}
SCHEDULERS = {"asha": ASHA, "pbt": PBT, "none": NoScheduler}


def _tag(default: str):
    return lambda v: (v.get("type", default) if isinstance(v, dict) else getattr(v, "type", default))


SearchAlg = Annotated[Union[Annotated[RandomSearch, Tag("random")], Annotated[OptunaSearch, Tag("optuna")]],
                      Discriminator(_tag("random"), custom_error_type="tag", custom_error_message="'random' or 'optuna'")]
Scheduler = Annotated[Union[Annotated[ASHA, Tag("asha")], Annotated[PBT, Tag("pbt")],
                            Annotated[NoScheduler, Tag("none")]],
                      Discriminator(_tag("asha"), custom_error_type="tag",
                                    custom_error_message="'asha', 'pbt' or 'none'")]


class Confirm(_Section):
    """After the search, the `top_k` best configurations and the default recipe, each with `seeds` fresh seeds
    at `epochs` (default: the full length), as Tune trials; the winner is the best median."""
    top_k: Annotated[int, _integer(1)] = 2
    seeds: Annotated[int, _integer(1)] = 2
    epochs: Annotated[int, _integer(1)] | None = None


class SweepFile(_Section):
    """The YAML (see tune_configs/): what to search, how, and on what."""
    name: str | None = None
    num_samples: Annotated[int, _integer(1)] = 1  # trials, the default-recipe trial included
    max_concurrent_trials: Annotated[int, _integer(1)] | None = None
    metric: str = "val_accuracy"
    mode: Literal["max", "min"] = "max"
    max_failures: Annotated[int, _integer(0)] = 0  # Tune's retries of a failed trial
    resources: Resources = Resources()
    search_alg: SearchAlg = RandomSearch()
    scheduler: Scheduler = ASHA()
    target_epochs: Annotated[int, _integer(1)] | None = None  # the full length (default: the recipe's epochs)
    confirm: Confirm | None = None
    fixed: dict[str, Any] = {}
    search: dict[str, Annotated[dict, PlainValidator(_distribution)]] = {}


def one_line(error: ValidationError, spec) -> str:
    """The first error as a sentence naming its key (pydantic's loc, without the union tags)."""
    first = error.errors()[0]
    loc, kind = first["loc"], first["type"]
    tagged = len(loc) > 1 and loc[0] in ("scheduler", "search_alg")
    key = ".".join(str(p) for p in (loc[:1] + loc[2:] if tagged else loc))
    if kind == "extra_forbidden":  # every unknown key of the same section, at once
        cut = len(loc) - 1
        extras = [e["loc"] for e in error.errors()
                  if e["type"] == "extra_forbidden" and len(e["loc"]) == len(loc) and e["loc"][:cut] == loc[:cut]]
        section = _section_at(loc[:cut])
        prefix = f"{loc[0]}." if cut else ""
        where = f" with {loc[0]}.type {loc[1]}" if tagged and cut == 2 else ""
        names = ", ".join(prefix + str(e[-1]) for e in extras)
        return f"unknown key(s) {names}{where}; allowed: {', '.join(sorted(section.model_fields))}"
    if kind == "tag":
        return f"{key}.type must be {first['msg']}, got {first['input'].get('type')!r}"
    if kind == "missing":
        return f"{loc[0]} {loc[1]} needs {loc[-1]}" if tagged else f"{key} is required"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{key or 'the file'} must be a mapping"
    if kind == "literal_error":
        return f"{key} must be {first['ctx']['expected']}, got {first['input']!r}"
    message = first["msg"].removeprefix("Value error, ")
    return f"{key} {message}" if key else message


def _section_at(loc: tuple):
    if not loc:
        return SweepFile
    if loc[0] == "resources":
        return Resources
    if loc[0] == "confirm":
        return Confirm
    return (SCHEDULERS if loc[0] == "scheduler" else SEARCH_ALGS)[loc[1]]


def search_alg_spec(spec: dict) -> dict:
    """The search_alg section with its defaults (type random, seed 0); n_startup_trials only where given."""
    alg = SweepFile.model_validate({"search_alg": spec.get("search_alg") or {}}).search_alg
    return alg.model_dump(exclude_none=True) | ({"seed": None} if alg.seed is None else {})


def scheduler_spec(spec: dict) -> dict:
    """The scheduler section with its defaults (type asha; PBT's mutate, quantile_fraction, ...)."""
    return SweepFile.model_validate({"scheduler": spec.get("scheduler") or {}}).scheduler.model_dump()
