import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from mergekit_fw.solve.simplex import (
    InfeasibleError,
    check_feasible,
    project_to_simplex,
)


def brute_force_projection(v: np.ndarray) -> np.ndarray:
    k = len(v)
    result = minimize(
        lambda x: 0.5 * np.sum((x - v) ** 2),
        np.full(k, 1.0 / k),
        jac=lambda x: x - v,
        bounds=[(0, None)] * k,
        constraints=[{"type": "eq", "fun": lambda x: x.sum() - 1, "jac": lambda x: np.ones(k)}],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    return result.x


@pytest.mark.parametrize("seed", range(20))
def test_projection_matches_qp(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 9))
    v = rng.normal(scale=float(rng.choice([0.1, 1.0, 5.0])), size=k)
    if seed % 4 == 0:
        v[1] = v[0]  # ties
    got = project_to_simplex(torch.tensor(v)).numpy()
    np.testing.assert_allclose(got, brute_force_projection(v), atol=1e-6)


def test_projection_is_idempotent_and_keeps_feasible_points():
    feasible = torch.tensor([0.2, 0.0, 0.5, 0.3], dtype=torch.float64)
    torch.testing.assert_close(project_to_simplex(feasible), feasible)
    x = project_to_simplex(torch.randn(6, 5, dtype=torch.float64), dim=0)
    check_feasible(x)
    torch.testing.assert_close(project_to_simplex(x, dim=0), x)


def test_check_feasible_rejects_bad_columns():
    with pytest.raises(InfeasibleError):
        check_feasible(torch.tensor([[1.1], [-0.1]], dtype=torch.float64))
    with pytest.raises(InfeasibleError):
        check_feasible(torch.tensor([[0.5], [0.4]], dtype=torch.float64))
