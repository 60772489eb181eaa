"""Does the CLI, as a user runs it, find a ~2k repeated-filler pass key under SmartKV? (issues 33, 34)

    python docs/probes/cli_passkey_probe.py > docs/probes/cli_passkey_probe.txt

Issue 33 found `python -m smartkv generate --method smartkv --budget 0.3` answering "the pass key
that is used to determine" on this prompt while the same cache inside `model.generate` found the
key: the CLI allocated before the prompt's last query was attended. Issue 34 asks that
`--budget 0.1` work from the CLI (the study's 0-bit tier) and that `--json` report re-allocations,
evicted tokens and the bits histogram. The prompt is the README's filler repeated 75 times, the
needle at depth 0.4; each budget runs as its own `python -m smartkv generate ... --json` process.
Uniform INT3 runs as the reference at about 0.25 of FP16.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
KEY = "52173"
REPEATS, DEPTH = 75, 0.4
RUNS = [("smartkv", ["--budget", "0.3"]), ("smartkv", ["--budget", "0.25"]), ("smartkv", ["--budget", "0.1"]),
        ("uniform", ["--bits", "3"])]


def prompt() -> str:
    before = round(REPEATS * DEPTH)
    return (FILLER * before + f"The pass key is {KEY}. Remember it. " + FILLER * (REPEATS - before)
            + "What is the pass key? The pass key is")


def main() -> None:
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "smartkv"], capture_output=True, text=True).stdout.strip()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").exists() else platform.machine()
    print(f"revision {rev}{'-dirty' if dirty else ''}, {cpu}, "
          f"python {platform.python_version()}; prompt: filler x {REPEATS}, key {KEY} at depth {DEPTH}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "prompt.txt"
        path.write_text(prompt())
        for method, args in RUNS:
            cmd = [sys.executable, "-m", "smartkv", "generate", "--method", method, *args, "--prompt-file", str(path),
                   "--max-new-tokens", "8", "--json"]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{' '.join(cmd[3:-4])}: exit {out.returncode}: {out.stderr.strip().splitlines()[-1]}")
                continue
            d = json.loads(out.stdout)
            found = KEY in d["text"]
            extra = {k: d[k] for k in ("reallocations", "evicted_tokens", "bits_histogram") if k in d}
            print(f"{method} {' '.join(args)}: {d['prompt_tokens']} prompt tokens, kv_ratio {d['kv_ratio']:.3f}, "
                  f"answer {d['text']!r}: key {'found' if found else 'MISSED'}; {json.dumps(extra)}")


if __name__ == "__main__":
    main()
