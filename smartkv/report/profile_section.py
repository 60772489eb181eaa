"""REPORT.md's "Where time and memory go": the `profile` stage's metrics/profile.json in words and tables.

Every sentence is chosen by the numbers it states (slower or faster than FP16, a peak above
or below FP16's), like the rest of the report.
"""

from __future__ import annotations

from smartkv.report import findings as f

MIB = 2 ** 20
SHOWN_OPS = 5  # of the ten in the metrics file: the report stays short


def _phase_name(key: str) -> str:
    return key.replace("_", " ")


def _timing_table(prof: dict, columns: str, cells) -> list[str]:
    """One row per run, two columns per context: `columns` names them, `cells(latency_row)` fills them
    (None: the run or the measure is missing there)."""
    blocks = prof["contexts"]
    lines = ["| run | " + " | ".join(f"{b['context']} tok: {columns}" for b in blocks) + " |",
             "|---|" + "---|---|" * len(blocks)]
    for run in [r["run"] for r in blocks[0]["latency"]]:
        row = []
        for b in blocks:
            r = next((x for x in b["latency"] if x["run"] == run), None)
            row += (cells(r) if r is not None else None) or ["–", "–"]
        lines.append(f"| `{run}` | " + " | ".join(row) + " |")
    return lines


def _speed_table(prof: dict) -> list[str]:
    def cells(r: dict) -> list[str]:
        s = r["ms_per_token"]
        return [f"{s['median']:.1f} [{s['min']:.1f}–{s['max']:.1f}]", f"{r['ratio_vs_fp16']:.2f}"]

    return _timing_table(prof, "ms/token [min–max] | × FP16 tok/s", cells)


def _first_step_table(prof: dict) -> list[str]:
    def cells(r: dict) -> list[str] | None:
        if "first_step_ms" not in r:
            return None
        s = r["first_step_ms"]
        return [f"{s['median']:.0f} [{s['min']:.0f}–{s['max']:.0f}]", f"{r['ratio_vs_fp16_with_first']:.2f}"]

    return _timing_table(prof, "first step ms [min–max] | × FP16 tok/s, first step included", cells)


def _memory_table(prof: dict) -> list[str]:
    blocks = prof["contexts"]
    lines = ["| run | " + " | ".join(f"{b['context']} tok: peak / cache MiB" for b in blocks) + " |",
             "|---|" + "---|" * len(blocks)]
    for run in blocks[0]["memory"]:
        cells = [f"{b['memory'][run]['peak_allocated_bytes'] / MIB:.1f} / {b['memory'][run]['cache_bytes'] / MIB:.1f}"
                 if run in b["memory"] else "–" for b in blocks]
        lines.append(f"| `{run}` | " + " | ".join(cells) + " |")
    lines.append("| prefill (shared, FP16) | " + " | ".join(
        f"{b['prefill_peak_allocated_bytes'] / MIB:.1f} / –" for b in blocks) + " |")
    return lines


def _phase_lines(prof: dict, run: str) -> list[str]:
    rows = [(b["context"], b["phases"][run]) for b in prof["contexts"] if run in b.get("phases", {})]
    if not rows:
        return []
    names = [k[:-len("_share")] for k in rows[0][1] if k.endswith("_share")]
    lines = [f"Share of a steady `{run}` decode step spent in each cache phase (one extra timed decode per context; "
             "the first step's phases apart, in ms):", "",
             "| context | " + " | ".join(_phase_name(n) for n in names) + " | all phases | first step: ms (of which phases) |",
             "|---|" + "---|" * (len(names) + 2)]
    for ctx, p in rows:
        shares = [p[f"{n}_share"] for n in names]
        first = (f"{1000 * p['first_step_s']:.0f} ({1000 * sum(p.get(f'first_{n}_s', 0.0) for n in names):.0f})"
                 if "first_step_s" in p else "–")
        lines.append(f"| {ctx} | " + " | ".join(f"{100 * s:.1f}%" for s in shares) + f" | {100 * sum(shares):.1f}% | {first} |")
    return lines + [""]


def _ops_lines(prof: dict) -> list[str]:
    out = []
    for b in prof["contexts"]:
        for run, t in b.get("top_ops", {}).items():
            out += [f"Top operators by self CPU time, one `{run}` decode of {t['new_tokens']} tokens at {b['context']} "
                    f"tokens ({t['wall_ms_per_token']:.1f} ms/token under the profiler; "
                    f"{t['unattributed_ms_per_token']:.1f} ms/token outside any operator: Python and pybind):", "",
                    "| op | calls | self ms/token | share of the decode |", "|---|---|---|---|"]
            out += [f"| `{o['op']}` | {o['calls']} | {o['self_cpu_ms_per_token']:.2f} | {100 * o['share_of_wall']:.1f}% |"
                    for o in t["ops"][:SHOWN_OPS]]
            out.append("")
    return out


def _verdicts(prof: dict) -> list[str]:
    head, fp16 = prof.get("headline", "smartkv"), prof.get("fp16", "fp16")
    last = prof["contexts"][-1]
    lat = {r["run"]: r for r in last["latency"]}
    mem = last["memory"]
    out = []
    if head in lat:
        r = lat[head]["ratio_vs_fp16"]
        out.append(f"At {last['context']} tokens `{head}` decodes at {r:.2f} × FP16's tokens/s after the first step"
                   + (" (slower than FP16)." if r < 1 else " (at least as fast as FP16)."))
        if "first_step_ms" in lat[head] and fp16 in lat:
            w = lat[head]["ratio_vs_fp16_with_first"]
            out.append(f"Its first step, which compresses the prompt once, takes {lat[head]['first_step_ms']['median']:.0f} ms "
                       f"against FP16's {lat[fp16]['first_step_ms']['median']:.0f} ms; over all {prof['new_tokens']} new "
                       f"tokens, the first step included, it runs at {w:.2f} × FP16"
                       + (" (slower than FP16)." if w < 1 else " (at least as fast as FP16)."))
    if head in mem and fp16 in mem:
        h, b = mem[head], mem[fp16]
        word = "more than" if h["peak_allocated_bytes"] > b["peak_allocated_bytes"] else "less than"
        out.append(f"Its peak allocation over the decode is {h['peak_allocated_bytes'] / MIB:.1f} MiB, {word} "
                   f"FP16's {b['peak_allocated_bytes'] / MIB:.1f} MiB, for a cache of {h['cache_bytes'] / MIB:.1f} MiB "
                   f"against {b['cache_bytes'] / MIB:.1f}: {h['peak_over_cache']:.1f} × its own bytes"
                   + (" (decode temporaries, e.g. the de-quantized history, dominate)."
                      if h["peak_over_cache"] > 2 else "."))
    return out


def profile_section(prof: dict | None) -> list[str]:
    if not prof or not prof.get("contexts"):
        return [f.missing("profile", "profile"), ""]
    m, prov = prof.get("machine", {}), prof.get("provenance", {})
    lines = [f"Measured by the `profile` stage in one process: every method forks one full-precision prefill of "
             f"the same prompt and decodes {prof['new_tokens']} tokens, timed round-robin over {prof['repeats']} "
             f"repeats after a warm-up (median and min–max; × FP16 is tokens/s over FP16's median from the same "
             f"run). A decode is timed in two parts: its first step feeds the prompt's last token through the cache, "
             f"which is where a compressing cache quantizes the whole prompt, once per request; the steps after it "
             f"are the steady decode, what every further token costs. Run with {m.get('torch_threads', '?')} torch "
             f"threads on {m.get('cpus', '?')} CPUs "
             f"(load average {', '.join(f'{x:.1f}' for x in m.get('loadavg_at_end', []))} at the end: a shared "
             f"machine slows every run alike), git `{prov.get('git_revision', 'unknown')}`.", "",
             *[f"- {x}" for x in _verdicts(prof)], "", "Steady decode, every step after the first:", "",
             *_speed_table(prof), "", "The first step, and the rate over all new tokens with it:", "",
             *_first_step_table(prof), "",
             "Peak memory is what torch allocated over the cache's fork and the decode (CPU: the allocator's "
             "events from `torch.profiler`; CUDA: `max_memory_allocated`), above the weights and the shared "
             "prefill; the cache's own bytes are what it reports holding at the end.", "", *_memory_table(prof), ""]
    lines += _phase_lines(prof, prof.get("headline", "smartkv"))
    return lines + _ops_lines(prof)
