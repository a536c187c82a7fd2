"""The CUDA path, checked on the CPU: what only a GPU would show, caught without one.

1. Host reads. A GPU runs ahead of Python until Python reads a value off it (``.item()``,
   ``int(t)``, ``bool(t)``, ``.cpu()``, ``.tolist()``, an op whose output size depends on the
   data); each read makes the host wait for the device, and so does a host-to-device copy made
   without ``non_blocking`` (``torch.tensor(x, device=...)``). :class:`FakeCuda` runs every op
   on the CPU while the tensors say they are on ``cuda:0`` (so the code takes its CUDA branches)
   and records each read or wait with the line of powergrad that made it. The data path (every
   ``augment`` kind, the in-memory loader, both image-folder paths), the models' forward and the
   trainer's steps must make none, apart from the reads the loop documents (engine/loop.py): the
   divergence flag ``int(t.bad_step)`` at a check-in (every ``SYNC_EVERY`` steps on a GPU, the
   epoch's last step) and ``check_outputs`` on the run's first batch; an evaluation reads its
   sums once. Setting up (loaders, the model) may copy and wait as it likes. torch's own
   ``FakeTensorMode`` (values never computed, so any read raises) runs the data path too.
2. Compilation. The loss and a trainer step under ``torch.compile(backend="aot_eager")``, which
   traces the forward and the backward (AOTAutograd), with the loss's C++ op off as it is on a
   GPU: values and gradients equal eager's.
3. Low precision. The gradient for fp16 and bf16 logits against the float64 formula rounded to
   that dtype, in units of the dtype's rounding (a relative tolerance fails at 4096 x 1000 in
   fp16, where most gradients are subnormal).
"""

from __future__ import annotations

import dataclasses
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_data import write_folder
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing
from torch.utils._pytree import tree_leaves, tree_map

import powergrad
from powergrad.config import load_config
from powergrad.data import create_loaders, folder, memory
from powergrad.engine import loop
from powergrad.engine.distributed import DistInfo
from powergrad.models import MODELS, create_model
from powergrad.tamper import PowerGradLoss, power_grad_cross_entropy

CUDA = torch.device("cuda", 0)
aten = torch.ops.aten

# Ops that hand a value to the host, or size their output by the data (a read on a GPU).
READS = {
    aten._local_scalar_dense.default,  # item(), int(t), float(t), bool(t)
    aten.equal.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten._unique2.default,
    aten.unique_dim.default,
    aten.unique_consecutive.default,
    aten.repeat_interleave.Tensor,
}
MASK_INDEXED = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default}  # bool: nonzero
# Ops a CUDA tensor may meet a CPU tensor in (copies; indices, which CUDA moves itself).
MIXED_OK = {aten.copy_.default, aten._to_copy.default, aten.index.Tensor, aten.index_put_.default}


class CudaTensor(torch.Tensor):
    """A CPU tensor (``elem``) that says it lives on cuda:0. Meta to the C++ side, like torch's
    FakeTensor, so that no CUDA call is ever made; every op on it goes to :class:`FakeCuda`."""

    elem: torch.Tensor

    @staticmethod
    def __new__(cls, elem: torch.Tensor) -> CudaTensor:
        t = torch.Tensor._make_wrapper_subclass(
            cls,
            elem.shape,
            strides=elem.stride(),
            storage_offset=elem.storage_offset(),
            dtype=elem.dtype,
            device=torch.device("meta"),
            requires_grad=elem.requires_grad,
        )
        t.elem = elem
        return t

    @property
    def device(self) -> torch.device:  # type: ignore[override]
        return CUDA

    @property
    def is_cuda(self) -> bool:  # type: ignore[override]
        return True

    def tolist(self) -> Any:  # torch refuses tolist on subclasses: a read, recorded
        FakeCuda.current.record("tolist")
        return self.elem.tolist()

    def numpy(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("can't convert cuda:0 device type tensor to numpy")  # as torch says

    def __repr__(self) -> str:  # type: ignore[override]
        return f"CudaTensor({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(f"{func} on a CudaTensor outside FakeCuda")


PACKAGE = Path(powergrad.__file__).parent


def powergrad_line() -> str:
    """The innermost line of powergrad's own code on the stack: who made the read."""
    for frame in reversed(traceback.extract_stack()):
        if Path(frame.filename).is_relative_to(PACKAGE):
            where = Path(frame.filename).relative_to(PACKAGE).as_posix()
            return f"{where}:{frame.lineno} {frame.name}: {frame.line}"
    return "outside powergrad"


class FakeCuda(TorchDispatchMode):
    """Tensors created on (or moved to) a cuda device become :class:`CudaTensor`; ops on them run
    on their CPU values; every host read, and every host-to-device copy that waits, is recorded
    as (phase, what at which line of powergrad) in ``reads``. ``phase`` is set by the caller (a
    training step, say). Mixing a CPU tensor of one or more dimensions into a CUDA op raises, as
    on a GPU. CUDA autocast stays off (torch finds no GPU), so amp runs are not modelled."""

    current: FakeCuda

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[Any, str]] = []
        self.phase: Any = None
        # Held in the FAKE slot, as FakeTensorMode is: torch then skips CUDA's lazy init.
        self._mode_key = torch._C._TorchDispatchModeKey.FAKE

    def record(self, what: str) -> None:
        self.reads.append((self.phase, f"{what} at {powergrad_line()}"))

    def __enter__(self) -> FakeCuda:
        # torch.tensor(data, device="cuda"): a CPU tensor, then a copy (as FakeTensorMode has it).
        self._lift = torch._C._only_lift_cpu_tensors()
        torch._C._set_only_lift_cpu_tensors(True)
        FakeCuda.current = self
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        torch._C._set_only_lift_cpu_tensors(self._lift)
        super().__exit__(*exc)

    @staticmethod
    def waiting_upload(func: Any, args: tuple, kwargs: dict, to: str | None) -> bool:
        """A host-to-device copy without non_blocking: CUDA's copy then waits for the stream
        (torch.tensor(data, device=...) is one)."""
        if func is aten._to_copy.default:
            src, blocking = args[0], not kwargs.get("non_blocking", False)
            return to == "cuda" and blocking and not isinstance(src, CudaTensor)
        if func is aten.copy_.default:
            dst, src = args[0], args[1]
            blocking = not (args[2] if len(args) > 2 else kwargs.get("non_blocking", False))
            uploads = isinstance(dst, CudaTensor) and not isinstance(src, CudaTensor)
            return uploads and blocking and src.dim() > 0
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = tree_leaves((args, kwargs))
        on_cuda = any(isinstance(a, CudaTensor) for a in leaves)
        dev = kwargs.get("device")
        to = None if dev is None else torch.device(dev).type
        if to == "meta":  # a CudaTensor's own device to C++ (where(mask, 0) makes its 0 there)
            to = "cuda"
        if not on_cuda and to != "cuda":
            return func(*args, **kwargs)
        to_host = on_cuda and (
            to == "cpu" or (func is aten.copy_.default and not isinstance(args[0], CudaTensor))
        )
        masked = func in MASK_INDEXED and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        )
        if func in READS or to_host or masked:
            self.record(str(func) + (" by a mask" if masked else ""))
        elif self.waiting_upload(func, args, kwargs, to):
            self.record(f"{func} from the host, non_blocking=False")
        if on_cuda and func not in MIXED_OK:
            for a in leaves:
                if isinstance(a, torch.Tensor) and not isinstance(a, CudaTensor) and a.dim():
                    raise RuntimeError(
                        f"{func}: a CPU tensor of shape {tuple(a.shape)} among CUDA tensors "
                        f"(at {powergrad_line()})"
                    )
        cpu_args, cpu_kwargs = tree_map(
            lambda a: a.elem if isinstance(a, CudaTensor) else a, (args, kwargs)
        )
        if to == "cuda":
            cpu_kwargs["device"] = torch.device("cpu")
        out = func(*cpu_args, **cpu_kwargs)
        if func is aten.copy_.default:
            return args[0]
        if func is aten._local_scalar_dense.default or func is aten.equal.default or to == "cpu":
            return out
        out = tree_map(lambda t: CudaTensor(t) if isinstance(t, torch.Tensor) else t, out)
        return return_and_correct_aliasing(func, args, kwargs, out)


def elem(t: torch.Tensor) -> torch.Tensor:
    return t.elem if isinstance(t, CudaTensor) else t


def test_fake_cuda_records_reads_and_refuses_mixed_devices():
    """The instrument itself: it records each kind of read, computes the CPU's values, and
    refuses what a GPU refuses."""
    with FakeCuda() as fake:
        a = torch.arange(6.0, device=CUDA)
        b = torch.tensor([1.0, 2.0], device=CUDA) + torch.zeros(2).to(CUDA, non_blocking=True)
        assert a.device == CUDA and a.is_cuda and isinstance(b, CudaTensor)
        b.copy_(torch.ones(2), non_blocking=True)
        b.copy_(torch.ones(2))
        assert float(a.sum()) == 15.0 and bool(a[2] > 1) and a[1:3].tolist() == [1.0, 2.0]
        assert torch.equal(a.cpu(), torch.arange(6.0)) and len(a[a > 3]) == 2
        view = a.view(2, 3)
        view.add_(1)  # a view writes through to its base
        assert elem(a)[0] == 1.0
        with pytest.raises(RuntimeError, match="CPU tensor of shape"):
            a + torch.ones(6)
    kinds = [site.split(" at ")[0] for _, site in fake.reads]
    assert kinds == [
        "aten._to_copy.default from the host, non_blocking=False",  # torch.tensor(.., device)
        "aten.copy_.default from the host, non_blocking=False",
        "aten._local_scalar_dense.default",
        "aten._local_scalar_dense.default",
        "tolist",
        "aten._to_copy.default",
        "aten.index.Tensor by a mask",
    ]
    assert {s.split(" at ")[1] for _, s in fake.reads} == {"outside powergrad"}  # this file's


# ----------------------------------------------------------------------------- 1. the data path


def cfg_of(**kw: Any):
    augment = kw.pop("augment", None)  # load_config reads "none" as null: set on the Config
    cfg = load_config(None, {"workers": 0, "seed": 3, **kw})
    return dataclasses.replace(cfg, augment=augment) if augment else cfg


def synthetic(**kw: Any):
    base = dict(dataset="synthetic", img_size=16, num_classes=10, synthetic_size=28, batch_size=4)
    return cfg_of(**{**base, **kw})


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("POWERGRAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("POWERGRAD_PROGRESS", "off")  # its time-based loss reads are not per step
    monkeypatch.setenv("POWERGRAD_CPU_KERNEL", "0")  # the loss as on a GPU: PyTorch's ops
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only waits for a busy core
    yield
    torch.set_num_threads(threads)


def during(fake: FakeCuda) -> list[tuple[Any, str]]:
    """The reads made in a marked phase (batches, steps), not while setting up."""
    return [(phase, site) for phase, site in fake.reads if phase is not None]


def drain(loader: Any, fake: FakeCuda, epoch: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every batch of an epoch, each read attributed to the batch it came during."""
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    out = []
    it = iter(loader)
    for step in range(len(loader)):
        fake.phase = ("batch", step)
        out.append(next(it))
    fake.phase = None
    return out


AUGMENTS = [a for a in memory.AUGMENTS if a != "auto"]


@pytest.mark.parametrize("augment", AUGMENTS)
def test_memory_loader_makes_no_host_read(augment):
    """The GPU-resident loader: batches on the device, the same as the CPU's, and no read.
    (It read int(params["pad"]) back from the device at every step of augment=cifar.)"""
    cfg = synthetic(augment=augment, channels_last=True)
    want = [(x, y) for x, y in create_loaders(cfg, torch.device("cpu")).train]
    with FakeCuda() as fake:
        loaders = create_loaders(cfg, CUDA)
        got = drain(loaders.train, fake)
        drain(loaders.test, fake)
    assert during(fake) == []
    assert len(got) == len(want) == 7
    for (x, y), (wx, wy) in zip(got, want):
        assert x.device == y.device == CUDA
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(elem(x), wx) and torch.equal(elem(y), wy)


@pytest.mark.parametrize("augment", AUGMENTS)
def test_memory_loader_under_fake_tensor_mode(augment):
    """torch's own FakeTensorMode with CUDA tensors: no value exists, so a read raises."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        transform = memory.BatchTransform(augment, 24, (0.5,) * 3, (0.25,) * 3, True, CUDA)
        x = torch.zeros(32, 3, 20, 20, dtype=torch.uint8, device=CUDA)
        y = torch.zeros(32, dtype=torch.int64, device=CUDA)
        loader = memory.MemoryTrainLoader(x, y, transform, 8, seed=0)
        for xb, yb in loader:
            assert xb.device == yb.device == CUDA and xb.shape == (8, 3, 24, 24)
        for xb, _ in memory.MemoryEvalLoader(x, y, transform, 8):
            assert xb.shape == (8, 3, 24, 24)


@pytest.mark.filterwarnings("ignore:'pin_memory' argument is set as true")  # no GPU here
@pytest.mark.parametrize("path", ["memory", "stream"])
@pytest.mark.parametrize("augment", ["auto", *AUGMENTS])
def test_image_folder_paths_make_no_host_read(path, augment, tmp_path, monkeypatch):
    """An image folder decoded into device memory, or streamed from disk through a DataLoader:
    batches on the device, and no read."""
    if path == "stream":
        monkeypatch.setattr(memory, "MEMORY_LIMIT_BYTES", 0)
    root = write_folder(tmp_path / "imgs", n_train=4, n_test=2)
    cfg = cfg_of(dataset="imagefolder", data_dir=str(root), batch_size=4, img_size=16)
    cfg = dataclasses.replace(cfg, augment=augment)
    with FakeCuda() as fake:
        loaders = create_loaders(cfg, CUDA)
        assert isinstance(loaders.train, folder.StreamLoader) == (path == "stream")
        got = drain(loaders.train, fake)
        drain(loaders.test, fake)
    assert during(fake) == []
    assert len(got) == 3 and all(x.device == CUDA and x.shape[1:] == (3, 16, 16) for x, _ in got)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_forward_makes_no_host_read(name):
    cfg = cfg_of(model=name, channels_last=True)
    model = create_model(cfg, 10, 3, 16)
    with FakeCuda() as fake:
        model.to(CUDA).to(memory_format=torch.channels_last)
        x = torch.randn(4, 3, 16, 16).to(CUDA)
        fake.phase = "forward"
        logits = model(x)
    assert during(fake) == [] and logits.device == CUDA and logits.shape == (4, 10)


# ----------------------------------------------------------------------------- trainer steps


def trainer(cfg: Any, device: torch.device) -> loop.Trainer:
    """The loop's trainer for a recipe on ``device``, with no run folder."""
    dist = DistInfo(device=device)
    loaders = create_loaders(cfg, device)
    torch.manual_seed(cfg.seed)
    info = loaders.info
    model = create_model(cfg, info.num_classes, info.in_chans, info.img_size)
    steps = len(loaders.train)
    state = loop.new_state(model, cfg, dist, steps, None, False)
    return loop.make_trainer(state, cfg, dist, None, loaders.train, loaders.test, None, steps, True)


class StepMarks:
    """The train loader, marking the phase of the fake device at each batch handed over: the
    steps of an epoch are told apart by the loader, as the loop pulls them."""

    def __init__(self, loader: Any, fake: FakeCuda) -> None:
        self.loader, self.fake, self.epoch = loader, fake, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        for step, batch in enumerate(self.loader):
            self.fake.phase = (self.epoch, step)
            yield batch
        self.fake.phase = None


@pytest.mark.parametrize(
    "augment,extra",
    [
        ("none", {}),
        ("flip", {"label_smoothing": 0.1}),
        ("cifar", {"clip": "norm", "channels_last": True}),
        ("imagenet", {"accum_steps": 2}),
    ],  # (not amp: torch turns CUDA autocast off where it finds no GPU)
)
def test_trainer_steps_read_only_at_check_ins(augment, extra, monkeypatch):
    """Two epochs of 7 steps on the fake GPU, check-ins every 3 steps: the steps between
    check-ins read nothing; a check-in reads the divergence flag once; the run's first step may
    also look at its logits (monitor's check_outputs). An evaluation reads its sums once. The
    epochs' numbers are the CPU's, to the last bit."""
    monkeypatch.setattr(loop, "SYNC_EVERY", 3)
    cfg = synthetic(
        augment=augment, model="resnet20", model_kwargs={"depth": 8}, alpha=0.3, **extra
    )
    cpu = trainer(cfg, torch.device("cpu"))
    want = [loop.train_one_epoch(cpu, epoch)[0] for epoch in range(2)]
    want_eval = loop.evaluate_loader(cpu.net, cpu.test_loader, cfg, cpu.dist)
    with FakeCuda() as fake:
        t = trainer(cfg, CUDA)
        t.train_loader = StepMarks(t.train_loader, fake)
        got = [loop.train_one_epoch(t, epoch)[0] for epoch in range(2)]
        fake.phase = "evaluation"
        got_eval = loop.evaluate_loader(t.net, t.test_loader, cfg, t.dist)
    evaluation = [site for phase, site in fake.reads if phase == "evaluation"]
    assert len(evaluation) == 1 and "tolist" in evaluation[0]  # its sums, once, at the end
    assert got_eval == want_eval
    check_ins = {2, 5, 6}  # (step + 1) % 3 == 0, and the last of 7
    by_step: dict[Any, list[str]] = {}
    for phase, site in fake.reads:
        by_step.setdefault(phase, []).append(site)
    steps = [(p, s) for p, s in by_step.items() if isinstance(p, tuple)]
    for (epoch, step), sites in sorted(steps):
        flag = [s for s in sites if "bad_step" in s]
        first = [s for s in sites if "check_outputs" in s or "looks_like" in s]
        assert len(flag) <= 1 and (step in check_ins or not flag), (epoch, step, sites)
        assert not first or (epoch, step) == (0, 0), (epoch, step, sites)
        assert len(sites) == len(flag) + len(first), f"epoch {epoch} step {step}: {sites}"
    flag_steps = {p for p, s in fake.reads if isinstance(p, tuple) and "bad_step" in s}
    assert flag_steps == {(e, s) for e in range(2) for s in check_ins}
    for g, w in zip(got, want):  # stats are computed once an epoch: that read is not a step's
        assert g == w


# ----------------------------------------------------------------------------- 2. compiled


def compiled(fn: Any) -> Any:
    torch._dynamo.reset()
    return torch.compile(fn, backend="aot_eager", fullgraph=True)


@pytest.mark.parametrize(
    "kind,c,kwargs",  # up to 40 classes the eager softmax runs on the transposed view
    [
        ("index", 7, {}),
        ("index", 64, {}),
        ("index", 7, {"label_smoothing": 0.1, "ignore_index": 2}),
        ("index", 7, {"weight": True, "reduction": "sum"}),
        ("soft", 7, {"label_smoothing": 0.1}),
        ("index", 7, {"reduction": "none"}),
    ],
)
def test_loss_under_aot_eager_equals_eager(kind, c, kwargs):
    """The loss through dynamo and AOTAutograd (forward and backward traced), C++ op off."""
    g = torch.Generator().manual_seed(1)
    z = torch.randn(32, c, generator=g) * 3
    t = (
        torch.softmax(torch.randn(32, c, generator=g), 1)
        if kind == "soft"
        else torch.randint(0, c, (32,), generator=g)
    )
    if kwargs.get("weight"):
        kwargs = {**kwargs, "weight": torch.rand(c, generator=g) + 0.5}
    up = torch.rand(32, generator=g) if kwargs.get("reduction") == "none" else torch.tensor(2.0)

    def run(fn: Any) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = z.clone().requires_grad_(True)
        loss = fn(leaf, t)
        loss.backward(up)
        return loss.detach(), leaf.grad

    def loss_fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return power_grad_cross_entropy(a, b, 0.3, **kwargs)

    want_loss, want_grad = run(loss_fn)
    got_loss, got_grad = run(compiled(loss_fn))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-7)
    # and it is the tampered gradient, not cross-entropy's (dynamo must not drop the Function)
    plain = z.clone().requires_grad_(True)
    F.cross_entropy(
        plain,
        t,
        weight=kwargs.get("weight"),
        label_smoothing=kwargs.get("label_smoothing", 0.0),
        ignore_index=kwargs.get("ignore_index", -100),
        reduction=kwargs.get("reduction", "mean"),
    ).backward(up)
    assert not torch.allclose(got_grad, plain.grad, rtol=1e-3, atol=1e-6)


def test_trainer_step_under_aot_eager_equals_eager():
    """One optimiser step of the loop (_train_step) with the model compiled (as compile=true
    does) and with model and loss compiled together: loss, logits and updated weights equal
    the eager step's."""
    cfg = synthetic(model="resnet20", model_kwargs={"depth": 8}, alpha=0.3, augment="flip")
    x, y = next(iter(create_loaders(cfg, torch.device("cpu")).train))

    def step(wrap: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = create_model(cfg, 10, 3, 16)
        state = loop.new_state(model, cfg, DistInfo(), 1, None, False)
        loss_fn = criterion = PowerGradLoss(cfg.alpha)
        forward: Any = model
        if wrap == "model":
            forward = compiled(model)
        elif wrap == "model+loss":  # the step's "forward" hands the images to the compiled pair
            forward, criterion = (lambda a: a), compiled(lambda a, b: loss_fn(model(a), b))
        loss, logits = loop._train_step(
            forward, criterion, state.optimizer, state.scaler, x, y, cfg, model
        )
        return loss, logits, {k: v.clone() for k, v in model.state_dict().items()}

    want_loss, want_logits, want_weights = step("eager")
    got_loss, got_logits, got_weights = step("model")
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_logits, want_logits, rtol=1e-5, atol=1e-6)
    for k, w in want_weights.items():
        torch.testing.assert_close(got_weights[k], w, rtol=1e-5, atol=1e-6, msg=k)
    both_loss, _, both_weights = step("model+loss")
    torch.testing.assert_close(both_loss, want_loss, rtol=1e-6, atol=1e-7)
    for k, w in want_weights.items():
        torch.testing.assert_close(both_weights[k], w, rtol=1e-5, atol=1e-6, msg=k)


# ----------------------------------------------------------------------------- 3. low precision


def tampered_grad64(z: torch.Tensor, t: torch.Tensor, alpha: float, ls: float) -> torch.Tensor:
    """The definition in float64: (softmax(alpha z) - q) / N, q the smoothed one-hot targets."""
    z = z.double()
    n, c = z.shape
    q = F.one_hot(t, c).double() * (1 - ls) + ls / c
    return (torch.softmax(alpha * z, 1) - q) / n


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of ``dtype`` at |x| (float64 in, float64 out): 2^(e - mantissa bits) in the
    normal range, the smallest subnormal below it."""
    info = torch.finfo(dtype)
    exponent = torch.floor(torch.log2(x.abs().clamp_min(info.tiny)))
    return torch.exp2(exponent) * info.eps


# The float32 arithmetic inside, in float32 units of the terms (softmax(alpha z) and q, over N):
# the exponent's argument alpha * z - max is rounded, which moves exp by up to |alpha z - max|
# units (about 7 for these logits), then the sum, the division, the scale and the subtraction
# add a few more (measured: at most 18 over these cases).
FLOAT32_UNITS = 32


@pytest.mark.parametrize(
    "dtype,n,c,op",  # op: the loss's PyTorch ops (as on a GPU), or its C++ op (the CPU's)
    [
        (torch.float16, 4096, 1000, "pytorch"),
        (torch.bfloat16, 4096, 1000, "pytorch"),
        (torch.float16, 256, 10, "pytorch"),
        (torch.bfloat16, 256, 10, "pytorch"),
        (torch.float32, 4096, 1000, "pytorch"),
        (torch.float16, 4096, 1000, "cpp"),
        (torch.float32, 4096, 1000, "cpp"),
    ],
)
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_low_precision_gradient_is_the_rounded_formula(dtype, n, c, ls, op, monkeypatch):
    """The loss runs in float32 and rounds the gradient once to the logits' dtype, so each entry
    is the float64 formula rounded to that dtype, within one unit of the dtype's rounding (the
    two roundings, of the exact value and of the float32 one) plus the float32 arithmetic's
    error (FLOAT32_UNITS), which shows only where p' - q cancels. At 4096 x 1000 in fp16 most
    gradients are subnormal, and a relative tolerance on the whole (2e-3) fails there."""
    if op == "cpp":
        monkeypatch.delenv("POWERGRAD_CPU_KERNEL")
    g = torch.Generator().manual_seed(n + c)
    z = (torch.randn(n, c, generator=g) * 3).to(dtype).requires_grad_(True)
    t = torch.randint(0, c, (n,), generator=g)
    alpha = 0.3
    power_grad_cross_entropy(z, t, alpha, ls).backward()
    assert z.grad.dtype == dtype
    exact = tampered_grad64(z.detach(), t, alpha, ls)
    rounded = exact.to(dtype).double()
    q = F.one_hot(t, c).double() * (1 - ls) + ls / c
    terms = (torch.softmax(alpha * z.detach().double(), 1) + q) / n
    allowed = ulp(rounded, dtype) + FLOAT32_UNITS * ulp(terms, torch.float32)
    err = (z.grad.double() - rounded).abs()
    worst = (err / allowed).max().item()
    assert worst <= 1, f"{worst:.2f} of the allowance (one {dtype} unit + float32's error)"
    if dtype != torch.float32:  # nearly every entry is the rounded formula itself
        assert (err == 0).double().mean() > 0.999
    if dtype == torch.float16 and n == 4096:  # the case a relative tolerance gets wrong
        subnormal = (rounded.abs() < torch.finfo(dtype).tiny) & (rounded != 0)
        assert subnormal.double().mean() > 0.5
