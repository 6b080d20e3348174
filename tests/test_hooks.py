"""Recording and intervening leave every model exactly as it was: an architecture sweep,
in-place safety against a model without in-place ops, and no growth over many recordings."""

from __future__ import annotations

import copy
import gc
import tracemalloc
import warnings

import pytest
import torch
from torch import nn

from xnn_toolkit._guard import HOOK_DICTS
from xnn_toolkit.errors import InputError
from xnn_toolkit.hooks import intervene, record
from xnn_toolkit.layers import stages

# the same families as tests/test_layers.py: (id, library, name, input size)
ARCHS = [
    ("tv-vgg11", "tv", "vgg11", 64),
    ("tv-resnet18", "tv", "resnet18", 64),
    ("tv-densenet121", "tv", "densenet121", 64),
    ("tv-mobilenet_v3_small", "tv", "mobilenet_v3_small", 64),
    ("tv-efficientnet_b0", "tv", "efficientnet_b0", 64),
    ("tv-convnext_tiny", "tv", "convnext_tiny", 64),
    ("tv-regnet_x_400mf", "tv", "regnet_x_400mf", 64),
    ("tv-googlenet", "tv", "googlenet", 64),
    ("tv-shufflenet_v2_x0_5", "tv", "shufflenet_v2_x0_5", 64),
    ("tv-squeezenet1_0", "tv", "squeezenet1_0", 64),
    ("timm-resnet10t", "timm", "resnet10t", 64),
    ("timm-efficientnet_b0", "timm", "efficientnet_b0", 64),
    ("timm-convnext_atto", "timm", "convnext_atto", 64),
    ("timm-inception_v3", "timm", "inception_v3", 96),
    ("timm-regnetx_002", "timm", "regnetx_002", 64),
    ("timm-mobilenetv3_small_050", "timm", "mobilenetv3_small_050", 64),
    ("timm-densenet121", "timm", "densenet121", 64),
    ("timm-ghostnet_050", "timm", "ghostnet_050", 64),
]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machines share two cores between several processes; with one intra-op thread
    # torch does not spin-wait for busy cores (ten times less CPU time under contention).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(lib: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if lib == "tv":
            import torchvision

            return torchvision.models.get_model(name, weights=None, num_classes=10)
        import timm

        return timm.create_model(name, pretrained=False, num_classes=10)


# --------------------------------------------------------------------------- snapshots


def snapshot(model: nn.Module) -> dict:
    """Everything a recorder could change, copied (tensors) or referenced (objects)."""
    return {
        "params": {
            n: (
                p.detach().clone(),
                p.requires_grad,
                p.grad,
                None if p.grad is None else p.grad.clone(),
            )
            for n, p in model.named_parameters()
        },
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: {d: list(getattr(m, d).items()) for d in HOOK_DICTS if hasattr(m, d)}
            for n, m in model.named_modules()
        },
        "full_backward": {n: m._is_full_backward_hook for n, m in model.named_modules()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """Compare the live model with a snapshot (without copying it again)."""
    modes = {n: m.training for n, m in model.named_modules()}
    assert modes == before["modes"], "training flags changed"
    hooks = {
        n: {d: list(getattr(m, d).items()) for d in HOOK_DICTS if hasattr(m, d)}
        for n, m in model.named_modules()
    }
    assert hooks == before["hooks"], "hook dictionaries changed"
    assert {n: m._is_full_backward_hook for n, m in model.named_modules()} == before[
        "full_backward"
    ]
    params = dict(model.named_parameters())
    assert params.keys() == before["params"].keys()
    for n, (value, flag, grad, grad_value) in before["params"].items():
        p = params[n]
        assert torch.equal(p.detach(), value), f"parameter {n} changed"
        assert p.requires_grad == flag, f"requires_grad of {n} changed"
        assert p.grad is grad, f".grad of {n} was replaced"
        if grad_value is not None:
            assert torch.equal(p.grad, grad_value), f".grad of {n} changed in place"
    buffers = dict(model.named_buffers())
    assert buffers.keys() == before["buffers"].keys()
    for n, b in before["buffers"].items():
        assert torch.equal(buffers[n], b), f"buffer {n} changed"


def _prepare(model: nn.Module, train: bool) -> list:
    """Give the model a state worth restoring: mixed modes and flags, a .grad, user hooks."""
    model.train(train)
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[-1].grad = torch.full_like(params[-1], 0.5)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    calls = []
    first.register_forward_hook(lambda *_: calls.append(1))
    model.register_forward_pre_hook(lambda *_: None)
    if train:
        bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if bn:
            bn[0].eval()  # a mixed-mode model (frozen BN in a training model)
    return calls


def _plain_outputs(model: nn.Module, names: list[str], x: torch.Tensor) -> dict:
    got = {}
    handles = [
        model.get_submodule(n).register_forward_hook(
            lambda _m, _i, o, n=n: got.__setitem__(n, o.detach().clone())
        )
        for n in names
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return got


# --------------------------------------------------------------------------- the sweep


@pytest.mark.parametrize("lib, name, size", [pytest.param(*a[1:], id=a[0]) for a in ARCHS])
def test_sweep_record_and_restore(lib, name, size):
    model = build(lib, name)
    st = stages(model)
    names = [st[0].name, st[len(st) // 2].name, st[-1].name]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, size, size, generator=g)

    # reference activations with plain hooks, in eval mode
    model.eval()
    ref = _plain_outputs(model, names, x)
    with torch.no_grad():
        ref_logits = model(x)

    for train in (False, True):
        calls = _prepare(model, train)
        before = snapshot(model)

        # 1. plain recording (eval mode inside, so BN statistics stay frozen)
        with record(model, names) as rec, torch.no_grad():
            logits = model(x)
        assert rec.layers == names
        for n in names:
            assert torch.equal(rec.activations[n], ref[n]), n
        assert torch.equal(logits, ref_logits)
        assert calls, "the user's own hook must still run inside the block"
        assert_unchanged(model, before)

        if train:  # from train mode: the plain case and the two failures are enough
            _failures(model, names, x, size, before)
            continue

        # 2. gradients, with the parameters frozen inside the block
        with record(model, names, gradients=True, freeze=True) as rec:
            model(x).sum().backward()
        for n in names:
            assert rec.gradients[n].shape == ref[n].shape
            assert torch.isfinite(rec.gradients[n]).all()
        assert any(float(rec.gradients[n].abs().sum()) > 0 for n in names)
        assert_unchanged(model, before)

        _failures(model, names, x, size, before)

        # 5. the block itself raises after a forward
        with pytest.raises(KeyError):
            with record(model, names), torch.no_grad():
                model(x)
                raise KeyError("user code")
        assert_unchanged(model, before)

        # 6. intervening with the identity changes nothing in the outputs
        with intervene(model, {n: (lambda a: a) for n in names}), torch.no_grad():
            assert torch.equal(model(x), ref_logits)
        assert_unchanged(model, before)
        for m in model.modules():  # drop this round's user hooks
            m._forward_hooks.clear()
            m._forward_pre_hooks.clear()


def _failures(model, names, x, size, before):
    # 3. the forward raises (wrong number of channels)
    with pytest.raises(RuntimeError):
        with record(model, names, gradients=True):
            model(torch.randn(2, 5, size, size))
    assert_unchanged(model, before)

    # 4. a hook raises in the middle of the forward
    def boom(_a):
        raise ValueError("edit failed")

    with pytest.raises(ValueError, match="edit failed"):
        with intervene(model, {names[1]: boom}), record(model, names):
            model(x)
    assert_unchanged(model, before)


def test_train_mode_batchnorm_stats_unchanged_even_without_eval_mode_inside():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).train()
    before = snapshot(model)
    x = torch.randn(4, 3, 32, 32)
    with record(model, ["layer2"]), torch.no_grad():
        model(x)
    assert_unchanged(model, before)
    # the opposite case shows the check is not blind: eval_mode=False updates the statistics
    with record(model, ["layer2"], eval_mode=False), torch.no_grad():
        model(x)
    with pytest.raises(AssertionError, match="buffer"):
        assert_unchanged(model, before)


def test_existing_grad_survives_a_backward_inside_record():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = snapshot(model)
    with record(model, ["1"], gradients=True) as rec:
        model(torch.randn(1, 3, 8, 8)).sum().backward()
    assert rec.gradients["1"].shape == (1, 4, 6, 6)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- in-place safety


def _no_inplace(model: nn.Module) -> nn.Module:
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    return ref


def test_inplace_relu_cannot_corrupt_recordings():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=5).eval()
    assert any(getattr(m, "inplace", False) for m in model.modules())
    ref_model = _no_inplace(model)
    # outputs later changed in place: bn1 (ReLU(inplace)), bn2 (out += identity), a block
    names = ["layer1.0.bn1", "layer1.0.bn2", "layer1.0", "layer2.1.bn1", "layer3"]
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))

    # reference: the same weights without in-place ops, autograd w.r.t. the captured tensors
    captured = {}
    handles = [
        ref_model.get_submodule(n).register_forward_hook(
            lambda _m, _i, o, n=n: captured.__setitem__(n, (o, o.detach().clone()))
        )
        for n in names
    ]
    logits = ref_model(x)
    for h in handles:
        h.remove()
    objective = logits[:, 2].sum()
    ref_grads = torch.autograd.grad(objective, [captured[n][0] for n in names])

    with record(model, names, gradients=True) as rec:
        out = model(x)
        out[:, 2].sum().backward()
    torch.testing.assert_close(out, logits, rtol=0, atol=0)
    for n, g in zip(names, ref_grads):
        torch.testing.assert_close(rec.activations[n], captured[n][1], rtol=0, atol=0)
        torch.testing.assert_close(rec.gradients[n], g, rtol=1e-6, atol=1e-7)

    # a naive hook that keeps the tensor itself sees it overwritten by the in-place ReLU
    naive = {}
    h = model.layer1[0].bn1.register_forward_hook(lambda _m, _i, o: naive.__setitem__("a", o))
    with torch.no_grad():
        model(x)
    h.remove()
    assert not torch.equal(naive["a"], captured["layer1.0.bn1"][1])
    assert (naive["a"] >= 0).all()  # post-ReLU values, not BatchNorm's output


def test_recording_non_tensor_output_is_an_input_error():
    class Pair(nn.Module):
        def forward(self, x):
            return {"a": x}

    model = nn.Sequential(Pair())
    before = snapshot(model)
    with pytest.raises(InputError, match="not a tensor"):
        with record(model, ["0"]):
            model(torch.zeros(1))
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- no growth


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_thousand_recordings_do_not_grow_memory():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 4, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    x = torch.randn(1, 3, 64, 64)  # each recording holds 2 x 256 KB of activations

    def once():
        with record(model, ["0", "1"], gradients=True) as rec:
            model(x).sum().backward()
        return rec

    for _ in range(30):
        once()
    gc.collect()
    rss0 = _rss()
    tracemalloc.start()
    snap0 = tracemalloc.take_snapshot()
    kept = None
    for _ in range(1000):
        kept = once()  # only the last recording stays alive
    gc.collect()
    python_growth = sum(
        s.size_diff for s in tracemalloc.take_snapshot().compare_to(snap0, "filename")
    )
    tracemalloc.stop()
    rss_growth = _rss() - rss0
    assert set(kept.activations) == {"0", "1"}
    assert all(not getattr(m, d) for m in model.modules() for d in HOOK_DICTS if hasattr(m, d))
    assert all(p.grad is None for p in model.parameters())
    # a leak of one recording per call would be >= 500 MB of tensors (and ~MBs of Python)
    assert rss_growth < 24 * 2**20, f"RSS grew by {rss_growth / 2**20:.1f} MB"
    assert python_growth < 256 * 2**10, f"Python allocations grew by {python_growth} bytes"
