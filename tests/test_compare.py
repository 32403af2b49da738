"""`python -m diffeqkit compare`: the command runs and prints a row per installed
backend x sensealg, its JSON has a fixed schema, combinations a backend lacks are
rows with the reason, and bad command lines exit with code 2 and a clear message.

One module-scoped run of the command serves the output and schema tests: a small
problem (pk_two_compartment: 3 states, 11 saves, ~60 steps), two methods and two
rounds; JAX's compilations are most of its time. The full default run is timed
in docs/compare.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import re
import sys

import numpy as np
import pytest
from conftest import SCIPY_AUTODIFF, backend_params, need, need_gradients

import diffeqkit as dk
from diffeqkit import backends
from diffeqkit.__main__ import main
from diffeqkit._sensealg import SENSEALGS
from diffeqkit.tools import compare
from diffeqkit.tools.counting import EvaluationCounter

INSTALLED = [b for b in backends.SPECS if backends.installed(b)]
# ReverseThroughSolver for its unsupported row on SciPy; CheckpointedAdjoint runs
# everywhere. (torch's ForwardMode would add ~10 s of per-op forward-AD overhead.)
METHODS = ["ReverseThroughSolver", "CheckpointedAdjoint"]
ROW_KEYS = {f.name for f in dataclasses.fields(compare.Row)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(exit code, stdout, JSON report) of one small compare run."""
    if not INSTALLED:
        pytest.skip("no backend installed")
    path = tmp_path_factory.mktemp("compare") / "report.json"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(
            [
                "compare",
                "--problem",
                "pk_two_compartment",
                "--sensealgs",
                *METHODS,
                "--repeat",
                "2",
                "--quiet",
                "--json",
                str(path),
            ]
        )
    return code, out.getvalue(), json.loads(path.read_text())


def test_command_exits_zero_and_prints_every_installed_backend(run):
    code, text, _ = run
    assert code == 0
    for backend in INSTALLED:
        assert f"{backend} forward" in text
    assert "reference gradient" in text or "no reference gradient" in text


def test_json_has_one_row_per_backend_and_method_with_every_key(run):
    _, _, report = run
    assert set(report) == {
        "schema",
        "problem",
        "settings",
        "reference",
        "environment",
        "rows",
        "conclusion",
        "wall_s",
    }
    assert [(r["backend"], r["sensealg"]) for r in report["rows"]] == [
        (b, m) for b in INSTALLED for m in METHODS
    ]
    for row in report["rows"]:
        assert set(row) == ROW_KEYS
        assert row["status"] in {"ok", "unsupported", "failed"}
    assert set(report["environment"]["versions"]) >= {"numpy", "scipy", "jax", "torch"}
    assert report["settings"]["repeat"] == 2


def test_reference_is_scipy_forward_sensitivities_when_available(run):
    need_gradients("scipy")
    _, text, report = run
    ref = report["reference"]
    assert (ref["backend"], ref["sensealg"], ref["alg"]) == (
        "scipy",
        "ForwardMode",
        "dopri8",
    )
    assert "reference gradient: scipy ForwardMode" in text


SUPPORTED = [
    pytest.param(b.values[0], m, id=f"{b.values[0]}-{m}", marks=b.marks)
    for b in backend_params()
    for m in METHODS
    if m in backends.SPECS[b.values[0]].capabilities.sensealgs
]


@pytest.mark.parametrize(("backend", "method"), SUPPORTED)
def test_supported_rows_are_timed_counted_and_accurate(run, backend, method):
    need_gradients(backend)
    row = next(
        r for r in run[2]["rows"] if (r["backend"], r["sensealg"]) == (backend, method)
    )
    assert row["status"] == "ok", row["reason"]
    assert row["gradient_s"] > 0
    assert row["forward_s"] > 0
    assert row["gradient_first_s"] > 0
    assert row["repeats"] == 2
    assert row["gradient_iqr_s"] is not None
    assert row["ratio"] == pytest.approx(row["gradient_s"] / row["forward_s"])
    assert row["forward_steps"] > 0
    assert row["forward_rejected"] >= 0
    # Every step evaluates f at least twice (CheckpointedAdjoint runs
    # dopri5-class tsit5: 6 new stages per step; ReverseThroughSolver likewise).
    assert row["forward_nfev"] >= 2 * row["forward_steps"]
    assert isinstance(row["backward_nfev"], int)
    if (backend, method) == ("torch", "ReverseThroughSolver"):
        assert row["backward_nfev"] == 0  # autograd replays its tape, not f
    else:
        # Recomputation from checkpoints (or an adjoint solve): f runs again.
        assert row["backward_nfev"] >= row["forward_steps"]
    # PK at rtol 1e-6 against the dopri8 reference at 1e-12: errors measured
    # near 3e-7 (smooth and non-oscillating, unlike Lotka-Volterra). 1e-4 fails
    # a gradient that is wrong in any component, with margin for the
    # tolerance-limited error of the adjoint methods.
    assert row["rel_error"] < 1e-4
    assert row["accurate"] is True


def test_reverse_through_solver_on_scipy_is_unsupported_with_reason(run):
    need("scipy")
    row = next(
        r
        for r in run[2]["rows"]
        if (r["backend"], r["sensealg"]) == ("scipy", "ReverseThroughSolver")
    )
    assert row["status"] == "unsupported"
    assert "not available on backend='scipy'" in row["reason"]
    assert "dk.ForwardMode()" in row["reason"]
    assert row["gradient_s"] is None
    assert "unsupported: sensealg=dk.ReverseThroughSolver()" in run[1]


def test_scipy_memory_is_measured_by_tracemalloc(run):
    need_gradients("scipy")
    row = next(
        r
        for r in run[2]["rows"]
        if (r["backend"], r["sensealg"]) == ("scipy", "CheckpointedAdjoint")
    )
    assert row["memory_method"] == "tracemalloc"
    assert row["peak_memory_mb"] > 0


def test_jax_memory_is_xla_buffer_assignment(run):
    need("jax")
    rows = {r["sensealg"]: r for r in run[2]["rows"] if r["backend"] == "jax"}
    assert {r["memory_method"] for r in rows.values()} == {"xla buffer assignment"}
    # ReverseThroughSolver keeps a checkpoint per possible step (max_steps of them).
    reverse = rows["ReverseThroughSolver"]["peak_memory_mb"]
    assert reverse > 10 * rows["CheckpointedAdjoint"]["peak_memory_mb"] > 0
    assert "xla buffer assignment (jax)" in " ".join(run[1].split())


def test_conclusion_names_fastest_accurate_method_per_backend(run):
    _, text, report = run
    for backend in INSTALLED:
        if backend == "scipy" and not SCIPY_AUTODIFF:
            continue
        line = next(c for c in report["conclusion"] if c.startswith(f"{backend}:"))
        ok = [
            r
            for r in report["rows"]
            if r["backend"] == backend and r["status"] == "ok" and r["accurate"]
        ]
        fastest = min(ok, key=lambda r: r["gradient_s"])
        assert f"fastest accurate gradient is {fastest['sensealg']}" in line
        assert line.split(": ")[0] in text


# ---------------------------------------------------------------------------------
# The library function, on cases the command run does not cover.
# ---------------------------------------------------------------------------------


def test_backend_not_installed_gives_unsupported_rows_with_pip_line(monkeypatch):
    need("scipy")  # the problem's data comes from a SciPy solve
    real = backends.installed
    monkeypatch.setattr(backends, "installed", lambda b: b != "torch" and real(b))
    report = compare.compare(
        "pk_two_compartment", backends=["torch"], sensealgs=["ForwardMode"]
    )
    (row,) = report["rows"]
    assert row["status"] == "unsupported"
    assert 'pip install "diffeqkit[torch]"' in row["reason"]


def test_device_a_backend_lacks_gives_unsupported_rows():
    need("scipy")
    report = compare.compare(
        "pk_two_compartment",
        backends=["scipy"],
        sensealgs=["ForwardMode"],
        repeat=1,
        device="cuda",
    )
    (row,) = report["rows"]
    assert row["status"] == "unsupported"
    assert "device='cuda' is not available on backend='scipy'" in row["reason"]


def test_method_that_raises_is_a_failed_row_and_the_others_still_run(monkeypatch):
    need_gradients("scipy")
    real = compare.vjp

    def vjp(prob, *args, sensealg, **kw):
        if sensealg.name == "ContinuousAdjoint":
            raise RuntimeError("boom in the backward pass")
        return real(prob, *args, sensealg=sensealg, **kw)

    monkeypatch.setattr(compare, "vjp", vjp)
    report = compare.compare(
        "pk_two_compartment",
        backends=["scipy"],
        sensealgs=["ForwardMode", "ContinuousAdjoint"],
        repeat=1,
    )
    ok, failed = report["rows"]
    assert ok["status"] == "ok"
    assert failed["status"] == "failed"
    assert failed["reason"] == "RuntimeError: boom in the backward pass"
    assert any("Failed: ContinuousAdjoint on scipy" in c for c in report["conclusion"])


def _row(backend, method, seconds, error):
    row = compare.Row(backend, method, gradient_s=seconds, rel_error=error)
    row.forward_s, row.ratio = seconds / 2, 2.0
    return row


def test_inaccurate_method_is_flagged_and_not_called_fastest():
    rows = [
        _row("jax", "ForwardMode", 2e-3, 1e-5),
        _row("jax", "ContinuousAdjoint", 1e-3, 0.5),  # faster, but wrong
    ]
    limit = compare._accuracy_limit(rows, rtol=1e-6)
    # 10 x the best error (1e-5) beats the floor of 100 x rtol (1e-4).
    assert limit == pytest.approx(1e-4)
    report = {
        "rows": [
            dict(dataclasses.asdict(r), accurate=r.rel_error <= limit) for r in rows
        ],
        "settings": {"accurate_if_rel_error_below": limit},
        "reference": {"backend": "scipy"},
    }
    text = " ".join(compare.conclusions(report))
    assert "jax: fastest accurate gradient is ForwardMode" in text
    assert "ContinuousAdjoint on jax is not accurate here" in text


def test_accuracy_limit_has_a_floor_of_100_rtol():
    rows = [_row("jax", "ForwardMode", 1e-3, 1e-12)]
    assert compare._accuracy_limit(rows, rtol=1e-6) == pytest.approx(1e-4)


# ---------------------------------------------------------------------------------
# Bad command lines: exit code 2 and a message saying what to pass.
# ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--problem", "lorentz"], r"--problem: invalid choice: 'lorentz'"),
        (["--backends", "julia"], r"--backends: invalid choice: 'julia'"),
        (["--sensealgs", "Backsolve"], r"--sensealgs: invalid choice: 'Backsolve'"),
        (["--alg", "rk45"], r"alg='rk45' is not a solver diffeqkit knows"),
        (["--repeat", "0"], r"repeat must be an int >= 1"),
        (["--rtol", "-1"], r"rtol must be a positive number"),
        (["--sweep", "--problem", "lorenz"], r"--sweep measures the neural ODE"),
        (["--widths", "4"], r"--widths goes with --sweep"),
        (["--sweep", "--widths", "0"], r"widths must be ints >= 1; got 0"),
        (["--sweep", "--budget", "0"], r"budget_s must be a positive number"),
    ],
)
def test_bad_command_line_exits_2_with_message(capsys, argv, match):
    need("scipy")  # --rtol is checked after the problem (and its data) is built
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--quiet", *argv])
    assert exc.value.code == 2
    assert re.search(match, capsys.readouterr().err)


def test_unknown_names_in_the_library_raise_invalid_problem_error():
    with pytest.raises(compare.InvalidProblemError, match=r"sensealg 'Fwd' unknown"):
        compare.compare("lotka_volterra", sensealgs=["Fwd"])


def test_plot_without_matplotlib_exits_2_with_pip_line(monkeypatch, capsys):
    # None in sys.modules makes `import matplotlib` raise ImportError.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--plot", "out.png"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err
    assert 'pip install "diffeqkit[plot]"' in err


def test_plot_writes_a_figure(run, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "compare.png"
    compare.plot(run[2], str(path))
    assert path.stat().st_size > 1000
    assert np.isfinite(run[2]["wall_s"])


# ---------------------------------------------------------------------------------
# Counting evaluations of f: at run time, in compiled code too.
# ---------------------------------------------------------------------------------


def decay(u, p, t):
    return -p * u


@pytest.mark.parametrize("backend", backend_params())
def test_counter_counts_each_run_of_f_even_when_compiled_once(backend):
    need(backend)
    counter = EvaluationCounter(decay)
    prob = dk.ODEProblem(counter, np.array([1.0, 2.0]), (0.0, 1.0), 0.5)
    runs = []
    for p in (0.5, 0.7):  # the second solve reuses JAX's compiled program
        before = counter.read()
        sol = dk.solve(prob.remake(p=p), "rk4", backend=backend, dt0=0.1)
        runs.append(counter.read() - before)
        # rk4's 4 stages x 10 steps as the solver reports them, plus at most the
        # one check of f(u0, p, t0) the solve makes before integrating.
        assert sol.stats["nfev"] >= 40
        assert runs[-1] - sol.stats["nfev"] in (0, 1)
    assert runs[0] == runs[1]


def test_counter_counts_jvps_and_vjps_of_f_on_jax():
    need("jax")
    import jax

    counter = EvaluationCounter(decay)
    u = jax.numpy.array([1.0, 2.0])
    jax.jit(lambda u: jax.jvp(lambda v: counter(v, 0.5, 0.0), (u,), (u,)))(u)
    jax.jit(lambda u: jax.vjp(lambda v: counter(v, 0.5, 0.0), u)[1](u))(u)
    assert counter.read() == 2


def test_no_count_leaves_the_evaluation_counts_unknown(capsys):
    need_gradients("scipy")
    code = main(
        [
            "compare",
            "--problem",
            "pk_two_compartment",
            "--backends",
            "scipy",
            "--sensealgs",
            "ForwardMode",
            "--repeat",
            "1",
            "--quiet",
            "--no-count",
        ]
    )
    assert code == 0
    assert re.search(r"ForwardMode .* n/a/n/a", capsys.readouterr().out)
    report = compare.compare(
        "pk_two_compartment",
        backends=["scipy"],
        sensealgs=["ForwardMode"],
        repeat=1,
        count=False,
    )
    (row,) = report["rows"]
    assert report["settings"]["count"] is False
    assert row["status"] == "ok"
    assert row["forward_nfev"] is None
    assert row["backward_nfev"] is None
    assert row["forward_steps"] > 0  # steps come from the stats, not the count


# ---------------------------------------------------------------------------------
# The registry's data, not names in the tools: reference, sensealgs, algs.
# ---------------------------------------------------------------------------------


def test_reference_candidates_follow_the_registry_rank_and_algs():
    names = list(reversed(backends.SPECS))
    ranked = compare._reference_candidates(names)
    caps = {b: backends.SPECS[b].capabilities for b in names}
    expected = sorted(
        (b for b in names if caps[b].reference_algs is not None),
        key=lambda b: caps[b].reference_rank,
    )
    assert [b for b, _ in ranked] == expected
    for b, algs in ranked:
        assert algs == caps[b].reference_algs


def test_default_sensealgs_are_every_one_of_the_core():
    assert list(compare.SENSEALG_NAMES) == [c.name for c in SENSEALGS]
    assert "InterpolatingAdjoint" in compare.SENSEALG_NAMES


def test_continuous_adjoint_with_an_implicit_alg_is_unsupported_naming_the_fix(
    monkeypatch,
):
    need("scipy")
    # The row is decided before anything runs; the reference is not its subject.
    monkeypatch.setattr(compare, "_reference", lambda pb, b: (None, {"error": "-"}))
    report = compare.compare(
        "van_der_pol",
        backends=["scipy"],
        sensealgs=["ContinuousAdjoint"],
        alg="radau",
        repeat=1,
        count=False,
    )
    (row,) = report["rows"]
    assert row["status"] == "unsupported"
    assert "InterpolatingAdjoint" in row["reason"]
    assert row["gradient_s"] is None


def _every_method_report(run):
    """The command run's report with a row per backend x every sensealg: ok rows
    copied from a measured one, and one failed row with a long note."""
    report = json.loads(json.dumps(run[2]))
    rows = []
    for backend in dict.fromkeys(r["backend"] for r in report["rows"]):
        mine = [r for r in report["rows"] if r["backend"] == backend]
        template = next((r for r in mine if r["status"] == "ok"), mine[0])
        for name in compare.SENSEALG_NAMES:
            row = dict(template, sensealg=name)
            if name == "InterpolatingAdjoint":
                row.update(status="failed", reason="RuntimeError: " + "x" * 120)
            rows.append(row)
    report["rows"] = rows
    return report


def test_table_of_every_method_fits_80_columns(run):
    rich = pytest.importorskip("rich.console")
    out = io.StringIO()
    console = rich.Console(file=out, width=80, highlight=False, no_color=True)
    compare.format_table(_every_method_report(run), console)
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    # One line per method row: a wrapped label would split it over two.
    for short in ("ForwardMode", "Reverse", "Continuous", "Interp", "Checkpointed"):
        labelled = [line for line in lines if line.startswith(f"  {short}")]
        assert len(labelled) == len(INSTALLED), (short, lines)
    for backend in INSTALLED:
        assert f"{backend} forward" in out.getvalue(), lines


def test_backend_label_stays_on_one_line_with_wide_numbers(run):
    # Slow timings and large memory widen the number columns; the label column
    # must not be the one that gives way (CI once printed "torch\nforward").
    rich = pytest.importorskip("rich.console")
    report = _every_method_report(run)
    for row in report["rows"]:
        if row["status"] == "ok":
            row.update(forward_s=12.345678, forward_iqr_s=1.2345, gradient_s=123.456)
            row.update(peak_memory_mb=123456.0, forward_first_s=123.45)
    out = io.StringIO()
    console = rich.Console(file=out, width=80, highlight=False, no_color=True)
    compare.format_table(report, console)
    for backend in INSTALLED:
        assert f"{backend} forward" in out.getvalue(), out.getvalue()
    assert "Interp = InterpolatingAdjoint" in " ".join(out.getvalue().split())


def test_compare_without_rich_exits_2_with_pip_line(monkeypatch, capsys):
    # None in sys.modules makes `import rich` raise ImportError.
    monkeypatch.setitem(sys.modules, "rich", None)
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "rich, which is not installed" in err
    assert 'pip install "diffeqkit[cli]"' in err


def test_info_works_without_rich(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rich", None)
    assert main(["info"]) == 0
    assert "scipy" in capsys.readouterr().out
