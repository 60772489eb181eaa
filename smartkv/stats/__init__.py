"""Statistics over per-sample results: summaries, paired tests, matching, power, tables.

- `summary`: per-task and per-run summaries, and the one rule for weighting and memory;
- `paired`: exact McNemar for 0/1 outcomes, paired t / Wilcoxon for continuous measures;
- `bootstrap`: percentile CIs that resample whole clusters;
- `multiplicity`: Holm within a family, and the verdict wording ("inconclusive");
- `equivalence`: non-inferiority / equivalence from the CI and a margin;
- `matching`: which SmartKV run each baseline is compared with, and why;
- `power`: exact power of McNemar's test and the n it needs;
- `tables`: markdown tables and metrics dicts.
"""

from smartkv.stats.bootstrap import bootstrap_ci, cluster_bootstrap_ci
from smartkv.stats.equivalence import noninferiority
from smartkv.stats.matching import EXACT_PREFIX, match_baselines
from smartkv.stats.multiplicity import INCONCLUSIVE, apply_holm, holm, verdict
from smartkv.stats.paired import MEASURES, compare, mcnemar_exact, measures_in, paired_continuous, paired_tests
from smartkv.stats.power import critical_counts, mcnemar_power, n_for_power, normal_n, power_report
from smartkv.stats.summary import PERPLEXITY_TASK, RUN_META, length_strata, overall, run_memory, summarize
from smartkv.stats.tables import _leaves, _num, comparison_key, comparison_table, main_table, markdown_table, metrics_json

__all__ = [
    "EXACT_PREFIX", "INCONCLUSIVE", "MEASURES", "PERPLEXITY_TASK", "RUN_META", "_leaves", "_num",
    "apply_holm", "bootstrap_ci", "cluster_bootstrap_ci", "compare", "comparison_table", "critical_counts",
    "holm", "length_strata", "main_table", "markdown_table", "match_baselines", "mcnemar_exact", "mcnemar_power",
    "measures_in", "metrics_json", "n_for_power", "noninferiority", "normal_n", "overall",
    "paired_continuous", "paired_tests", "power_report", "run_memory", "summarize", "comparison_key", "verdict",
]
