"""REPORT.md and the talk, generated from the pipeline's outputs (never edited by hand).

- `findings`: what the results say, as numbers and verdicts (shared by report and slides);
- `background`: related work and the method's pseudocode (fixed prose);
- `sections`: the result-dependent sections, each tolerant of a missing metrics file;
- `sweeps_section`: the dev-seed sweeps, each value against the current one;
- `limitations`: significant losses apart from inconclusive comparisons, and the caveats;
- `render`: REPORT.md; `slides`: the 12-slide PDF.
"""

from smartkv.report.limitations import SMALL_N, limitations, significance_table, significant_losses
from smartkv.report.render import render_report

__all__ = ["SMALL_N", "limitations", "render_report", "significance_table", "significant_losses"]
