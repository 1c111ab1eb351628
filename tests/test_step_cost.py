"""benchmarks/poet_step_cost.py: its least-squares fit recovers a known line, and a tiny grid runs end to end
(no timing is asserted)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import poet_step_cost  # noqa: E402


def test_fit_recovers_an_exact_line():
    xs = [1e6, 4e6, 9e6, 2e7]
    t0, c, r2 = poet_step_cost.fit(xs, [0.5 + 3e-6 * x for x in xs])
    assert t0 == pytest.approx(0.5, abs=1e-9) and c == pytest.approx(3e-6, rel=1e-9) and r2 == pytest.approx(1.0)


def test_tiny_grid_reports_every_point_and_the_fit(tmp_path, capsys):
    out = tmp_path / "fit.json"
    res = poet_step_cost.main(["--sizes", "16x16x4,32x16x4,32x32x8,64x32x8", "--reps", "1", "--json", str(out)])
    assert json.loads(out.read_text())["points"] == res["points"]
    assert [(q["m"], q["n"], q["b"]) for q in res["points"]] == [(16, 16, 4), (32, 16, 4), (32, 32, 8), (64, 32, 8)]
    assert all(q["ms"] > 0 and q["mnb"] == q["m"] * q["n"] * q["b"] for q in res["points"])
    assert "R^2" in capsys.readouterr().out


@pytest.mark.parametrize("sizes", ["16x16", "16x16x1", "16x16x32", "16x16x4"])
def test_bad_sizes_are_refused_with_the_item(sizes):
    with pytest.raises(SystemExit, match="--sizes"):
        poet_step_cost.main(["--sizes", sizes])
