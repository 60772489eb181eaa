"""Every bad command-line input: one line on stderr naming the value, exit 2, before any model loads."""

from __future__ import annotations

import pytest

from smartkv.cli import main

CASES = [
    (["bench", "--context", "abc"], "argument --context: invalid int value: 'abc'"),
    (["bench", "--repeats", "x"], "argument --repeats: invalid int value: 'x'"),
    (["bench", "--bogus"], "unrecognized arguments: --bogus"),
    (["generate", "--method", "smartkv", "--budget", "1.5", "--prompt", "hi"], "budget=1.5"),
    (["generate", "--method", "smartkv", "--budget", "abc", "--prompt", "hi"], "argument --budget: invalid float value: 'abc'"),
    (["generate", "--method", "nosuch", "--prompt", "hi"], "nosuch"),
    (["generate", "--method", "uniform", "--bits", "5", "--prompt", "hi"], "bits"),
    (["generate", "--method", "smartkv", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0 must be >= 1"),
    (["generate", "--method", "smartkv", "--prompt-file", "/no/such/file"], "/no/such/file"),
    (["generate", "--method", "smartkv"], "one of the arguments --prompt --prompt-file is required"),
    (["demo", "--depth", "deep"], "argument --depth: invalid float value: 'deep'"),
    (["nosuch"], "invalid choice: 'nosuch'"),
    ([], "the following arguments are required: command"),
]


@pytest.mark.parametrize("argv, names", CASES, ids=[" ".join(a) or "(none)" for a, _ in CASES])
def test_bad_input_is_one_line_and_exit_2(argv, names, capsys, monkeypatch):
    import smartkv.models

    monkeypatch.setattr(smartkv.models, "load_model", lambda *a, **k: pytest.fail("loaded a model for bad input"))
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors leave through sys.exit
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and names in err[0], err[0]
