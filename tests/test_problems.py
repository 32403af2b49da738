"""The built-in problem collection: every problem solves on every backend, the
backends agree with the data's noise-free truth, and bad options are refused."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import backend_params, need

import diffeqkit as dk
from diffeqkit import problems

# The problems for gradient comparisons (the stiff ones have tests/test_stiff.py).
NONSTIFF = [
    "lotka_volterra",
    "cubic_spiral",
    "lorenz",
    "pk_two_compartment",
    "neural_ode",
]
STIFF = ["rober", "van_der_pol", "hires", "brusselator"]


def test_names_lists_every_builder():
    assert sorted(problems.names()) == sorted(NONSTIFF + STIFF)


@pytest.mark.parametrize("name", NONSTIFF)
def test_get_builds_problem_with_data_of_saveat_shape(name):
    need("scipy")
    bp = problems.get(name)
    assert bp.name == name
    assert not bp.stiff
    assert bp.data is not None
    assert bp.data.shape == (len(bp.saveat), *np.shape(bp.prob.u0))
    assert np.all(np.isfinite(bp.data))


@pytest.mark.parametrize("name", NONSTIFF)
def test_data_noise_is_seeded_and_scaled_by_noise(name):
    need("scipy")
    clean = problems.get(name, noise=0.0, seed=3).data  # neural_ode: same weights
    a = problems.get(name, noise=0.1, seed=3).data
    b = problems.get(name, noise=0.1, seed=3).data
    c = problems.get(name, noise=0.1, seed=4).data
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Noise of standard deviation 0.1 x each component's RMS: scaled back, it is
    # standard normal x 0.1. With at least 33 draws (pk: 11 saves x 3 states) the
    # sample standard deviation lies in [0.05, 0.15] except with probability far
    # below 1e-6; a missing or unscaled noise term lands outside.
    rms = np.sqrt(np.mean(clean**2, axis=0))
    ratio = np.std((a - clean) / rms)
    assert 0.05 < ratio < 0.15


@pytest.mark.parametrize("name", NONSTIFF)
@pytest.mark.parametrize("backend", backend_params())
def test_problem_solves_on_backend_and_matches_truth(backend, name):
    need(backend)
    bp = problems.get(name, noise=0.0)  # data = dopri8 at 1e-12 on SciPy (or torch)
    sol = dk.solve(
        bp.prob, "tsit5", backend=backend, saveat=bp.saveat, rtol=1e-8, atol=1e-10
    )
    u = dk._arrays.to_numpy(sol.u)
    assert u.shape == bp.data.shape
    # tsit5 at rtol 1e-8 against dopri8 at 1e-12: global errors of a few 1e-8
    # relative to each component's size over these spans (Lorenz on [0, 1]
    # amplifies by e^0.9); 1e-6 leaves margin, while a backend that reads p or
    # u0 differently (a wrong index, float32) is off by more than 1e-4.
    scale = np.max(np.abs(bp.data), axis=0)
    np.testing.assert_allclose(u / scale, bp.data / scale, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("width", "depth", "dim"), [(1, 1, 1), (16, 1, 2), (16, 2, 2), (8, 3, 5)]
)
def test_neural_ode_parameter_count_matches_formula(width, depth, dim):
    need("scipy")
    bp = problems.neural_ode(width=width, depth=depth, dim=dim)
    count = sum(v.size for v in bp.prob.p.values())
    # weights dim*w + w*dim, biases w + dim, and (depth - 1) hidden w x w layers.
    expected = 2 * dim * width + width + dim + (depth - 1) * (width * width + width)
    assert count == expected == problems.neural_ode_size(width, depth, dim)
    assert set(bp.prob.p) == {f"{k}{i}" for k in "Wb" for i in range(depth + 1)}
    assert str(expected) in bp.description


def test_neural_ode_same_seed_same_weights_other_seed_other_weights():
    need("scipy")
    a, b, c = (problems.neural_ode(seed=s) for s in (0, 0, 1))
    np.testing.assert_array_equal(a.prob.p["W1"], b.prob.p["W1"])
    assert not np.array_equal(a.prob.p["W1"], c.prob.p["W1"])


def test_cubic_spiral_is_the_neural_ode_demo_problem():
    need("scipy")
    bp = problems.cubic_spiral()
    np.testing.assert_array_equal(bp.prob.p, [[-0.1, 2.0], [-2.0, -0.1]])
    np.testing.assert_array_equal(bp.prob.u0, [2.0, 0.0])
    assert bp.prob.tspan == (0.0, 25.0)
    # Noise-free by default, as in the demos: data is the solution itself.
    np.testing.assert_array_equal(bp.data[0], [2.0, 0.0])


def test_pk_model_conserves_drug_without_elimination():
    need("scipy")
    # With k10 = 0 nothing leaves: gut + V C + peripheral stays at the dose.
    bp = problems.pk_two_compartment(p=(1.0, 0.0, 0.3, 0.15, 10.0), noise=0.0)
    gut, conc, periph = bp.data.T
    # dopri8 at rtol 1e-12 conserves the total to ~1e-10 relative.
    np.testing.assert_allclose(gut + 10.0 * conc + periph, 100.0, rtol=1e-9)


@pytest.mark.parametrize(
    ("builder", "kwargs", "match"),
    [
        (problems.neural_ode, {"width": 0}, r"width must be an int >= 1; got width=0"),
        (problems.neural_ode, {"depth": 1.5}, r"depth must be an int >= 1"),
        (problems.neural_ode, {"dim": True}, r"dim must be an int >= 1"),
        (problems.neural_ode, {"seed": -1}, r"seed must be an int >= 0"),
        (problems.lotka_volterra, {"p": (1.0, 2.0)}, r"p must be 4 finite numbers"),
        (problems.lotka_volterra, {"u0": (1.0, -1.0)}, r"u0 must have positive"),
        (problems.lotka_volterra, {"t1": 0.0}, r"t1 must be a positive"),
        (problems.lotka_volterra, {"n_saves": 1}, r"n_saves must be an int >= 2"),
        (problems.lorenz, {"noise": -0.1}, r"noise must be a finite number >= 0"),
        (problems.cubic_spiral, {"noise": float("nan")}, r"noise must be a finite"),
        (problems.pk_two_compartment, {"dose": -5.0}, r"dose must be a positive"),
        (problems.pk_two_compartment, {"saveat": [2.0, 1.0]}, r"saveat must be inc"),
        (problems.pk_two_compartment, {"saveat": [1.0, 48.0]}, r"in \[0, 24\]"),
    ],
)
def test_bad_builder_option_raises_naming_it(builder, kwargs, match):
    with pytest.raises(dk.InvalidProblemError, match=match):
        builder(**kwargs)


@pytest.mark.parametrize("n", [16, 64])
def test_brusselator_is_the_same_on_every_backend(backend, n):
    """Its right-hand side (shifts built with concat) runs on each backend and
    agrees with SciPy's solve; its stiffness grows with n."""
    need(backend)
    bp = problems.brusselator(n)
    assert bp.prob.u0.shape == (2 * n,)
    # At rtol=1e-6 the global errors measured 1e-6 to 3e-5, and 1.1e-4 for the
    # order-2 rosenbrock23, whose errors add up over its steps.
    alg, allowed = {
        "jax": ("kvaerno5", 1e-4),
        "torch": ("rosenbrock23", 1e-3),
        "scipy": ("bdf", 1e-4),
    }[backend]
    sol = dk.solve(bp.prob, alg, backend=backend, saveat=bp.saveat, rtol=1e-6)
    ref = dk.solve(bp.prob, "radau", saveat=bp.saveat, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.asarray(sol.u), np.asarray(ref.u), rtol=allowed)


def test_brusselator_refuses_too_few_points():
    with pytest.raises(dk.InvalidProblemError, match="n must be an int >= 2"):
        problems.brusselator(1)


def test_get_unknown_name_lists_the_names():
    with pytest.raises(dk.InvalidProblemError, match=r"no built-in problem.*lorenz"):
        problems.get("lorentz")
