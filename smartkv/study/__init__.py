"""The SmartKV study as a library: params, task grid, runs, evaluation, matching.

The DVC stages (`stages/`) are thin: they read `params.yaml` through this package, call it,
write its outputs and turn a bad value into exit status 2. Everything here is importable
and testable without DVC.

- `params`: loading `params.yaml`, key look-up, the study-level keys (seeds and their split,
  model, device); `ParamError` names the key.
- `grid`: the task grid (`tasks`, `longbench`).
- `runs`: `RunSpec`s for the baselines, SmartKV (headline, matched, Pareto sweep) and ablations.
- `driver`: evaluate runs on the prepared task sets; results and timings apart.
- `match`: each baseline's measured KV memory, the budgets of the matched SmartKV runs.
"""

from smartkv.study.params import ParamError, get, load_params, section

__all__ = ["ParamError", "get", "load_params", "section"]
