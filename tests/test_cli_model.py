"""`--model` that is not there: one line on stderr naming it, exit status 2, no traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from smartkv.models import EMBEDDED_MODELS, resolve_model_path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "smartkv", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


@pytest.mark.parametrize("command", ["generate", "bench"])
def test_missing_model_dir_is_one_line_and_exit_2(command, tmp_path):
    missing = str(tmp_path / "no" / "such" / "dir")
    extra = ["--method", "fp16", "--prompt", "hello"] if command == "generate" else ["--context", "64"]
    res = run_cli(command, "--model", missing, *extra)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr
    assert missing in lines[0] and "does not exist" in lines[0]


def test_folder_that_is_not_a_model_is_one_line(tmp_path):
    res = run_cli("generate", "--model", str(tmp_path), "--method", "fp16", "--prompt", "hello")
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1 and str(tmp_path) in res.stderr


def test_resolve_model_path(tmp_path):
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"  # a hub id: left to transformers
    for bad in ("/no/such/dir", "./nope", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=f"model path '{bad}' does not exist.*gemma3-270m"):
            resolve_model_path(bad)
    assert set(EMBEDDED_MODELS) == {"default", "gemma3-270m"}
