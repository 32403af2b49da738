"""Every error path of API.md sections 1, 2 and 5, with its message."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from problems import linear, linear_problem

import diffeqkit as dk
from diffeqkit import backends


def decay(u, p, t):
    return -u


U0 = np.array([1.0, 2.0])


def test_error_hierarchy():
    assert issubclass(dk.InvalidProblemError, dk.DiffEqKitError)
    assert issubclass(dk.InvalidProblemError, ValueError)
    assert issubclass(dk.UnsupportedError, NotImplementedError)
    assert issubclass(dk.BackendNotInstalledError, ImportError)
    assert issubclass(dk.SolveError, RuntimeError)
    for cls in (dk.UnsupportedError, dk.BackendNotInstalledError, dk.SolveError):
        assert issubclass(cls, dk.DiffEqKitError)


# -- ODEProblem ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"f": 3}, r"f must be a callable", id="f-not-callable"),
        pytest.param({"jac": "x"}, r"jac must be None or a callable", id="jac"),
        pytest.param({"u0": None}, r"u0 is required", id="u0-none"),
        pytest.param({"u0": [1.0, np.nan]}, r"u0 must be finite", id="u0-nan"),
        pytest.param(
            {"u0": np.array([np.inf])}, r"u0 must be finite", id="u0-inf-array"
        ),
        pytest.param({"u0": [[1.0], [1.0, 2.0]]}, r"rectangular", id="u0-ragged"),
        pytest.param({"u0": ["a"]}, r"u0 must hold real numbers", id="u0-strings"),
        pytest.param(
            {"u0": np.array([1, 2])}, r"u0 must be a float32 or float64", id="u0-int"
        ),
        pytest.param(
            {"u0": np.array([1 + 1j])}, r"float32 or float64.*complex", id="u0-cplx"
        ),
        pytest.param(
            {"tspan": (0.0, 0.0)}, r"t0 != t1.*tspan=\(0\.0, 0\.0\)", id="t0=t1"
        ),
        pytest.param({"tspan": (0.0, np.inf)}, r"tspan must be finite", id="t1-inf"),
        pytest.param({"tspan": (0.0,)}, r"tspan must have 2 entries", id="tspan-1"),
        pytest.param({"tspan": 5.0}, r"tspan must be a pair", id="tspan-scalar"),
        pytest.param({"tspan": ("a", 1)}, r"must hold numbers", id="tspan-str"),
        pytest.param({"p": {"k": np.nan}}, r"p\['k'\] must be finite", id="p-nan"),
        pytest.param({"p": [1.0, "x"]}, r"p\[1\] must be a number", id="p-str"),
        pytest.param(
            {"p": {"a": np.array([1.0, np.inf])}},
            r"p\['a'\] must be finite",
            id="p-inf",
        ),
        pytest.param({"p": np.array(["a"])}, r"p must be a real array", id="p-strarr"),
    ],
)
def test_invalid_problem_raises_with_message(kwargs, match):
    args = {"f": decay, "u0": U0, "tspan": (0.0, 1.0), "p": None} | kwargs
    jac = args.pop("jac", None)
    with pytest.raises(dk.InvalidProblemError, match=match):
        dk.ODEProblem(args["f"], args["u0"], args["tspan"], args["p"], jac=jac)


def test_problem_is_immutable_and_remake_revalidates():
    prob = dk.ODEProblem(decay, U0, (0.0, 1.0), {"k": 1.0})
    with pytest.raises(AttributeError):
        prob.u0 = U0  # type: ignore[misc]
    new = prob.remake(p={"k": 2.0}, tspan=(1.0, 0.0))
    assert new.p == {"k": 2.0}
    assert new.tspan == (1.0, 0.0)
    assert prob.p == {"k": 1.0}
    assert new.f is prob.f
    with pytest.raises(dk.InvalidProblemError, match="t0 != t1"):
        prob.remake(tspan=(2.0, 2.0))
    assert prob.remake(p=None).p is None


def test_tspan_is_normalised_to_floats():
    prob = dk.ODEProblem(decay, U0, [np.float32(0), 2])
    assert prob.tspan == (0.0, 2.0)
    assert all(type(t) is float for t in prob.tspan)


# -- solve arguments ----------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param(
            {"rtol": 0.0}, dk.InvalidProblemError, "rtol must be a positive", id="rtol0"
        ),
        pytest.param(
            {"rtol": -1e-3}, dk.InvalidProblemError, "rtol=-0.001", id="rtol-neg"
        ),
        pytest.param(
            {"atol": np.nan},
            dk.InvalidProblemError,
            "atol must be a positive",
            id="atol-nan",
        ),
        pytest.param(
            {"atol": "1e-6"}, dk.InvalidProblemError, "atol must be", id="atol-str"
        ),
        pytest.param(
            {"max_steps": 0},
            dk.InvalidProblemError,
            "max_steps must be an int >= 1",
            id="max0",
        ),
        pytest.param(
            {"max_steps": 10.5},
            dk.InvalidProblemError,
            "max_steps must be",
            id="max-float",
        ),
        pytest.param(
            {"max_steps": True},
            dk.InvalidProblemError,
            "max_steps must be",
            id="max-bool",
        ),
        pytest.param(
            {"dt0": -0.1}, dk.InvalidProblemError, "dt0 is a step length", id="dt0-neg"
        ),
        pytest.param(
            {"alg": "rk4"},
            dk.InvalidProblemError,
            "dt0 is required by the fixed-step alg='rk4'",
            id="rk4-no-dt0",
        ),
        pytest.param(
            {"alg": "euler", "dt0": 1e-6, "max_steps": 10},
            dk.InvalidProblemError,
            r"needs 1000000 steps.*max_steps=10",
            id="fixed-too-many",
        ),
        pytest.param(
            {"alg": "rk45"},
            dk.UnsupportedError,
            r"alg='rk45' is not a solver diffeqkit knows\. Known solvers: euler",
            id="alg-unknown",
        ),
        pytest.param(
            {"alg": 5}, dk.UnsupportedError, "alg=5 is not a solver", id="alg-int"
        ),
        pytest.param(
            {"backend": "julia"},
            dk.InvalidProblemError,
            r"backend must be one of jax, torch, scipy, numpy",
            id="backend-unknown",
        ),
        pytest.param(
            {"saveat": np.array([0.5, 0.2])},
            dk.InvalidProblemError,
            "saveat must be strictly increasing",
            id="saveat-order",
        ),
        pytest.param(
            {"saveat": np.array([0.5, 1.5])},
            dk.InvalidProblemError,
            r"saveat must lie inside tspan=\(0\.0, 1\.0\)",
            id="saveat-outside",
        ),
        pytest.param(
            {"saveat": np.array([[0.5]])},
            dk.InvalidProblemError,
            "saveat must be a non-empty 1-D",
            id="saveat-2d",
        ),
        pytest.param(
            {"saveat": np.array([])},
            dk.InvalidProblemError,
            "saveat must be a non-empty 1-D",
            id="saveat-empty",
        ),
        pytest.param(
            {"saveat": [0.1, np.nan]},
            dk.InvalidProblemError,
            "saveat must be finite",
            id="saveat-nan",
        ),
        pytest.param(
            {"saveat": 0.0},
            dk.InvalidProblemError,
            "saveat as a float must be a positive",
            id="saveat-dt0",
        ),
        pytest.param(
            {"saveat": 1e-9},
            dk.InvalidProblemError,
            "save points, more than",
            id="saveat-huge",
        ),
        pytest.param(
            {"saveat": "all"}, dk.InvalidProblemError, "saveat must be", id="saveat-str"
        ),
        pytest.param(
            {"device": "tpu"},
            dk.InvalidProblemError,
            "device must be None, 'cpu', 'cuda'",
            id="device-bad",
        ),
        pytest.param(
            {"device": "cuda"},
            dk.UnsupportedError,
            r"device='cuda' is not available on backend='scipy'",
            id="device-scipy",
        ),
        pytest.param(
            {"dtype": "int32"},
            dk.InvalidProblemError,
            "dtype must be None, 'float32' or 'float64'",
            id="dtype-int",
        ),
        pytest.param(
            {"throw": "yes"},
            dk.InvalidProblemError,
            "throw must be True or False",
            id="throw",
        ),
        pytest.param(
            {"sensealg": "adjoint"},
            dk.InvalidProblemError,
            r"sensealg must be a diffeqkit gradient method or None; got "
            r"sensealg='adjoint'\. Pass one of dk\.ForwardMode\(\)",
            id="sensealg-string",
        ),
        pytest.param(
            {"sensealg": dk.ForwardMode},
            dk.InvalidProblemError,
            r"Pass an instance: sensealg=dk\.ForwardMode\(\)\.",
            id="sensealg-class",
        ),
        pytest.param(
            {"sensealg": dk.ReverseThroughSolver()},
            dk.UnsupportedError,
            r"sensealg=dk\.ReverseThroughSolver\(\) is not available on "
            r"backend='scipy'\. scipy offers: dk\.ForwardMode\(\), "
            r"dk\.ContinuousAdjoint\(\), dk\.InterpolatingAdjoint\(\), "
            r"dk\.CheckpointedAdjoint\(\)\. "
            r"dk\.ReverseThroughSolver\(\) is offered by: jax, torch\.",
            id="sensealg-scipy-reverse",
        ),
        pytest.param(
            {"alg": "kvaerno5"},
            dk.UnsupportedError,
            r"alg='kvaerno5' is not available on backend='scipy'\. "
            r"scipy offers: .*'kvaerno5' is offered by: jax\.",
            id="alg-unsupported",
        ),
    ],
)
def test_invalid_solve_arguments_raise_with_message(kwargs, error, match):
    prob = dk.ODEProblem(decay, U0, (0.0, 1.0))
    kwargs = {"backend": "scipy"} | kwargs
    with pytest.raises(error, match=match):
        dk.solve(prob, **kwargs)


def test_prob_must_be_a_problem():
    with pytest.raises(dk.InvalidProblemError, match=r"prob must be a dk\.ODEProblem"):
        dk.solve(decay)  # type: ignore[arg-type]


def test_backward_saveat_must_decrease():
    prob = dk.ODEProblem(decay, U0, (1.0, 0.0))
    with pytest.raises(
        dk.InvalidProblemError, match=r"strictly decreasing \(t1 < t0\)"
    ):
        dk.solve(prob, backend="scipy", saveat=[0.2, 0.5])


def test_unsupported_alg_lists_what_backend_offers():
    with pytest.raises(dk.UnsupportedError) as info:
        dk.solve(linear_problem(), "bdf", backend="torch")
    msg = str(info.value)
    assert (
        "torch offers: euler, midpoint, heun, rk4, bosh3, dopri5, tsit5, dopri8" in msg
    )
    assert "'bdf' is offered by: scipy" in msg


# -- f at t0, on every backend ------------------------------------------------


def test_f_returning_wrong_shape_is_rejected(backend):
    prob = dk.ODEProblem(lambda u, p, t: u[:1], U0, (0.0, 1.0))
    with pytest.raises(
        dk.InvalidProblemError, match=r"returned shape \(1,\) but u0 has shape \(2,\)"
    ):
        dk.solve(prob, backend=backend)


def test_f_returning_nonfinite_at_t0_is_rejected(backend):
    prob = dk.ODEProblem(lambda u, p, t: u / (t - t), U0, (0.0, 1.0))
    with pytest.raises(
        dk.InvalidProblemError, match=r"f\(u0, p, t0\) is not finite at t0=0\.0"
    ):
        dk.solve(prob, backend=backend)


# -- failed integrations ------------------------------------------------------


def test_max_steps_raises_solve_error_with_time_and_hint(backend):
    prob = linear_problem()
    with pytest.raises(dk.SolveError) as info:
        dk.solve(prob, "dopri5", backend=backend, max_steps=3)
    msg = str(info.value)
    assert "with status 'max_steps_reached'" in msg
    assert "integration stopped at t=" in msg
    assert "of tspan=(0.0, 2.0)" in msg
    assert "the problem looks stiff" in msg
    sol = info.value.solution
    assert sol is not None
    assert not sol.success


def test_throw_false_returns_partial_solution(backend):
    prob = linear_problem()
    sol = dk.solve(
        prob, "dopri5", backend=backend, max_steps=3, throw=False,
        saveat=np.linspace(0.0, 2.0, 5),
    )  # fmt: skip
    assert not sol.success
    assert sol.status == "max_steps_reached"
    # max_steps bounds step attempts, accepted or rejected, on every backend
    assert sol.stats["naccept"] + sol.stats["nreject"] == 3
    u = np.asarray(sol.u.tolist())
    assert u.shape == (5, 2)
    np.testing.assert_allclose(u[0], prob.u0)
    assert np.isnan(u[-1]).all()


# -- backends that are not installed ------------------------------------------


def _fake_spec(module: str, requires: tuple[str, ...]) -> backends.BackendSpec:
    return backends.BackendSpec(
        "fake", module, "fake", requires, None, backends.SPECS["scipy"].capabilities
    )


def test_missing_backend_package_gives_pip_line(monkeypatch, tmp_path):
    (tmp_path / "dk_fake_backend.py").write_text("import dk_surely_missing_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(
        backends.SPECS,
        "fake",
        _fake_spec("dk_fake_backend", ("dk_surely_missing_pkg",)),
    )  # type: ignore[index]
    assert not backends.installed("fake")
    with pytest.raises(
        dk.BackendNotInstalledError,
        match=r"backend='fake' needs dk_surely_missing_pkg, which are not installed\. "
        r'Run: pip install "diffeqkit\[fake\]"',
    ):
        backends.load("fake")


def test_unrelated_import_error_in_backend_propagates(monkeypatch, tmp_path):
    # An ImportError that is not about a declared requirement is our bug: it must
    # not be disguised as "not installed".
    (tmp_path / "dk_fake_backend2.py").write_text("import dk_other_missing_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(
        backends.SPECS, "fake", _fake_spec("dk_fake_backend2", ("numpy",))
    )  # type: ignore[index]
    with pytest.raises(ImportError) as info:
        backends.load("fake")
    assert not isinstance(info.value, dk.BackendNotInstalledError)
    sys.modules.pop("dk_fake_backend2", None)


def test_uninstalled_backend_raises_not_installed_error():
    missing = [name for name in backends.SPECS if not backends.installed(name)]
    if not missing:
        pytest.skip("every backend is installed here; covered by the fake-spec test")
    name = missing[0]
    with pytest.raises(dk.BackendNotInstalledError, match=f"diffeqkit\\[{name}\\]"):
        dk.solve(linear_problem(), backend=name)


def test_mixed_framework_arrays_cannot_infer_backend():
    torch = pytest.importorskip("torch")
    jnp = pytest.importorskip("jax.numpy")
    prob = dk.ODEProblem(linear, torch.tensor([1.0, 0.0]), (0.0, 1.0), jnp.eye(2))
    with pytest.raises(dk.InvalidProblemError, match="mix arrays of jax, torch"):
        dk.solve(prob)
