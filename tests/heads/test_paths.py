"""Class paths (docs/methods/paths.rst): literal objectives, analyses, planted recovery, model
safety."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torchvision
from torch import nn

from xnn_toolkit.errors import InputError, LayerNotFoundError, NotFittedError
from xnn_toolkit.heads._placement import auto_layers, check_layers
from xnn_toolkit.heads._training import _RowOptimizer
from xnn_toolkit.heads.path_analysis import (
    HitRates,
    composite_2x2,
    hit_rate,
    jaccard_matrix,
    misclassification_analysis,
    path_similarity,
)
from xnn_toolkit.heads.paths import (
    PAPER_BETAS,
    ClassPaths,
    binarize,
    code_objective,
    mask_from_logit,
    paper_objective,
)
from xnn_toolkit.zoo import resnet_small, vgg_small

K, M = 4, 3  # planted network: 4 classes, 3 detector channels per class


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The test machine is shared; one thread is much faster than oversubscribed ones.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def planted_net(w: float = 4.0) -> nn.Sequential:
    """Class ``c`` is detected by channels ``cM .. cM+M-1`` at both ReLU layers, and logit ``c``
    reads only those channels (hand-set weights)."""
    net = nn.Sequential(
        nn.Conv2d(K, K * M, 1),
        nn.ReLU(),
        nn.Conv2d(K * M, K * M, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(K * M, K),
    )
    with torch.no_grad():
        net[0].weight.zero_()
        net[0].bias.fill_(-0.35)
        net[2].weight.copy_(torch.eye(K * M)[:, :, None, None])
        net[2].bias.zero_()
        net[6].weight.zero_()
        net[6].bias.zero_()
        for c in range(K):
            net[0].weight[c * M : (c + 1) * M, c] = 1.0
            net[6].weight[c, c * M : (c + 1) * M] = w
    return net.eval()


def planted_data(n_per: int = 16, seed: int = 0, size: int = 8):
    """Input channel ``c`` is bright on images of class ``c``; the others carry weaker noise
    that sometimes activates other classes' detectors."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K).repeat_interleave(n_per)
    x = torch.rand(len(y), K, size, size, generator=g) * 0.6
    x[torch.arange(len(y)), y] = 1.0 + 0.5 * torch.rand(len(y), size, size, generator=g)
    return x, y


def planted_truth() -> torch.Tensor:
    t = torch.zeros(K, K * M, dtype=torch.bool)
    for c in range(K):
        t[c, c * M : (c + 1) * M] = True
    return t


# ----------------------------------------------------------------------------- formulas


def _rand_problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    b, r = 7, 3
    pre = [torch.rand(b, 5, 3, 2, generator=g) * 2, torch.rand(b, 4, generator=g)]
    row_masks = [torch.rand(r, 5, generator=g), torch.rand(r, 4, generator=g)]
    rows = torch.tensor([0, 2, 2, 1, 0, 2, 0])
    labels = torch.tensor([5, 1, 1, 3, 5, 1, 5])  # logit index of each row's class
    logits = torch.randn(b, 6, generator=g)
    return pre, row_masks, rows, labels, logits, r


def test_paper_objective_literal():
    pre, row_masks, rows, labels, logits, r = _rand_problem()
    beta = 0.7
    got = paper_objective(pre, [m[rows] for m in row_masks], logits, labels, rows, r, beta)
    for k in range(r):
        members = [b for b in range(len(rows)) if int(rows[b]) == k]
        per_image = []
        for b in members:
            tot = 0.0
            for a, m in zip(pre, row_masks):
                vals = a[b].reshape(a.shape[1], -1)
                n_e = vals.numel()
                kl = (
                    sum(
                        (float(vals[c, e]) * float(m[k, c])) ** 2
                        for c in range(vals.shape[0])
                        for e in range(vals.shape[1])
                    )
                    / n_e
                )
                rec = (
                    sum(
                        (float(vals[c, e]) - float(m[k, c]) * float(vals[c, e])) ** 2
                        for c in range(vals.shape[0])
                        for e in range(vals.shape[1])
                    )
                    / n_e
                )
                tot += beta * kl + rec
            z = [float(v) for v in logits[b]]
            p = math.exp(z[int(labels[b])]) / sum(math.exp(v) for v in z)
            tot += -(1 * math.log(p) + 0 * math.log(1 - p))  # BCE(ỹ_c, y_c = 1)
            per_image.append(tot)
        assert got["total"][k].item() == pytest.approx(sum(per_image) / len(per_image), rel=1e-5)


def test_code_objective_literal():
    pre, row_masks, rows, labels, logits, r = _rand_problem(1)
    g = torch.Generator().manual_seed(5)
    post = [
        a * m[rows].reshape(m[rows].shape + (1,) * (a.dim() - 2)) for a, m in zip(pre, row_masks)
    ]
    original = [a + 0.3 * torch.randn(a.shape, generator=g) for a in pre]
    correct = torch.tensor([True, False, True, True, False, True, True])
    beta = 1.3
    got = code_objective(post, original, row_masks, logits, labels, rows, correct, beta)
    n_layers = 2
    for k in range(r):
        members = [b for b in range(len(rows)) if int(rows[b]) == k]
        ce = 0.0
        for b in members:
            z = [float(v) for v in logits[b]]
            ce += -(z[int(labels[b])] - math.log(sum(math.exp(v) for v in z)))
        ce /= len(members)
        mse_sum = 0.0
        for p, o in zip(post, original):
            sq, cnt = 0.0, 0
            for b in members:
                if not bool(correct[b]):
                    continue
                diff = (p[b] - o[b]).flatten()
                sq += sum(float(d) ** 2 for d in diff)
                cnt += diff.numel()
            mse_sum += sq / cnt if cnt else 0.0
        reg = sum(sum(float(v) ** 2 for v in m[k]) / m.shape[1] for m in row_masks)
        want = (ce + mse_sum) / n_layers + beta * reg / n_layers
        assert got["total"][k].item() == pytest.approx(want, rel=1e-5)


def test_code_objective_absent_rows_are_zero():
    pre, row_masks, rows, labels, logits, r = _rand_problem(2)
    rows = torch.zeros_like(rows)  # only class 0 present
    post = [a.clone() for a in pre]
    got = code_objective(post, pre, row_masks, logits, labels, rows, torch.ones(7, dtype=bool), 1.0)
    assert got["total"][1:].abs().max() == 0
    assert got["mse"][0] == 0  # identical activations


def test_mask_and_binarize():
    logit = torch.tensor([-2.0, 0.0, 1e-4, 3.0])
    mu = mask_from_logit(logit)
    assert torch.allclose(mu, 1 / (1 + torch.exp(-logit)))
    assert binarize(mu).tolist() == [False, False, True, True]  # 0.5 itself is off
    assert binarize(torch.tensor([0.3, 0.31]), 0.3).tolist() == [False, True]


def test_paper_betas_documented():
    assert PAPER_BETAS["vgg16/imagenet"] == 4.5 and PAPER_BETAS["vgg16/places365"] == 5.0
    assert PAPER_BETAS["resnet50/imagenet"] == 0.02 and PAPER_BETAS["densenet121/imagenet"] == 0.02
    assert PAPER_BETAS["darts/imagenet"] == 0.45 and PAPER_BETAS["darts/places365"] == 0.20


# ----------------------------------------------------------------------------- optimiser


def test_row_optimizer_matches_torch_adam_and_skips_absent_rows():
    g = torch.Generator().manual_seed(0)
    p0 = torch.randn(3, 5, generator=g)
    ours = p0.clone()
    ref = p0.clone().requires_grad_(True)
    opt_ref = torch.optim.Adam([ref], lr=0.1)
    opt = _RowOptimizer([ours], "adam", 0.1)
    all_rows = torch.ones(3, dtype=torch.bool)
    for _ in range(6):
        grad = torch.randn(3, 5, generator=g)
        opt.step([grad], all_rows)
        ref.grad = grad.clone()
        opt_ref.step()
    assert torch.allclose(ours, ref.detach(), atol=2e-5)  # float32 bias corrections
    # A row absent from a batch neither moves nor advances its step count.
    before = ours.clone()
    opt.step([torch.randn(3, 5, generator=g)], torch.tensor([True, False, True]))
    assert torch.equal(ours[1], before[1]) and not torch.equal(ours[0], before[0])
    assert opt.t.tolist() == [7, 6, 7]


def test_row_optimizer_normalized_literal():
    p = torch.zeros(2, 3)
    opt = _RowOptimizer([p], "normalized", 0.1)
    grad = torch.tensor([[3.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    opt.step([grad], torch.ones(2, dtype=torch.bool))
    assert torch.allclose(p[0], torch.tensor([-0.06, 0.0, -0.08]))
    assert torch.equal(p[1], torch.zeros(3))  # zero gradient: no step, no NaN


# ----------------------------------------------------------------------------- analyses


def test_jaccard_literal_and_empty_sets():
    g = torch.Generator().manual_seed(3)
    a = torch.rand(5, 9, generator=g) > 0.5
    a[4] = False
    j = jaccard_matrix(a)
    for i in range(5):
        for k in range(5):
            s1 = {c for c in range(9) if a[i, c]}
            s2 = {c for c in range(9) if a[k, c]}
            want = len(s1 & s2) / len(s1 | s2) if s1 | s2 else 1.0
            assert j[i, k].item() == pytest.approx(want)


def test_path_similarity_is_mean_over_layers():
    p1 = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    p2 = torch.tensor([[1, 0], [0, 1]], dtype=torch.bool)
    s = path_similarity({"a": p1, "b": p2})
    assert s[0, 1].item() == pytest.approx((1 / 3 + 0.0) / 2)
    assert torch.allclose(s.diagonal(), torch.ones(2))


def test_hit_rate_hand_made():
    # 8 x 8 maps, top 10 % = ceil(6.4) = 7 pixels.
    m = torch.zeros(2, 8, 8)
    # map 0: five top pixels in quadrant 1 (top-right), two in quadrant 3 (bottom-right)
    for v, (r, c) in enumerate([(0, 4), (0, 5), (1, 6), (2, 7), (3, 4), (4, 4), (7, 7)]):
        m[0, r, c] = 10 + v
    # map 1: all seven in quadrant 2 (bottom-left)
    for v, (r, c) in enumerate([(4, 0), (4, 1), (5, 2), (6, 3), (7, 0), (7, 1), (5, 0)]):
        m[1, r, c] = 5 + v
    got = hit_rate(m, torch.tensor([1, 2]))
    assert got.tolist() == pytest.approx([5 / 7, 1.0])
    assert hit_rate(m, torch.tensor([3, 0])).tolist() == pytest.approx([2 / 7, 0.0])
    # Upsampling: a 2 x 2 map whose largest cell is bottom-right keeps its top pixels there.
    small = torch.tensor([[[0.0, 1.0], [2.0, 9.0]]])
    assert hit_rate(small, torch.tensor([3]), size=(16, 16)).item() == 1.0
    # min-max normalisation does not change which pixels are kept
    assert torch.equal(hit_rate(m * 3 + 7, torch.tensor([1, 2])), got)


def test_composite_2x2_geometry():
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(20, 3, 4, 6, generator=g)
    labels = torch.arange(20) % 5
    comp, cls, src = composite_2x2(imgs, labels, 6, random_state=1)
    assert comp.shape == (6, 3, 8, 12)
    for j in range(6):
        assert len(set(cls[j].tolist())) == 4
        assert torch.equal(labels[src[j]], cls[j])
        assert torch.equal(comp[j, :, :4, :6], imgs[src[j, 0]])
        assert torch.equal(comp[j, :, :4, 6:], imgs[src[j, 1]])
        assert torch.equal(comp[j, :, 4:, :6], imgs[src[j, 2]])
        assert torch.equal(comp[j, :, 4:, 6:], imgs[src[j, 3]])
    with pytest.raises(InputError, match="4 different classes"):
        composite_2x2(imgs, labels % 3, 2)


def test_misclassification_analysis_hand_made():
    sim = torch.tensor(
        [
            [1.0, 0.9, 0.1, 0.5, 0.2],
            [0.9, 1.0, 0.3, 0.2, 0.1],
            [0.1, 0.3, 1.0, 0.8, 0.7],
            [0.5, 0.2, 0.8, 1.0, 0.6],
            [0.2, 0.1, 0.7, 0.6, 1.0],
        ]
    )
    logits = torch.tensor(
        [
            [0.0, 5.0, 1.0, 2.0, 3.0],  # true 0, predicted 1 (most similar to 0): hit
            [9.0, 1.0, 2.0, 3.0, 4.0],  # true 0, correct: skipped
            [5.0, 4.0, 0.0, 1.0, 2.0],  # true 2, predicted 0 (not in 2's top-3 {3,4,1})
            [0.0, 1.0, 2.0, 3.0, 4.0],  # true 2, predicted 4: hit
        ]
    )
    labels = torch.tensor([0, 0, 2, 2])
    res = misclassification_analysis(sim, logits, labels, k=3)
    assert res.indices.tolist() == [0, 2, 3]
    assert res.similar[0].tolist() == [1, 3, 4]
    assert res.similar[1].tolist() == [3, 4, 1]
    assert res.predicted[0].tolist() == [1, 4, 3]
    assert res.top1_in_similar.tolist() == [True, False, True]
    assert res.overlap.tolist() == [3, 2, 2]  # {1,4,3}&{1,3,4}; {0,1,4}&{3,4,1}; {4,3,2}&{3,4,1}
    assert res.rate == pytest.approx(2 / 3)
    assert res.chance == pytest.approx(3 / 4)
    # Tied similarities: ties are broken uniformly at random, so the rate is the chance level.
    flat = misclassification_analysis(torch.ones(5, 5), logits, labels, k=3)
    assert flat.top1_in_similar.tolist() == pytest.approx([0.75] * 3)
    assert flat.rate == pytest.approx(flat.chance)
    # 3 predicted classes x 3/4 each, except the true class 2 in image 3's top-3 (0)
    assert flat.overlap.tolist() == pytest.approx([2.25, 2.25, 1.5])
    # a tie at the k-th place only: classes 3 and 4 tie for the last slot of class 0's top-2
    tie = sim.clone()
    tie[0, 3] = tie[0, 4] = 0.5
    res2 = misclassification_analysis(tie, logits[:1], labels[:1], k=2)
    assert res2.top1_in_similar.tolist() == [1.0]  # predicted 1 is the most similar
    assert res2.overlap.tolist() == pytest.approx([1.5])  # predicted {1, 4}: 1 + 1/2


# ----------------------------------------------------------------------------- placement


def test_auto_placement_families():
    x = torch.rand(1, 3, 32, 32)
    vgg = vgg_small(channels=(8, 8, 16, 16))
    # [conv relu pool] [conv relu pool] [conv relu conv relu pool] [conv relu conv relu pool]
    assert auto_layers(vgg, x) == [
        "features.2",
        "features.5",
        "features.7",
        "features.10",
        "features.12",
        "features.15",
    ]
    res = resnet_small(channels=(8, 8, 16, 16), layers=(2, 1, 1, 1))
    assert auto_layers(res, x) == [
        "act1",
        "layer1.0",
        "layer1.1",
        "layer2.0",
        "layer3.0",
        "layer4.0",
    ]
    tv = torchvision.models.resnet18(num_classes=3)
    assert auto_layers(tv, x)[:3] == ["maxpool", "layer1.0", "layer1.1"]
    dense = torchvision.models.DenseNet(
        growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5
    )
    assert auto_layers(dense, x) == [
        "features.denseblock1",
        "features.transition1",
        "features.denseblock2",
    ]
    assert auto_layers(planted_net(), torch.rand(1, K, 8, 8)) == ["1", "3"]


def test_placement_errors():
    x = torch.rand(1, 3, 16, 16)

    class Shared(nn.Module):  # one ReLU module used twice
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.act = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3), nn.ReLU()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.act(self.c2(self.act(self.c1(x)))).mean((2, 3)))

    with pytest.raises(InputError, match="runs 2 times"):
        check_layers(Shared(), ["act"], x)

    class Tokens(nn.Module):  # outputs N x L x D
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 4, 4, 4)
            self.tok = nn.Flatten(2)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self.tok(self.embed(x)).mean(2))

    with pytest.raises(InputError, match="channel masks need"):
        check_layers(Tokens(), ["tok"], x)
    with pytest.raises(LayerNotFoundError, match="did you mean"):
        check_layers(Tokens(), ["embedd"], x)
    with pytest.raises(LayerNotFoundError, match="pass layers"):
        auto_layers(nn.Sequential(nn.Flatten(), nn.Linear(768, 2)), x)


# ----------------------------------------------------------------------------- fitting


@pytest.mark.parametrize(
    "objective,optimizer,beta",
    [("code", "adam", 1.0), ("code", "normalized", 1.0), ("paper", "adam", 0.5)],
)
def test_planted_paths_are_recovered(objective, optimizer, beta):
    net = planted_net()
    x, y = planted_data()
    cp = ClassPaths(
        objective=objective, optimizer=optimizer, beta=beta, epochs=20, batch_size=16
    ).fit(net, (x, y))
    truth = planted_truth()
    assert cp.layers_ == ["1", "3"]
    for name in cp.layers_:
        assert cp.masks_[name].shape == (K, K * M)
        assert torch.equal(cp.paths_[name], cp.masks_[name] > 0.5)
        assert jaccard_matrix(cp.paths_[name], truth).diagonal().mean() >= 0.9
    # Binary paths keep the planted network's decisions.
    assert torch.equal(cp.masked_logits(net, x, y, binary=True).argmax(1), y)
    # The similarity of disjoint planted paths is 0 off the diagonal.
    assert torch.allclose(cp.similarity(), torch.eye(K))


def test_one_pass_equals_one_class_at_a_time():
    net = planted_net()
    x, y = planted_data(n_per=12)
    for objective in ("paper", "code"):
        kw = dict(objective=objective, beta=0.5, epochs=3, batch_size=8)
        full = ClassPaths(**kw).fit(net, (x, y))
        for c in range(K):
            one = ClassPaths(classes=[c], **kw).fit(net, (x, y))
            assert one.classes_.tolist() == [c]
            for name in full.layers_:
                assert torch.allclose(one.logits_[name][0], full.logits_[name][c], atol=1e-5)


def test_hit_rate_of_planted_paths_on_composites():
    net = planted_net()
    x, y = planted_data()
    cp = ClassPaths(objective="code", beta=1.0, epochs=20).fit(net, (x, y))
    hr = cp.hit_rates(net, x, y, n_composites=12, random_state=0)
    assert isinstance(hr, HitRates) and hr.layers == ["1", "3"]
    assert hr.values.shape == (48, 2)
    assert float(hr.mean.min()) > 0.9
    binary = cp.hit_rates(net, x, y, n_composites=12, binary=True)
    assert float(binary.mean.min()) == pytest.approx(1.0)


def test_class_maps_literal():
    net = planted_net()
    x, y = planted_data(n_per=3)
    cp = ClassPaths(epochs=1, min_images=1).fit(net, (x, y))
    maps = cp.class_maps(net, x, y)
    with torch.no_grad():
        r1 = net[1](net[0](x))
        m1 = cp.masks_["1"][y][:, :, None, None]
        r3 = net[3](net[2](r1 * m1))
        m3 = cp.masks_["3"][y][:, :, None, None]
    assert torch.allclose(maps["1"], (r1 * m1).sum(1), atol=1e-6)
    assert torch.allclose(maps["3"], (r3 * m3).sum(1), atol=1e-6)


def test_fully_connected_layer_gets_1_x_D_masks():
    net = vgg_small(num_classes=4, channels=(4, 4, 8, 8), fc=(16, 12), pool_size=1).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 3, 16, 16, generator=g)
    y = torch.arange(24) % 4
    cp = ClassPaths(layers=["features.15", "fc6"], epochs=1, min_images=2).fit(net, (x, y))
    assert cp.masks_["fc6"].shape == (4, 16)
    assert cp.masks_["features.15"].shape == (4, 8)
    assert set(cp.class_maps(net, x[:2], y[:2])) == {"features.15"}  # fc has no map


def _snapshot(model):
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "flags": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad for p in model.parameters()],
        "hooks": [
            (
                list(m._forward_hooks.items()),
                list(m._forward_pre_hooks.items()),
                list(m._backward_hooks.items()),
            )
            for m in model.modules()
        ],
    }


def _assert_same(model, snap):
    state = model.state_dict()
    assert state.keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert torch.equal(state[k], v), k
    assert [m.training for m in model.modules()] == snap["modes"]
    assert [p.requires_grad for p in model.parameters()] == snap["flags"]
    assert all(p.grad is g for p, g in zip(model.parameters(), snap["grads"]))
    hooks = [
        (
            list(m._forward_hooks.items()),
            list(m._forward_pre_hooks.items()),
            list(m._backward_hooks.items()),
        )
        for m in model.modules()
    ]
    assert hooks == snap["hooks"]


def test_model_left_exactly_unchanged_also_on_error():
    torch.manual_seed(0)
    model = resnet_small(num_classes=4, channels=(4, 4, 8, 8)).train()  # BatchNorm, train mode
    model.fc.weight.requires_grad_(False)
    model.conv1.weight.grad = torch.ones_like(model.conv1.weight)
    model.layer1.register_forward_hook(lambda m, i, o: None)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 16, 16, generator=g)
    y = torch.arange(16) % 4
    snap = _snapshot(model)
    for objective in ("paper", "code"):
        ClassPaths(objective=objective, epochs=2, batch_size=8, min_images=2).fit(model, (x, y))
        _assert_same(model, snap)
    cp = ClassPaths(epochs=1, min_images=2).fit(model, (x, y))
    cp.hit_rates(model, x, y, n_composites=2)
    cp.misclassification(model, (x, y))
    _assert_same(model, snap)
    # A label out of range in the second batch raises inside the fitting loop.
    bad = [(x[:8], y[:8]), (x[8:], torch.full((8,), 9))]
    with pytest.raises(InputError, match="labels must be in"):
        ClassPaths(epochs=1, min_images=1).fit(model, bad)
    _assert_same(model, snap)


def test_data_forms_and_counts():
    net = planted_net()
    x, y = planted_data(n_per=6)
    ref = ClassPaths(epochs=2, batch_size=8, min_images=5).fit(net, (x, y))
    ds = torch.utils.data.TensorDataset(x, y)
    from_ds = ClassPaths(epochs=2, batch_size=8, min_images=5).fit(net, ds)
    loader = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)
    from_loader = ClassPaths(epochs=2, batch_size=8, min_images=5).fit(net, loader)
    for cp in (ref, from_ds, from_loader):
        assert cp.n_images_.tolist() == [6] * K
        assert cp.classes_.tolist() == list(range(K))
    # Too few images: found up front for tensors, after the first epoch for loaders.
    for data in ((x, y), loader):
        with pytest.raises(InputError, match="too few images"):
            ClassPaths(epochs=1, min_images=7).fit(net, data)
    with pytest.raises(InputError, match="one-shot iterator"):
        ClassPaths(epochs=1, min_images=1).fit(net, iter(loader))
    # A class absent from the data gets no path (warned), asking for it explicitly is an error.
    keep = y != 2
    with pytest.warns(UserWarning, match="no images"):
        part = ClassPaths(epochs=1, min_images=1).fit(net, (x[keep], y[keep]))
    assert part.classes_.tolist() == [0, 1, 3] and part.masks_["1"].shape == (3, K * M)
    with pytest.raises(InputError, match="no path"):
        part.masked_logits(net, x[:1], [2])
    with pytest.raises(InputError, match="too few images"):
        ClassPaths(classes=[1, 2], epochs=1, min_images=1).fit(net, (x[keep], y[keep]))


def test_bad_arguments():
    net = planted_net()
    x, y = planted_data(n_per=2)
    for kw, msg in [
        (dict(objective="nad"), "objective"),
        (dict(optimizer="sgd"), "optimizer"),
        (dict(beta=-1.0), "beta"),
        (dict(init=1.0), "init"),
        (dict(layers="1"), "wrap a single name"),
        (dict(classes=[9]), "out of range"),
        (dict(device="cuda"), "move the model"),
    ]:
        with pytest.raises(InputError, match=msg):
            ClassPaths(min_images=1, epochs=1, **kw).fit(net, (x, y))
    with pytest.raises(InputError, match="labels must be in"):
        ClassPaths(min_images=1).fit(net, (x, y + 10))
    with pytest.raises(NotFittedError):
        ClassPaths().similarity()


def test_save_load_roundtrip(tmp_path):
    net = planted_net()
    x, y = planted_data(n_per=4)
    cp = ClassPaths(objective="code", epochs=2, min_images=2).fit(net, (x, y))
    cp.save(tmp_path / "paths")
    back = ClassPaths.load(tmp_path / "paths")
    assert back.layers_ == cp.layers_ and torch.equal(back.classes_, cp.classes_)
    for n in cp.layers_:
        assert torch.equal(back.masks_[n], cp.masks_[n])
        assert torch.equal(back.paths_[n], cp.paths_[n])
    assert back._saved_params() == cp._saved_params()
    assert torch.equal(back.masked_logits(net, x, y), cp.masked_logits(net, x, y))
    (tmp_path / "paths.json").write_text("{}")
    with pytest.raises(Exception, match="does not describe"):
        ClassPaths.load(tmp_path / "paths")


# ----------------------------------------------------------------------------- figures


def test_path_figures(tmp_path):
    from xnn_toolkit.viz import (
        hit_rate_figure,
        information_heatmap_figure,
        path_mask_figure,
        path_similarity_figure,
        save_figure,
    )

    masks = OrderedDict(a=torch.rand(4, 6), b=torch.rand(4, 3))
    fig = path_mask_figure(masks, class_names=list("wxyz"))
    assert len([ax for ax in fig.axes if ax.images]) == 2
    fig2 = path_similarity_figure(torch.eye(4), class_names=list("wxyz"))
    assert fig2.axes[0].images[0].get_array().shape == (4, 4)
    hr = HitRates(["a", "b"], torch.tensor([0.3, 0.8]), torch.tensor([0.1, 0.05]), torch.rand(8, 2))
    fig3 = hit_rate_figure(hr)
    lines = [ln for ln in fig3.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert lines and lines[0].get_ydata()[0] == pytest.approx(0.25)
    fig4 = information_heatmap_figure(torch.rand(2, 3, 8, 8), {"a": torch.rand(2, 4, 4)})
    paths = save_figure(fig3, tmp_path / "hit", formats=("png", "svg"))
    assert all((tmp_path / p).exists() for p in paths)
    import matplotlib.pyplot as plt

    for f in (fig, fig2, fig3, fig4):
        plt.close(f)
    with pytest.raises(InputError):
        path_mask_figure({"a": torch.rand(4)})
    with pytest.raises(InputError):
        path_similarity_figure(torch.rand(3, 4))
