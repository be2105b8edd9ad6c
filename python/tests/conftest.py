"""Shared fixtures: the plugin registry (LORA_AGG_PLUGIN_PATH, else the build folder)."""

import numpy as np
import pytest

import lora_agg


@pytest.fixture(scope="session")
def registry():
    return lora_agg.discover()


@pytest.fixture
def rng():
    return np.random.default_rng(20261127)


def random_client(rng, d_out, d_in, rank, samples, scaling=1.0, client_id=None, a=None):
    """A client with random factors (float32), as the Swift tests' randomClient."""
    a = rng.standard_normal((rank, d_in)).astype(np.float32) if a is None else a
    b = rng.standard_normal((d_out, rank)).astype(np.float32)
    return lora_agg.ClientFactors(a=a, b=b, samples=samples, scaling=scaling, client_id=client_id)


def ideal_update(clients):
    """Σ p_k s_k B_k A_k in float64, from the formula (independent of any plugin)."""
    total = sum(c.samples for c in clients)
    return sum((c.samples / total) * c.scaling * (c.b.astype(np.float64) @ c.a.astype(np.float64)) for c in clients)


def relative_error(x, y):
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-300))


def real_strategies(registry):
    """Every loaded strategy except the templates."""
    return [p for p in registry if not p.name.startswith("template-")]
