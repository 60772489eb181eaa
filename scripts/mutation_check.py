"""Mutation check: break SmartKV on purpose, one way at a time, and see that some test notices (issue 35).

Each mutation is one exact text substitution in one library file. For each, on a temporary copy of
this repository's working tree (the real tree is never written), the script applies it, runs the
few test files that should catch it, and records whether they failed and which test failed first.
An unmutated copy runs every listed test file first: a mutation only counts as caught against a
baseline that passes.

    python scripts/mutation_check.py                  # every mutation (a few minutes each on 2 cores)
    python scripts/mutation_check.py reversed-ranking # just these
    make mutation-check

Prints a table (mutation | caught? | first failing test) and exits non-zero if any mutation is not
caught, if the baseline fails, or if a mutation's old text is not found where it should be (a renamed
line would otherwise silently stop mutating anything). docs/mutation_check.md holds a measured table.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PREMISE = ("tests/test_premise.py",)


@dataclass(frozen=True)
class Mutation:
    name: str
    what: str  # what the broken variant does, for the table
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTATIONS = (
    Mutation("reversed-ranking", "least-attended tokens get the most bits", "smartkv/cache/precision_policy.py",
             "        imp = imp.reshape(-1)\n", "        imp = imp.reshape(-1).flip(0)\n", PREMISE),
    Mutation("zeroed-tracker", "importance all zeros (no attention signal)", "smartkv/cache/precision_policy.py",
             "        imp = score[:, :, start : start + n]",
             "        score = torch.zeros_like(score)\n        imp = score[:, :, start : start + n]", PREMISE),
    Mutation("window-dropped", "no FP16 window: every recent token quantized at once", "smartkv/cache/layer_budget.py",
             "        return min(self.spec.window, share_tokens) if self.spec.window_share < 1.0 else self.spec.window\n",
             "        return 0\n", ("tests/test_cache.py",)),
    Mutation("window-uncounted", "FP16 window bytes left out of the budget", "smartkv/cache/layer_budget.py",
             "        return ((self.sink_k.shape[-2] + window_tokens) * self._fp16_token_bytes() + scale",
             "        return ((self.sink_k.shape[-2]) * self._fp16_token_bytes() + scale", ("tests/test_cache.py",)),
    Mutation("scales-unreported", "scales and zero-points left out of the memory report", "smartkv/cache/packed_store.py",
             '            "scales": sum(r.metadata_nbytes for r in rows),\n', '            "scales": 0,\n',
             ("tests/test_memory_breakdown.py",)),
    Mutation("zero-points-unreported", "zero-points left out of the metadata bytes", "smartkv/quantize.py",
             "        total = self.scale.nbytes + (self.zero.nbytes if self.zero is not None else 0)\n",
             "        total = self.scale.nbytes\n", ("tests/test_memory_breakdown.py",)),
)


def copy_tree(dest: Path) -> None:
    """The working tree as git sees it (tracked files and untracked ones not ignored), without .git."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout
    for rel in filter(None, out.decode().split("\0")):
        src = ROOT / rel
        if src.is_file():  # (a deleted, still tracked file is skipped)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def apply(tree: Path, m: Mutation) -> str:
    """Apply `m` in `tree`; returns the file's original text. Raises if its old text is not there exactly once."""
    path = tree / m.file
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"mutation {m.name!r}: its old text occurs {count} times in {m.file} (expected once); "
                         f"update the mutation to the code:\n{m.old}")
    path.write_text(text.replace(m.old, m.new))
    return text


def run_tests(tree: Path, tests: tuple[str, ...], stop_first: bool) -> tuple[int, list[str], float, str]:
    """pytest on `tests` in `tree` (its smartkv imported, not an installed one): rc, the failing test ids
    in the order they ran, seconds and the output's tail."""
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider", "-q", "-rfE",
           *(["-x"] if stop_first else []), *tests]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    # "FAILED tests/x.py::name[an id, maybe with spaces] - message" in the summary -rfE adds, in the order they ran
    summary = out.rpartition("short test summary info")[2]
    failed = re.findall(r"^(?:FAILED|ERROR) (.+?)(?: - .*)?$", summary, flags=re.MULTILINE)
    return proc.returncode, failed, seconds, out[-3000:]


def check_import(tree: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    got = subprocess.run([sys.executable, "-c", "import smartkv; print(smartkv.__file__)"], cwd=tree, env=env,
                         check=True, capture_output=True, text=True).stdout.strip()
    if not Path(got).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"the copy's tests would import smartkv from {got}, not from the copy {tree}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help=f"mutations to run (default: all): {', '.join(m.name for m in MUTATIONS)}")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, and exit")
    parser.add_argument("-x", "--stop-first", action="store_true",
                        help="stop each mutation's run at its first failing test (faster; the count is then 1)")
    args = parser.parse_args(argv)
    known = {m.name: m for m in MUTATIONS}
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name}: {m.what} ({m.file}); tests: {' '.join(m.tests)}")
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; known: {', '.join(known)}")
    chosen = [known[n] for n in args.names] if args.names else list(MUTATIONS)

    with tempfile.TemporaryDirectory(prefix="smartkv-mutation-") as tmp:
        tree = Path(tmp)
        copy_tree(tree)
        check_import(tree)
        for m in chosen:  # every mutation's old text is checked before any test runs
            (tree / m.file).write_text(apply(tree, m))
        baseline = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        rc, failed, seconds, tail = run_tests(tree, baseline, stop_first=False)
        print(f"baseline (no mutation): {' '.join(baseline)}: rc {rc} in {seconds:.0f} s", flush=True)
        if rc != 0:
            print(tail)
            print(f"the unmutated tests do not pass (failing: {failed}): no mutation can be judged")
            return 2
        rows = []
        for m in chosen:
            original = apply(tree, m)
            try:
                rc, failed, seconds, tail = run_tests(tree, m.tests, stop_first=args.stop_first)
            finally:
                (tree / m.file).write_text(original)
            first = failed[0] if failed else None
            if rc == 1 and first:
                verdict = "yes"
            elif rc == 0:
                verdict = "NO"
            else:  # collection error, interrupted, no tests: not a test catching the mutation
                verdict = f"error (pytest rc {rc})"
                print(tail)
            rows.append((m, verdict, first or "-", len(failed), seconds))
            print(f"{m.name}: {verdict} ({len(failed)} failing, first {first or '-'}, {seconds:.0f} s)", flush=True)

    print()
    print("| mutation | what it breaks | file | tests run | caught? | failing tests | first failing test | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for m, verdict, first, n_failed, seconds in rows:
        print(f"| {m.name} | {m.what} | {m.file} | {' '.join(m.tests)} | {verdict} | {n_failed} | `{first}` | {seconds:.0f} |")
    missed = [m.name for m, verdict, *_ in rows if verdict != "yes"]
    if missed:
        print(f"\nnot caught: {', '.join(missed)}")
        return 1
    print(f"\nall {len(rows)} mutations caught")
    return 0


if __name__ == "__main__":
    sys.exit(main())
