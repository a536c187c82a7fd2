"""The tampered loss against a float64 formula, and the reference hook's documented flaw."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from powergrad import PowerGradLoss, kernels, power_grad_cross_entropy
from powergrad.reference import official_hook_cross_entropy


@pytest.fixture(autouse=True, params=["cpu_kernel", "pytorch_ops"])
def backward_path(request, monkeypatch):
    """Every test here runs through both backwards: the fused CPU kernel (kernels.py) and
    PyTorch's ops (what GPUs, class weights and (N, C, d...) input run)."""
    monkeypatch.setenv(kernels.ENV_SWITCH, "1" if request.param == "cpu_kernel" else "0")


def exact_direction(z: torch.Tensor, target: torch.Tensor, alpha: float, ls: float) -> torch.Tensor:
    """p' - q in float64, straight from the definition p' = p**alpha / sum(p**alpha)."""
    z = z.double()
    c = z.shape[1]
    logp = torch.log_softmax(z, 1)
    pa = torch.exp(alpha * logp)  # p**alpha without underflowing p first
    p_prime = pa / pa.sum(1, keepdim=True)
    q = target.double() if target.is_floating_point() else F.one_hot(target, c).double()
    q = q * (1 - ls) + ls / c
    return p_prime - q


def make(n: int, c: int, scale: float, seed: int = 0, soft: bool = False):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * scale
    if soft:
        t = torch.softmax(torch.randn(n, c, generator=g) * 3, 1)
    else:
        t = torch.randint(0, c, (n,), generator=g)
    return z, t


GRID = list(itertools.product([1, 7, 256], [2, 10, 1000], [0.0, 0.05, 0.25, 0.3, 1.0], [0.0, 0.1]))


@pytest.mark.parametrize("n,c,alpha,ls", GRID)
@pytest.mark.parametrize("loss_scale", [1.0, 2.0**16, 2.0**17])
def test_gradient_matches_float64_formula(n, c, alpha, ls, loss_scale):
    z, t = make(n, c, scale=5.0, seed=n * c)
    z.requires_grad_(True)
    loss = power_grad_cross_entropy(z, t, alpha=alpha, label_smoothing=ls)
    (loss * loss_scale).backward()
    # In units of (p' - q): undo the mean's 1/N and the loss scale.
    got = z.grad.double() * n / loss_scale
    err = (got - exact_direction(z.detach(), t, alpha, ls)).abs().max().item()
    assert err < 1e-5


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.3, 1.0])
def test_huge_logits_stay_exact(alpha):
    z, t = make(64, 100, scale=1e4)
    z.requires_grad_(True)
    power_grad_cross_entropy(z, t, alpha=alpha, label_smoothing=0.1).backward()
    got = z.grad.double() * 64
    assert torch.isfinite(got).all()
    assert (got - exact_direction(z.detach(), t, alpha, 0.1)).abs().max() < 1e-5


@pytest.mark.parametrize("alpha", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_soft_targets(alpha, ls):
    z, t = make(32, 10, scale=3.0, soft=True)
    z.requires_grad_(True)
    loss = power_grad_cross_entropy(z, t, alpha=alpha, label_smoothing=ls)
    assert torch.equal(loss.detach(), F.cross_entropy(z.detach(), t, label_smoothing=ls))
    loss.backward()
    assert (z.grad.double() * 32 - exact_direction(z.detach(), t, alpha, ls)).abs().max() < 1e-5


@pytest.mark.parametrize("alpha", [0.05, 0.3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits(alpha, dtype):
    z, t = make(128, 100, scale=4.0)
    zl = z.to(dtype).requires_grad_(True)
    loss = power_grad_cross_entropy(zl, t, alpha=alpha, label_smoothing=0.1)
    assert loss.dtype == torch.float32
    (loss * 2.0**16).backward()
    assert zl.grad.dtype == dtype
    got = zl.grad.double() * 128 / 2.0**16
    assert (got - exact_direction(zl.detach(), t, alpha, 0.1)).abs().max() < 1e-2


def test_bf16_autocast_through_a_linear_layer():
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 50)
    x = torch.randn(64, 32)
    t = torch.randint(0, 50, (64,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)
        z.retain_grad()
        loss = power_grad_cross_entropy(z, t, alpha=0.25)
    assert z.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    got = z.grad.double() * 64
    assert (got - exact_direction(z.detach(), t, 0.25, 0.0)).abs().max() < 1e-2


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_value_is_cross_entropy(ls, reduction):
    z, t = make(50, 20, scale=6.0)
    for alpha in (0.0, 0.3, 1.0):
        got = power_grad_cross_entropy(z, t, alpha=alpha, label_smoothing=ls, reduction=reduction)
        want = F.cross_entropy(z, t, label_smoothing=ls, reduction=reduction)
        assert torch.equal(got, want)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_reductions_scale_the_gradient(reduction):
    z, t = make(16, 10, scale=2.0)
    z.requires_grad_(True)
    w = torch.rand(16)
    loss = power_grad_cross_entropy(z, t, alpha=0.3, reduction=reduction)
    (loss * w if reduction == "none" else loss).sum().backward()
    factor = w.double().unsqueeze(1) if reduction == "none" else 1.0
    assert (z.grad.double() - factor * exact_direction(z.detach(), t, 0.3, 0)).abs().max() < 1e-6


def test_alpha_one_equals_cross_entropy_gradient():
    z, t = make(33, 12, scale=3.0)
    a = z.clone().requires_grad_(True)
    b = z.clone().requires_grad_(True)
    power_grad_cross_entropy(a, t, alpha=1.0, label_smoothing=0.1).backward()
    F.cross_entropy(b, t, label_smoothing=0.1).backward()
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def test_alpha_zero_gives_uniform_minus_q():
    z, t = make(8, 5, scale=10.0)
    z.requires_grad_(True)
    power_grad_cross_entropy(z, t, alpha=0.0).backward()
    want = 1 / 5 - F.one_hot(t, 5).double()
    assert (z.grad.double() * 8 - want).abs().max() < 1e-6


def test_ignore_index_and_spatial_logits():
    z = torch.randn(4, 6, 3, 3, requires_grad=True)
    t = torch.randint(0, 6, (4, 3, 3))
    t[0, 0, 0] = -100
    loss = power_grad_cross_entropy(z, t, alpha=0.5)
    assert torch.allclose(loss, F.cross_entropy(z, t))
    loss.backward()
    assert z.grad[0, :, 0, 0].abs().max() == 0
    count = (t != -100).sum().item()
    rows = z.detach().movedim(1, -1).reshape(-1, 6)
    flat_t = t.reshape(-1)
    keep = flat_t != -100
    want = exact_direction(rows[keep], flat_t[keep], 0.5, 0.0) / count
    got = z.grad.movedim(1, -1).reshape(-1, 6)[keep].double()
    assert (got - want).abs().max() < 1e-7


def test_gradient_accumulation_matches_one_big_batch():
    z, t = make(64, 10, scale=3.0)
    full = z.clone().requires_grad_(True)
    power_grad_cross_entropy(full, t, alpha=0.25).backward()
    parts = z.clone().requires_grad_(True)
    for sl in (slice(0, 32), slice(32, 64)):
        (power_grad_cross_entropy(parts[sl], t[sl], alpha=0.25) / 2).backward()
    assert torch.allclose(full.grad, parts.grad, atol=1e-8)


def test_module_tampers_whenever_a_gradient_is_taken_in_either_mode():
    """Not the module's mode: a module left in eval() (Lightning 2.6 does not call train() when
    fit starts) still trains tampered; without a gradient it is F.cross_entropy itself."""
    z, t = make(16, 10, scale=3.0)
    want = exact_direction(z, t, 0.1, 0.1)
    loss_fn = PowerGradLoss(alpha=0.1, label_smoothing=0.1)
    plain = z.clone().requires_grad_(True)
    F.cross_entropy(plain, t, label_smoothing=0.1).backward()
    for mode in (loss_fn.train, loss_fn.eval):
        mode()
        a = z.clone().requires_grad_(True)
        loss_fn(a, t).backward()
        assert (a.grad.double() * 16 - want).abs().max() < 1e-6
        assert (a.grad - plain.grad).abs().max() > 1e-3
        with torch.no_grad():
            assert torch.equal(loss_fn(z, t), F.cross_entropy(z, t, label_smoothing=0.1))
    assert "alpha=0.1" in repr(loss_fn)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "x"])
def test_bad_alpha_raises_naming_the_value(bad):
    z, t = make(4, 3, scale=1.0)
    with pytest.raises(ValueError, match="alpha"):
        power_grad_cross_entropy(z, t, alpha=bad)
    with pytest.raises(ValueError, match=str(bad) if bad == bad else "nan"):
        PowerGradLoss(alpha=bad)


def test_alpha_above_one_sharpens():
    z, t = make(16, 10, scale=2.0)
    z.requires_grad_(True)
    power_grad_cross_entropy(z, t, alpha=2.0).backward()
    assert (z.grad.double() * 16 - exact_direction(z.detach(), t, 2.0, 0)).abs().max() < 1e-6


def test_torch_compile_smoke():
    z, t = make(32, 10, scale=2.0)
    model = torch.nn.Linear(10, 10)
    torch.manual_seed(0)
    x = torch.randn(32, 10)

    def step(x, t):
        return power_grad_cross_entropy(model(x), t, alpha=0.3)

    compiled = torch.compile(step, backend="eager")  # the graph capture; no C++ toolchain needed
    loss = compiled(x, t)
    loss.backward()
    g_compiled = model.weight.grad.clone()
    model.zero_grad()
    step(x, t).backward()
    assert torch.allclose(g_compiled, model.weight.grad, atol=1e-6)


@pytest.mark.parametrize(
    "loss_scale,ok", [(1.0, False), (256.0**2, True), (2 * 256.0**2, False), (2.0**17, False)]
)
def test_reference_hook_is_right_only_at_loss_scale_n_squared(loss_scale, ok):
    """Pins down the official code's flaw: its recovery of p assumes a loss scale of N**2."""
    n, c, alpha, ls = 256, 1000, 0.3, 0.1
    z, t = make(n, c, scale=2.0)
    z.requires_grad_(True)
    (official_hook_cross_entropy(z, t, alpha, ls) * loss_scale).backward()
    got = z.grad.double() / loss_scale * n
    err = (got - exact_direction(z.detach(), t, alpha, ls)).abs().max().item()
    if ok:
        assert err < 1e-5
    else:
        assert math.isnan(err) or err > 1e-2


# --- class weights, label smoothing, ignore_index, unbatched input (a drop-in for nn.CrossEntropyLoss)


def tampered_oracle(z, target, alpha, grad_out=None, **kwargs):
    """The tampered gradient in float64 from PyTorch's own cross-entropy backward, taken at alpha * z.

    Cross-entropy's gradient on its input x is s * (m * softmax(x) - u), where s, m and u depend on
    the targets, weights and reduction but not on x (module docstring of powergrad.tamper); at
    x = alpha * z it is therefore s * (m * softmax(alpha * z) - u), the tampered gradient.
    """
    x = (z.detach().double() * alpha).requires_grad_(True)
    t = target.double() if target.is_floating_point() else target
    if kwargs.get("weight") is not None:
        kwargs["weight"] = kwargs["weight"].double()
    loss = F.cross_entropy(x, t, **kwargs)
    loss.backward(grad_out.double() if grad_out is not None else None)
    return x.grad


def hand_formula(z, target, alpha, weight, ls, ignore_index):
    """s * (m * p' - u) written out for (N, C) logits, class indices and mean reduction."""
    n, c = z.shape
    p = torch.softmax(alpha * z.double(), 1)
    w = weight.double()
    valid = (target != ignore_index).double()
    safe = target.clamp_min(0) * (target != ignore_index)
    w_y = w[safe] * valid
    u = ((1 - ls) * w_y.unsqueeze(1) * F.one_hot(safe, c).double() + ls / c * w) * valid.unsqueeze(
        1
    )
    m = u.sum(1, keepdim=True)
    return (m * p - u) / w_y.sum()


def make_case(kind, n=12, c=5, seed=0, ignore=True):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, c, generator=g) * 3
    if kind == "soft":
        return z, torch.softmax(torch.randn(n, c, generator=g) * 2, 1)
    t = torch.randint(0, c, (n,), generator=g)
    if ignore:
        t[::4] = 3  # ignore_index=3 below: a real class, so it must not be confused with padding
    return z, t


@pytest.mark.parametrize("kind", ["index", "soft"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ls", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 2.0])
def test_weights_smoothing_ignore_index_against_float64(kind, reduction, ls, weighted, alpha):
    z, t = make_case(kind)
    weight = torch.rand(5, generator=torch.Generator().manual_seed(1)) + 0.1 if weighted else None
    kwargs = dict(label_smoothing=ls, reduction=reduction, weight=weight)
    if kind == "index":
        kwargs["ignore_index"] = 3
    grad_out = torch.rand(12) if reduction == "none" else None
    a = z.clone().requires_grad_(True)
    loss = power_grad_cross_entropy(a, t, alpha, **kwargs)
    assert torch.equal(loss.detach(), F.cross_entropy(z, t, **kwargs))
    loss.backward(grad_out)
    want = tampered_oracle(z, t, alpha, grad_out, **kwargs)
    assert (a.grad.double() - want).abs().max() < 1e-6


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_weighted_gradient_is_the_derived_formula(alpha, ls):
    z, t = make_case("index", n=16, c=6, seed=3)
    weight = torch.tensor([0.2, 1.0, 3.0, 0.5, 1.5, 0.7])
    a = z.clone().requires_grad_(True)
    power_grad_cross_entropy(a, t, alpha, ls, ignore_index=3, weight=weight).backward()
    assert (a.grad.double() - hand_formula(z, t, alpha, weight, ls, 3)).abs().max() < 1e-6


def test_weights_on_spatial_logits_and_the_module_buffer():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(3, 4, 5, 2, generator=g)
    t = torch.randint(0, 4, (3, 5, 2), generator=g)
    t[0, 0, 0] = -100
    weight = torch.tensor([0.5, 2.0, 1.0, 0.1])
    loss_fn = PowerGradLoss(alpha=0.4, label_smoothing=0.1, weight=weight)
    assert "weight" in dict(loss_fn.named_buffers())
    a = z.clone().requires_grad_(True)
    loss = loss_fn(a, t)
    assert torch.equal(loss.detach(), F.cross_entropy(z, t, weight=weight, label_smoothing=0.1))
    loss.backward()
    want = tampered_oracle(z, t, 0.4, weight=weight, label_smoothing=0.1)
    assert (a.grad.double() - want).abs().max() < 1e-7


def test_every_target_ignored_gives_zero_gradient_like_cross_entropy():
    z = torch.randn(4, 3, requires_grad=True)
    t = torch.full((4,), -100)
    loss = power_grad_cross_entropy(z, t, alpha=0.5, weight=torch.rand(3))
    assert loss.isnan()  # PyTorch's value: 0 / 0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros(4, 3))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("soft", [False, True])
def test_unbatched_logits(reduction, soft):
    g = torch.Generator().manual_seed(0)
    z = torch.randn(7, generator=g) * 2
    t = torch.softmax(torch.randn(7, generator=g), 0) if soft else torch.tensor(4)
    weight = torch.rand(7, generator=g) + 0.5
    for loss_fn in (
        PowerGradLoss(0.3, 0.1, reduction, weight=weight),
        lambda x, y: power_grad_cross_entropy(x, y, 0.3, 0.1, reduction, weight=weight),
    ):
        a = z.clone().requires_grad_(True)
        loss = loss_fn(a, t)
        want_loss = F.cross_entropy(z, t, weight=weight, label_smoothing=0.1, reduction=reduction)
        assert loss.shape == () and torch.equal(loss.detach(), want_loss)
        loss.backward()
        want = tampered_oracle(
            z.unsqueeze(0),
            t.unsqueeze(0) if soft else t.reshape(1),
            0.3,
            weight=weight,
            label_smoothing=0.1,
            reduction=reduction,
        )
        assert a.grad.shape == (7,) and (a.grad.double() - want[0]).abs().max() < 1e-7


class HostReads(TorchDispatchMode):
    """Records every op that copies a value from the device to the host (or sizes a tensor by its data)."""

    READS = (
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.nonzero.default,
        torch.ops.aten.masked_select.default,
    )

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.READS:
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("soft", [False, True])
def test_no_host_reads(ls, weighted, soft):
    """A GPU stalls on each host read; bool(mask.all()) in the backward used to be one."""
    z, t = make_case("soft" if soft else "index")
    kwargs = dict(label_smoothing=ls, weight=torch.rand(5) if weighted else None)
    if not soft:
        kwargs["ignore_index"] = 3
    with HostReads() as mode:
        power_grad_cross_entropy(z.clone().requires_grad_(True), t, 0.3, **kwargs).backward()
    assert mode.ops == []


SHAPES = [(5,), (6, 5), (4, 5, 3), (2, 5, 3, 2)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_forward_is_cross_entropy_to_the_last_bit_on_every_branch(
    shape, soft, ls, weighted, reduction
):
    """The forward rebuilds F.cross_entropy from its own log-softmax (to reuse that buffer in the
    backward): plain, label-smoothing and probability-target branches, any rank."""
    g = torch.Generator().manual_seed(len(shape))
    z = torch.randn(*shape, generator=g) * 4
    if soft:
        t = torch.softmax(torch.randn(*shape, generator=g), 1 if len(shape) > 1 else 0)
        kwargs = {}
    else:
        t = torch.randint(0, 5, shape[:1] + shape[2:] if len(shape) > 1 else (), generator=g)
        if len(shape) > 1:
            t.view(-1)[::3] = 2  # some rows ignored
        kwargs = {"ignore_index": 2}
    kwargs.update(label_smoothing=ls, reduction=reduction)
    weight = torch.rand(5, generator=g) + 0.1 if weighted else None
    loss = power_grad_cross_entropy(z.clone().requires_grad_(True), t, 0.4, weight=weight, **kwargs)
    assert torch.equal(loss.detach(), F.cross_entropy(z, t, weight=weight, **kwargs))


def test_backward_twice_through_a_retained_graph():
    """The backward writes over its saved log-softmax; a second pass recomputes it."""
    z, t = make(8, 6, scale=3.0)
    z.requires_grad_(True)
    loss = power_grad_cross_entropy(z, t, alpha=0.3, label_smoothing=0.1)
    loss.backward(retain_graph=True)
    once = z.grad.clone()
    loss.backward()
    assert torch.allclose(z.grad, 2 * once, rtol=0, atol=1e-7)
    assert (once.double() * 8 - exact_direction(z.detach(), t, 0.3, 0.1)).abs().max() < 1e-6


@pytest.mark.parametrize("c", [3, 40, 1000])
def test_alpha_zero_is_uniform_over_the_classes_not_masked(c):
    """alpha = 0 is the limit alpha -> 0+: a class masked with -inf stays at 0 (not NaN)."""
    z = torch.randn(6, c, generator=torch.Generator().manual_seed(c))
    z[:, 1] = -math.inf
    z[2, 2:] = -math.inf  # row 2: only class 0 is left
    t = torch.zeros(6, dtype=torch.long)
    z.requires_grad_(True)
    power_grad_cross_entropy(z, t, alpha=0.0).backward()
    finite = torch.isfinite(z.detach()).double()
    uniform = finite / finite.sum(1, keepdim=True)
    expected = (uniform - F.one_hot(t, c).double()) / 6
    torch.testing.assert_close(z.grad.double(), expected, rtol=1e-6, atol=1e-7)


def test_a_second_derivative_is_refused_not_silently_wrong():
    z = torch.randn(4, 5, requires_grad=True)
    loss = power_grad_cross_entropy(z, torch.tensor([0, 1, 2, 3]), alpha=0.5)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(loss, z, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32])
def test_integer_targets_of_any_type(dtype):
    z = torch.randn(4, 5, requires_grad=True)
    t = torch.tensor([0, 1, 2, 3])
    power_grad_cross_entropy(z, t.to(dtype), alpha=0.5).backward()
    expected = z.grad.clone()
    z.grad = None
    power_grad_cross_entropy(z, t, alpha=0.5).backward()
    assert torch.equal(z.grad, expected)


# (Class indices into zero classes are F.cross_entropy's error either way: not a case.)
@pytest.mark.parametrize("shape,soft", [((0, 5), False), ((0, 5), True), ((3, 0), True)])
def test_empty_logits_behave_as_cross_entropy(shape, soft):
    z = torch.randn(*shape, requires_grad=True)
    t = torch.rand(*shape) if soft else torch.zeros(shape[0], dtype=torch.long)
    loss = power_grad_cross_entropy(z, t, alpha=0.5)
    ref = F.cross_entropy(z.detach(), t)
    assert torch.equal(loss.detach().isnan(), ref.isnan())
    loss.backward()
    assert z.grad.shape == z.shape
