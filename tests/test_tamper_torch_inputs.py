"""PyTorch's own test inputs for nn.CrossEntropyLoss, run against PowerGradLoss.

The inputs come from ``torch.testing._internal.common_modules.module_db`` (which needs the
``expecttest`` package, in the ``test`` extra). Importing that module freezes torch's global
backend flags for the whole process, so the inputs are built in a subprocess and loaded here.
At alpha 1 the loss and the gradient must equal cross-entropy's; at alpha 0.5 the loss must
equal cross-entropy's and the gradient must be cross-entropy's gradient taken at alpha * z
(see tests/test_tamper.py::tampered_oracle).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from powergrad import PowerGradLoss

pytest.importorskip(
    "expecttest", reason="torch.testing._internal needs expecttest (pip install -e '.[test]')"
)

DUMP = """
import sys, torch
from torch.testing._internal.common_modules import module_db
info = next(m for m in module_db if m.module_cls is torch.nn.CrossEntropyLoss)
cases = []
for dtype in (torch.float64, torch.float32):
    for mi in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True):
        cases.append({"desc": f"{mi.desc}-{dtype}", "args": mi.constructor_input.args,
                      "kwargs": mi.constructor_input.kwargs, "inputs": mi.forward_input.args,
                      "input_kwargs": mi.forward_input.kwargs})
torch.save(cases, sys.argv[1])
"""


@pytest.fixture(scope="module")
def torch_cases(tmp_path_factory):
    path = tmp_path_factory.mktemp("module_db") / "cases.pt"
    subprocess.run([sys.executable, "-c", DUMP, str(path)], check=True, capture_output=True)
    return torch.load(path, weights_only=False)


def identical(a, b) -> bool:
    """Bit for bit, NaN equal to NaN (a mean over no counted target is 0 / 0)."""
    return torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


def run(module, logits, target, input_kwargs):
    z = logits.detach().clone().requires_grad_(True)
    loss = module(z, target, **input_kwargs)
    loss.backward(torch.ones_like(loss))
    return loss.detach(), z.grad


def test_every_cross_entropy_module_input_passes(torch_cases):
    assert len(torch_cases) == 2 * 105  # float64 and float32: what PyTorch ships today
    failures = []
    for case in torch_cases:
        logits, target = case["inputs"]
        plain = torch.nn.CrossEntropyLoss(*case["args"], **case["kwargs"])
        want_loss, want_grad = run(plain, logits, target, case["input_kwargs"])
        for alpha in (1.0, 0.5):
            loss, grad = run(
                PowerGradLoss(alpha, *case["args"], **case["kwargs"]),
                logits,
                target,
                case["input_kwargs"],
            )
            if not identical(loss, want_loss):
                failures.append(f"{case['desc']} alpha={alpha}: loss {loss} != {want_loss}")
            if alpha == 1.0 and not identical(grad, want_grad):
                failures.append(f"{case['desc']} alpha=1: gradient differs from cross-entropy's")
            if alpha == 0.5:
                x = (logits.detach().double() * alpha).requires_grad_(True)
                kwargs = {
                    k: v.double() if torch.is_tensor(v) else v for k, v in case["kwargs"].items()
                }
                t = target.double() if target.is_floating_point() else target
                ce = F.cross_entropy(x, t, **kwargs)
                ce.backward(torch.ones_like(ce))
                # float32: module_db weights and unnormalised targets make m * p' and u ~10, which
                # cancel; 1e-5 is a few roundings at that size (float64: 1e-12).
                tol = 1e-12 if logits.dtype == torch.float64 else 1e-5
                err = (
                    (grad.double() - x.grad).abs() / (1 + x.grad.abs())
                ).max()  # relative above 1
                if not err < tol:
                    failures.append(
                        f"{case['desc']} alpha=0.5: gradient is not s * (m * p' - u): {err}"
                    )
    assert failures == [], "\n".join(failures)
