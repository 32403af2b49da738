"""dk.array_namespace is array-api-compat's, answered from a per-type cache."""

from __future__ import annotations

import array_api_compat as aac
import numpy as np
import pytest

import diffeqkit as dk


def _arrays():
    out = [pytest.param(np.ones(3), id="numpy")]
    try:
        import torch

        out.append(pytest.param(torch.ones(3), id="torch"))
    except ImportError:
        pass
    try:
        import jax.numpy as jnp

        out.append(pytest.param(jnp.ones(3), id="jax"))
    except ImportError:
        pass
    return out


@pytest.mark.parametrize("x", _arrays())
def test_array_namespace_matches_array_api_compat(x):
    assert dk.array_namespace(x) is aac.array_namespace(x)
    assert dk.array_namespace(x) is dk.array_namespace(x)  # cached, same object
    assert dk.array_namespace(x, x) is aac.array_namespace(x, x)


def test_array_namespace_rejects_python_scalars_like_array_api_compat():
    with pytest.raises(TypeError):
        dk.array_namespace(1.0)
