"""The DVC pipeline end to end on the tiny profile, in a temporary git repository (slow).

`origin` (tests/pipeline_support.py) is a copy of this repository's code with
tests/fixtures/params_tiny.yaml as its params, after `dvc repro` and a commit of every output.
Checked here: every metrics, plots and results file appears with sane values; a second `dvc repro`
does nothing; re-running a model stage reproduces its results byte for byte (content-only hashes),
so only the timings' reader (and the report) re-run. Clones of it: tests/test_pipeline_clone.py and
tests/test_pipeline_sweeps.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pipeline_support import DVC, git, ran_stages, run


def pd_read(path):
    import pandas as pd

    return pd.read_parquet(path)

METRICS = ["main.json", "tasks.json", "significance.json", "ablations.json", "power.json", "latency.json", "smartkv.json",
           "matched_budgets.json", "errors.json", "profile.json", "second_model.json",
           "extra_cells.json", "passages.json", "passages_calibration.json", "cells.json"]
DETERMINISTIC = [m for m in METRICS if m not in ("latency.json", "profile.json")]  # wall clock
FIGURES = ["pareto", "needle_heatmaps", "allocation_map", "ablations", "regret", "niah_pareto", "memory_breakdown",
           "perplexity_memory", "latency", "sweeps", "errors", "profile_latency", "profile_memory"]
CSVS = ["pareto.csv", "latency.csv", "ablations.csv", "niah_pareto.csv", "memory_breakdown.csv", "perplexity_memory.csv",
        "profile.csv"]
RESULTS = ["tasks", "peers", "summary", "tests", "ablation_summary", "ablation_tests", "second_model_tasks",
           "extra_cells_tasks", "passages_tasks", "passages_dev_tasks", "passages_calibration", "peers_tuning"]
# The model stages' cells (params_tiny.yaml `cells`): part -> its cell files' names
CELLS = {"baselines": ["niah-160-1of2", "niah-160-2of2", "perplexity-160"],
         "smartkv": ["niah-160-1of2", "niah-160-2of2", "perplexity-160"],
         "ablations": ["niah-160-1of2", "niah-160-2of2", "perplexity-160"],
         "extra_cells/baselines": ["niah-192", "passkey-128"], "extra_cells/smartkv": ["niah-192", "passkey-128"],
         "second_model/baselines": ["niah-160"], "second_model/smartkv": ["niah-160"],
         "passages/baselines": ["niah_passage-160"], "passages/smartkv": ["niah_passage-160"],
         "passages/peers": ["niah_passage-160"]}


def cells_of(repo: Path, part: str):
    import pandas as pd

    return pd.concat([pd.read_parquet(repo / "data" / part / f"{c}.parquet") for c in CELLS[part]], ignore_index=True)


@pytest.mark.slow
def test_pipeline_end_to_end(origin: Path):
    repo = origin
    assert git("status", "--porcelain", cwd=repo).strip() == "", "an output is not committed to git"
    tracked = set(git("ls-files", cwd=repo).split())
    for name in RESULTS:
        assert f"data/{name}.parquet" in tracked
    for part, cells in CELLS.items():
        assert {f"data/{part}/{c}.parquet" for c in cells} <= tracked, part
        assert {f"data/timings/{part}/{c}.parquet" for c in cells} <= tracked, part
        rows = cells_of(repo, part)
        # every row says what made it: the committed code's revision, the machine, the torch build
        assert len(rows) and {"revision", "machine", "torch"} <= set(rows.columns), part
        assert rows["revision"].str.fullmatch(r"[0-9a-f]{40}").all() and (rows["machine"] != "").all(), part
    # the two shards of niah-160 split its prompts, and their union is every prompt once
    shards = [set(pd_read(repo / f"data/baselines/niah-160-{i}of2.parquet")["sample_id"]) for i in (1, 2)]
    assert shards[0] and shards[1] and not shards[0] & shards[1]
    prov = json.loads((repo / "metrics/provenance.json").read_text())
    # one revision made every cell; the kvpress peers (one file, their own venv) do not record theirs yet
    assert [r for r in prov["revisions"] if r != "not recorded"] == [git("rev-parse", "HEAD~1", cwd=repo).strip()]
    assert {e["revision"] for e in prov["parts"]["peers"]} == {"not recorded"}
    assert all(e["last_query"] for e in prov["parts"]["smartkv"])  # made by code that ranks from the last query
    assert "results rows come from 2 revision(s)" in (repo / "REPORT.md").read_text()

    for name in METRICS:
        assert json.loads((repo / "metrics" / name).read_text()), name
    main = json.loads((repo / "metrics/main.json").read_text())["runs"]
    assert {"fp16", "int4", "int2", "kivi-2", "smartkv", "smartkv@int4", "smartkv-b0.30"} <= set(main)
    for run_name, m in main.items():
        assert 0.0 <= m["score_mean"] <= 1.0, (run_name, m)
        assert 0.0 < m["kv_ratio"] <= 1.01, (run_name, m)
        assert "tokens_per_s" not in m  # timings live in metrics/latency.json only
    assert main["fp16"]["kv_ratio"] == pytest.approx(1.0)
    assert main["int2"]["kv_ratio"] < main["int4"]["kv_ratio"] < 1.0
    assert main["smartkv"]["kv_ratio"] <= 0.5 + 1e-6
    assert "score_std" in main["fp16"]  # 2 test seeds give a std

    # Matching: int4's memory measured per split; SmartKV ran at exactly that budget (a cap).
    matched = json.loads((repo / "metrics/matched_budgets.json").read_text())
    assert set(matched) == {"dev", "test"} and set(matched["test"]) == {"int4"}
    assert matched["test"]["int4"]["kv_ratio"] == pytest.approx(main["int4"]["kv_ratio"], abs=1e-6)
    assert main["smartkv@int4"]["kv_ratio"] <= matched["test"]["int4"]["kv_ratio"] + 1e-6
    import pandas as pd

    sk = cells_of(repo, "smartkv")
    assert set(sk["split"]) == {"test"} and set(sk["seed"]) == {0, 1}
    assert json.loads(sk.loc[sk["run"] == "smartkv@int4", "config"].iloc[0])["budget"] == \
        matched["test"]["int4"]["kv_ratio"]
    assert set(sk.loc[sk["run"] == "smartkv@int4", "matched_to"]) == {"int4"}
    assert not {"tokens_per_s", "decode_s", "prefill_s"} & set(sk.columns)
    bl = cells_of(repo, "baselines")
    assert set(bl["split"]) == {"dev", "test"}  # baselines cover both, so no split change re-runs them

    second = json.loads((repo / "metrics/second_model.json").read_text())
    assert second["model"] == "default" and set(second["accuracy"]) == {"fp16", "int4", "smartkv@int4"}
    assert second["accuracy"]["fp16"]["niah@160"]["n"] == 2  # one prompt on each of two seeds
    paired = [c for c in second["comparisons"] if c["measure"] == "score" and c["task"] == "all"]
    assert len(paired) == 1 and paired[0]["n_pairs"] == 2 and 0 <= paired[0]["p_holm"] <= 1
    assert paired[0]["target_kv_ratio"] <= paired[0]["baseline_kv_ratio"] + 1e-6  # matched: a cap
    assert "| smartkv@int4 | int4 |" in (repo / "metrics/second_model_table.md").read_text()

    extra = json.loads((repo / "metrics/extra_cells.json").read_text())  # the main model on its own cells
    assert extra["model"] == "default" and set(extra["accuracy"]["fp16"]) == {"niah@192", "passkey@128"}
    assert {c["task"] for c in extra["comparisons"]} == {"all", "niah@192", "passkey@128"}
    assert "| smartkv@int4 | int4 |" in (repo / "metrics/extra_cells_table.md").read_text()

    # independent passages: FP16 calibrated on the dev seed's passages first, then the test cells
    cal = json.loads((repo / "metrics/passages_calibration.json").read_text())
    assert cal["dev_seeds"] == [100] and list(cal["cells"]) == ["niah_passage-160"] and cal["failed"] == []
    assert cal["cells"]["niah_passage-160"]["n"] == cal["cells"]["niah_passage-160"]["passages"] == 1
    dev = pd_read(repo / "data/passages_dev_tasks.parquet")
    test = pd_read(repo / "data/passages_tasks.parquet")
    assert set(dev["split"]) == {"dev"} and set(test["split"]) == {"test"} and not set(dev["prompt"]) & set(test["prompt"])
    passages = json.loads((repo / "metrics/passages.json").read_text())
    choice = json.loads((repo / "metrics/peers_choice.json").read_text())
    chosen = choice["kept"]["0.50"]["chosen"]
    best = {}  # each press's dev-best setting (candidates in dev order): every press runs on test
    for c in choice["kept"]["0.50"]["candidates"]:
        best.setdefault(c["label"].split("-")[0], c["label"])
    assert set(best) == {"snapkv", "knorm"} and chosen in best.values()
    assert set(passages["accuracy"]) == {"fp16", "int4", "smartkv@int4", "smartkv", "smartkv-b0.30", "random-alloc",
                                         "oracle", "kvpress-none", *best.values()}
    # the eviction peers chosen on the dev passages, then the choice and a no-press control on the test cell
    # SmartKV at the headline budget (0.5) against the press chosen on dev for 0.5 kept, in its own family
    assert {(c["target"], c["baseline"]) for c in passages["comparisons"]} == {
        ("smartkv@int4", "int4"), ("smartkv", "random-alloc"), ("smartkv", "oracle"), ("smartkv", chosen)}
    # ranking or low tier: only where smartkv@int4's bytes are the oracle's (headline budget 0.5 is not int4's)
    assert passages["bottleneck"] == []
    assert passages["presses"]["pairs"] == [["smartkv", chosen]] and passages["presses"]["press_cells_missing"] == []
    assert passages["control"] == dict(passages["control"], n=1, differ=0, missing=0)
    report = (repo / "REPORT.md").read_text()
    assert "Independent prompts: needles in real text" in report and "The no-press control (`kvpress-none`" in report
    assert choice["section"] == "passages" and choice["dev_seeds"] == [100] and list(choice["kept"]) == ["0.50"]
    assert {c["label"] for c in choice["kept"]["0.50"]["candidates"]} == {"snapkv-w8-k0.50", "snapkv-w16-k0.50",
                                                                           "knorm-k0.50"}
    peers = cells_of(repo, "passages/peers")
    # the control, the chosen press, then the other press's dev-best setting
    assert list(dict.fromkeys(peers["run"])) == ["kvpress-none", chosen] + [x for x in best.values() if x != chosen]
    fp16 = cells_of(repo, "passages/baselines").query("run == 'fp16'").set_index("sample_id")
    control = peers.query("run == 'kvpress-none'").set_index("sample_id")
    # the control is FP16 through kvpress's pipeline: the same answers as the fp16 baseline, row for row
    assert control["score"].to_dict() == fp16.loc[control.index, "score"].to_dict()
    assert (control["answer_logprob"] - fp16.loc[control.index, "answer_logprob"]).abs().max() < 1e-3

    prof = json.loads((repo / "metrics/profile.json").read_text())
    assert [b["context"] for b in prof["contexts"]] == [96, 160]
    for b in prof["contexts"]:
        assert {r["run"] for r in b["latency"]} == {"fp16", "int4", "kivi-2", "smartkv"}
        assert all(m["peak_allocated_bytes"] >= m["cache_bytes"] > 0 for m in b["memory"].values())
    assert set(prof["contexts"][-1]["top_ops"]) == {"fp16", "smartkv"}
    assert "git_revision" in prof["provenance"] and "### Where time and memory go" in (repo / "REPORT.md").read_text()
    lat = json.loads((repo / "metrics/latency.json").read_text())["runs"]
    assert all(v["tokens_per_s"] > 0 for v in lat.values()) and "smartkv@int4" in lat
    sig = json.loads((repo / "metrics/significance.json").read_text())["tests"]
    # a comparison with too few pairs for its test (a continuous measure on one pair) has no p
    tested = [t["all"] for t in sig.values() if "p" in t["all"]]
    assert tested and all(0 <= t["p"] <= t["p_holm"] <= 1 for t in tested)
    assert all(t["all"]["n_pairs"] < 2 for t in sig.values() if "p" not in t["all"])
    cells = json.loads((repo / "metrics/cells.json").read_text())["comparisons"]
    tp = pd.read_parquet(repo / "data/tests.parquet")
    assert len(cells) == int(((tp["measure"] == "score") & (tp["task"] == "all")).sum()) > 0 and all(c["n_cells"] >= 1 and c["cells_target"] + c["cells_baseline"]
                                          + c["cells_tied"] == c["n_cells"] for c in cells)
    assert "### Cell by cell" in (repo / "REPORT.md").read_text()
    staged = json.loads((repo / "metrics/cells.json").read_text())["matched_stages"]
    assert set(staged) == {"second_model", "extra_cells", "passages"} and all(
        c["target"] == "smartkv@" + c["baseline"] for cs in staged.values() for c in cs)
    power = json.loads((repo / "metrics/power.json").read_text())
    assert 0 < power["n_for_target_power_by_discordance"]["0.30"]
    abl = json.loads((repo / "metrics/ablations.json").read_text())
    assert {"smartkv", "random-alloc", "oracle"} <= set(abl["runs"])
    assert json.loads((repo / "metrics/sweeps.json").read_text())["note"] == "no experiments yet"

    for stem in FIGURES:
        for ext, magic in (("png", b"\x89PNG"), ("pdf", b"%PDF")):
            path = repo / "plots" / f"{stem}.{ext}"
            assert path.read_bytes()[:4] == magic and path.stat().st_size > 1000, path
    for name in CSVS:
        assert len((repo / "plots" / name).read_text().strip().splitlines()) >= 3, name
    report = (repo / "REPORT.md").read_text()
    for heading in ("## Setup", "## Main results", "## Figures", "## Ablations", "## Significance", "## Limitations"):
        assert heading in report
    assert (repo / "slides.pdf").read_bytes()[:4] == b"%PDF"
    assert not list(repo.glob("**/.*.tmp")), "a temporary file was left behind"

    # Nothing changed: nothing runs.
    assert not ran_stages(run([DVC, "repro"], repo))

    # A model stage re-run from scratch reproduces its results byte for byte (no timestamp, no
    # timing inside): so nothing downstream re-runs except the reader of the timings (and the
    # report, which embeds its figure).
    cell = "data/smartkv/niah-160-2of2.parquet"
    before = {p: (repo / p).read_bytes() for p in [cell, *(f"metrics/{m}" for m in DETERMINISTIC)]}
    timings = (repo / "data/timings/smartkv/niah-160-2of2.parquet").read_bytes()
    run([DVC, "repro", "--force", "--single-item", "smartkv@niah-160-2of2"], repo)
    out = run([DVC, "repro"], repo)
    assert ran_stages(out) == {"latency", "report", "slides"}, out[-2000:]
    for path, data in before.items():
        assert (repo / path).read_bytes() == data, f"{path} changed on a re-run"
    assert (repo / "data/timings/smartkv/niah-160-2of2.parquet").read_bytes() != timings  # the clock did move
    git("checkout", "--", ".", cwd=repo)  # leave origin as committed
