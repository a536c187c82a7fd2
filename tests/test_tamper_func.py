"""The tampered loss under torch.func: grad, per-sample gradients with vmap, and jacrev of grad.

torch.func cannot run the loss's C++ op or an autograd.Function without ``setup_context``, so
under its transforms the loss takes a Function written for them (tamper.py). What it gives must
equal what ``loss.backward()`` gives on the ordinary path (the C++ op here: switched on).
"""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jacrev, vmap

from powergrad import kernels, power_grad_cross_entropy


@pytest.fixture(autouse=True)
def cpu_op_on(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "1")  # the ordinary path below is the C++ op's


def backward_grad(z: torch.Tensor, target: torch.Tensor, **kw) -> torch.Tensor:
    z = z.clone().requires_grad_()
    power_grad_cross_entropy(z, target, **kw).backward()
    assert z.grad is not None
    return z.grad


CASES = [
    {"alpha": 0.3},
    {"alpha": 0.0},
    {"alpha": 0.5, "label_smoothing": 0.1, "reduction": "sum"},
    {"alpha": 0.25, "weight": torch.tensor([0.5, 2.0, 1.0, 1.5]), "ignore_index": 1},
]


@pytest.mark.parametrize("kw", CASES)
def test_func_grad_equals_backward(kw):
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(6, 4, generator=g) * 3, torch.tensor([0, 1, 2, 3, 1, 0])
    got = grad(lambda z: power_grad_cross_entropy(z, t, **kw))(z)
    torch.testing.assert_close(got, backward_grad(z, t, **kw))


def test_func_grad_with_target_distributions():
    g = torch.Generator().manual_seed(1)
    z, q = torch.randn(5, 4, generator=g), torch.softmax(torch.randn(5, 4, generator=g), 1)
    got = grad(lambda z: power_grad_cross_entropy(z, q, alpha=0.4, label_smoothing=0.1))(z)
    torch.testing.assert_close(got, backward_grad(z, q, alpha=0.4, label_smoothing=0.1))


def test_per_sample_gradients_with_vmap_equal_one_backward_per_row():
    g = torch.Generator().manual_seed(2)
    z, t = torch.randn(5, 4, generator=g), torch.tensor([0, 1, 2, 3, 0])

    def row_loss(zi: torch.Tensor, ti: torch.Tensor) -> torch.Tensor:
        return power_grad_cross_entropy(zi[None], ti[None], alpha=0.3)

    got = vmap(grad(row_loss))(z, t)
    rows = [backward_grad(z[i : i + 1], t[i : i + 1], alpha=0.3)[0] for i in range(5)]
    torch.testing.assert_close(got, torch.stack(rows))


def test_jacrev_of_grad_is_the_jacobian_of_the_tampered_gradient():
    """A transform over grad differentiates the tampered gradient field itself: for one row
    with target y, d/dz [softmax(alpha z) - onehot(y)] = alpha (diag(p') - p' p'^T); with
    weights and smoothing, the central differences of grad in float64."""
    z, t, alpha = torch.randn(1, 4, dtype=torch.float64), torch.tensor([2]), 0.3
    hessian = jacrev(grad(lambda z: power_grad_cross_entropy(z, t, alpha=alpha)))(z)[0, :, 0, :]
    p = torch.softmax(alpha * z[0], 0)
    torch.testing.assert_close(hessian, alpha * (torch.diag(p) - torch.outer(p, p)))

    z, t = torch.randn(3, 5, dtype=torch.float64), torch.tensor([2, 0, 1])
    w = torch.rand(5, dtype=torch.float64)

    def f(z: torch.Tensor) -> torch.Tensor:
        return power_grad_cross_entropy(z, t, alpha=0.3, weight=w, label_smoothing=0.1)

    jac, eps = jacrev(grad(f))(z), 1e-6
    for i in range(3):
        for j in range(5):
            e = torch.zeros_like(z)
            e[i, j] = eps
            torch.testing.assert_close(
                jac[:, :, i, j], (grad(f)(z + e) - grad(f)(z - e)) / (2 * eps)
            )
