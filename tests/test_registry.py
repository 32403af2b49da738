"""The registry's declarations: each backend's tables match them, and the core
checks sensealg options and alg kinds from them, once, for every backend."""

from __future__ import annotations

import dataclasses
import importlib

import numpy as np
import pytest
from conftest import need

import diffeqkit as dk
from diffeqkit import backends
from diffeqkit._algs import ALGS
from diffeqkit._sensealg import SENSEALGS

BY_NAME = {cls.name: cls for cls in SENSEALGS}


def _module(name: str):
    need(name)
    return importlib.import_module(backends.SPECS[name].module)


def test_alg_table_matches_declaration(backend):
    assert set(_module(backend).ALGS) == set(backends.SPECS[backend].capabilities.algs)


def test_sensealg_table_matches_declaration(backend):
    table = _module(backend).SENSEALGS
    declared = backends.SPECS[backend].capabilities.sensealgs
    assert {cls.name for cls in table} == set(declared)


@pytest.mark.parametrize("name", list(backends.SPECS))
def test_declared_options_are_fields_of_the_sensealg(name):
    for sensealg, support in backends.SPECS[name].capabilities.sensealgs.items():
        fields = {f.name for f in dataclasses.fields(BY_NAME[sensealg])}
        assert set(support.options) <= fields - {"autodiff"}, sensealg
        assert support.computes in ("discrete", "continuous")


def _prob():
    return dk.ODEProblem(lambda u, p, t: -p * u, np.array([1.0]), (0.0, 1.0), 2.0)


def _ineffective_cases():
    """Every (backend, sensealg with one option set) whose option has no effect
    there, with the backends where it does."""
    cases = []
    for name, spec in backends.SPECS.items():
        caps = spec.capabilities
        for sensealg, support in caps.sensealgs.items():
            cls = BY_NAME[sensealg]
            for field in dataclasses.fields(cls):
                value = {"checkpoints": 4, "autodiff": "jac"}.get(field.name, 1e-6)
                if field.name == "autodiff":
                    for engine in ("jax", "torch", "jac"):
                        if engine not in caps.autodiff:
                            cases.append((name, cls(autodiff=engine), "autodiff"))
                elif field.name not in support.options:
                    cases.append((name, cls(**{field.name: value}), field.name))
    return [
        pytest.param(n, s, o, id=f"{n}-{type(s).__name__}-{o}") for n, s, o in cases
    ]


@pytest.mark.parametrize(("name", "sensealg", "option"), _ineffective_cases())
def test_option_without_effect_is_refused_by_name(name, sensealg, option):
    # Refused in the core, before the backend loads: no backend needs installing.
    with pytest.raises(
        dk.InvalidProblemError, match=rf"\({option}=.*no effect on backend='{name}'"
    ):
        dk.solve(_prob(), "tsit5", backend=name, sensealg=sensealg)


def test_refusal_names_where_the_option_works():
    with pytest.raises(dk.InvalidProblemError, match="It takes effect on: scipy"):
        dk.solve(_prob(), backend="jax", sensealg=dk.CheckpointedAdjoint(rtol=1e-8))


def _kind_cases():
    return [
        pytest.param(name, sensealg, alg, id=f"{name}-{sensealg}-{alg}")
        for name, spec in backends.SPECS.items()
        for sensealg, support in spec.capabilities.sensealgs.items()
        for alg in spec.capabilities.algs
        if ALGS[alg].kind not in support.kinds
    ]


@pytest.mark.parametrize(("name", "sensealg", "alg"), _kind_cases())
def test_sensealg_refuses_alg_kinds_it_cannot_run(name, sensealg, alg):
    extra = {"dt0": 0.1} if ALGS[alg].fixed_step else {}
    with pytest.raises(dk.UnsupportedError, match=rf"cannot differentiate alg='{alg}'"):
        dk.solve(_prob(), alg, backend=name, sensealg=BY_NAME[sensealg](), **extra)


@pytest.mark.parametrize("name", list(backends.SPECS))
def test_backsolve_with_implicit_alg_names_the_interpolating_adjoint(name):
    alg = backends.implicit_algs(name)[0]
    with pytest.raises(dk.UnsupportedError, match=r"dk\.InterpolatingAdjoint\(\)"):
        dk.vjp(_prob(), alg, backend=name, sensealg=dk.ContinuousAdjoint())


@pytest.mark.parametrize("name", list(backends.SPECS))
def test_default_rule_reads_the_declared_crossover(name):
    limit = backends.SPECS[name].capabilities.forward_mode_max_inputs
    few = np.zeros(max(limit, 1))
    many = np.zeros(limit + 1)
    if limit:
        assert isinstance(dk.default_sensealg(name, few, None), dk.ForwardMode)
    assert isinstance(dk.default_sensealg(name, many, None), dk.CheckpointedAdjoint)


def test_support_matrix_says_what_each_sensealg_computes():
    matrix = dk.support_matrix(installed_only=False)
    for name, spec in backends.SPECS.items():
        gradients = matrix[name]["gradients"]
        assert set(gradients) == set(spec.capabilities.sensealgs)
    # ForwardMode differentiates the solver on JAX and torch, and integrates the
    # forward sensitivity equations on SciPy.
    assert matrix["jax"]["gradients"]["ForwardMode"] == "discrete"
    assert matrix["torch"]["gradients"]["ForwardMode"] == "discrete"
    assert matrix["scipy"]["gradients"]["ForwardMode"] == "continuous"


def test_readme_support_table_is_the_generated_one():
    from pathlib import Path

    from diffeqkit._info import support_table

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("<!-- support-table:start -->\n")[1].split(
        "\n<!-- support-table:end -->"
    )[0]
    assert block == support_table(), (
        "README.md's support table is stale: replace it with the output of "
        'python -c "from diffeqkit._info import support_table as s; print(s())"'
    )


@pytest.mark.parametrize("name", list(backends.SPECS))
@pytest.mark.parametrize(
    "sensealg",
    [dk.ContinuousAdjoint(rtol=1e-8), dk.InterpolatingAdjoint(atol=1e-9)],
    ids=["continuous", "interpolating"],
)
def test_backward_tolerances_are_refused_with_constant_steps(name, sensealg):
    with pytest.raises(dk.InvalidProblemError, match="no effect with constant steps"):
        dk.solve(_prob(), "rk4", backend=name, dt0=0.1, sensealg=sensealg)
    with pytest.raises(dk.InvalidProblemError, match="no effect with constant steps"):
        dk.solve(
            _prob(), "tsit5", backend=name, adaptive=False, dt0=0.1, sensealg=sensealg
        )


def test_events_table_follows_the_registry(monkeypatch):
    from dataclasses import replace

    from diffeqkit._info import events_table

    spec = backends.SPECS["scipy"]
    caps = replace(spec.capabilities, events=("ForwardMode",))
    specs = dict(backends.SPECS, scipy=replace(spec, capabilities=caps))
    monkeypatch.setattr(backends, "SPECS", specs)
    lines = events_table().splitlines()
    column = list(specs).index("scipy") + 1
    cells = {
        line.split("|")[1].strip(): line.split("|")[column + 1].strip()
        for line in lines[2:]
    }
    assert cells["solve with events"] == "yes"
    assert cells["`ForwardMode`"] == "yes"
    assert cells["`ContinuousAdjoint`"] == "`UnsupportedError`"
    assert dk.support_matrix(installed_only=False)["scipy"]["events"] == ["ForwardMode"]
