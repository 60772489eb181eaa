"""`python -m smartkv demo`: the ASCII allocation map, bad input, and one real run (slow)."""

import numpy as np
import pytest

from smartkv.cli import main
from smartkv.demo import ascii_allocation_map, glyph


def test_ascii_map_bands_columns_and_needle():
    bits = np.full((10, 40), 2.0)
    bits[:, :4] = 16  # sinks
    bits[5:, 20:24] = 8  # the top band gives the needle 8 bits
    text = ascii_allocation_map(bits, columns=10, band=5, needle=(20, 24))
    rows = text.splitlines()
    assert rows[0] == "L05-09 |F....#....|"  # last layers first
    assert rows[1] == "L00-04 |F.........|"
    assert rows[2].strip().startswith("^") and rows[2].index("^") == rows[0].index("#")
    assert "'.' 2-bit" in rows[-1] and "'#' 8-bit" in rows[-1] and "'F' FP16" in rows[-1]
    assert glyph(2.4) == "." and glyph(3.6) == "+" and glyph(12.5) == "F"
    with pytest.raises(ValueError, match="layers, tokens"):
        ascii_allocation_map(np.zeros(5))


@pytest.mark.parametrize("argv, message", [
    (["demo", "--length", "10"], "--length 10"),
    (["demo", "--depth", "1.5"], "--depth 1.5"),
    (["demo", "--budget", "0"], "budget"),
])
def test_demo_bad_input_exits_2_before_loading(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_demo_runs_on_the_default_model(capsys):
    assert main(["demo", "--length", "256", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "fp16     answer:" in out and "smartkv  answer:" in out
    assert "(1.000 of FP16" in out and "L25-29 |" in out and "L00-04 |" in out and "^ needle" in out
    smart = [line for line in out.splitlines() if line.startswith("smartkv")][0]
    ratio = float(smart.split("(")[1].split(" of FP16")[0])
    assert ratio <= 0.25
