"""`python -m diffeqkit compare --sweep`: gradient time against the number of
inputs on neural ODEs of growing width, where forward mode stops winning.

The runs here are tiny (SciPy only, widths 1 and 2, one round): what is tested
is the bookkeeping (points, rows, budget, crossover), not the timings, which
docs/figures/sweep.json records from a full run.
"""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from conftest import need_gradients

from diffeqkit import problems
from diffeqkit.__main__ import main
from diffeqkit.tools import sweep

METHODS = ["ForwardMode", "CheckpointedAdjoint"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    need_gradients("scipy")
    path = tmp_path_factory.mktemp("sweep") / "sweep.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            [
                "compare",
                "--sweep",
                "--widths",
                "1",
                "2",
                "--backends",
                "scipy",
                "--sensealgs",
                *METHODS,
                "--repeat",
                "1",
                "--quiet",
                "--json",
                str(path),
            ]
        )
    assert code == 0
    return out.getvalue(), json.loads(path.read_text())


def test_sweep_reports_a_point_per_width_with_its_parameter_count(report):
    text, rep = report
    assert rep["kind"] == "sweep"
    assert [p["width"] for p in rep["points"]] == [1, 2]
    # 2 -> w -> w -> 2: w^2 + 6w + 2 parameters, plus the 2 states of u0.
    assert [p["parameters"] for p in rep["points"]] == [9, 18]
    assert [p["inputs"] for p in rep["points"]] == [11, 20]
    assert rep["points"][1]["parameters"] == problems.neural_ode_size(2, 2, 2)
    for point in rep["points"]:
        assert [(r["backend"], r["sensealg"]) for r in point["rows"]] == [
            ("scipy", m) for m in METHODS
        ]
        for row in point["rows"]:
            assert row["status"] == "ok", row["reason"]
            assert row["gradient_s"] > 0
            assert row["rel_error"] is None  # the sweep checks no accuracy
    assert "scipy ForwardMode" in text
    assert set(rep["crossover"]) == {"scipy"}
    assert rep["conclusion"][0].startswith("scipy: ")


def test_method_over_the_budget_is_skipped_at_larger_widths():
    need_gradients("scipy")
    rep = sweep.sweep(
        (1, 2), backends=["scipy"], sensealgs=METHODS, repeat=1, budget_s=1e-9
    )
    first, second = rep["points"]
    assert [r["status"] for r in first["rows"]] == ["ok", "ok"]
    assert [r["status"] for r in second["rows"]] == ["skipped", "skipped"]
    assert "over the budget" in second["rows"][0]["reason"]
    assert "at width 1, more than 1e-09 s" in second["rows"][0]["reason"]


ADJOINT = "ReverseThroughSolver"


def _points(times):
    """A sweep report from ``{inputs: (forward s, adjoint s)}``."""
    return {
        "points": [
            {
                "inputs": n,
                "rows": [
                    {"backend": "b", "sensealg": "ForwardMode", "gradient_s": f},
                    {
                        "backend": "b",
                        "sensealg": "ReverseThroughSolver",
                        "gradient_s": a,
                    },
                ],
            }
            for n, (f, a) in times.items()
        ]
    }


@pytest.mark.parametrize(
    ("times", "cross", "won"),
    [
        ({10: (1, 2), 100: (2, 2.5), 1000: (9, 3), 10**4: (90, 5)}, 1000, 100),
        ({10: (1, 2), 100: (2, 3)}, None, 100),  # forward mode wins throughout
        ({10: (3, 2), 100: (4, 3)}, 10, None),  # it never wins
        # A lost size in the middle (noise) is no crossover if it wins again later.
        ({10: (1, 2), 100: (3, 2), 1000: (3, 4), 10**4: (9, 5)}, 10**4, 1000),
        # Unmeasured ForwardMode (skipped or unsupported) at a size: not compared.
        ({10: (1, 2), 100: (None, 3)}, None, 10),
    ],
)
def test_crossover_is_where_an_adjoint_wins_from_then_on(times, cross, won):
    (c,) = sweep.crossovers(_points(times)).values()
    assert c["crossover_inputs"] == cross
    assert c["forward_wins_up_to"] == won


def test_sweep_figure_is_written(report, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "sweep.png"
    sweep.plot_sweep(report[1], str(path))
    assert path.stat().st_size > 1000
