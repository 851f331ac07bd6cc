"""The Ray Tune sweep of a recipe, layered: `schema` (the YAML's pydantic model) < `spec` (reading and checking a
sweep file) < `space` (search space, searchers, schedulers) < `trials` (what each trial runs) < `progress` <
`summary` (the table, best.json, trials.json) < `tuner` (the Tuner, returning Ray's ResultGrid) < `cli`."""
