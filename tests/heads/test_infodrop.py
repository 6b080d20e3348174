"""Information dropout (docs/methods/infodrop.rst, Achille and Soatto 2018): literal KLs, noise,
heatmaps, TC, planted fits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from xnn_toolkit.errors import InputError, NotFittedError
from xnn_toolkit.heads.infodrop import (
    ALPHA_MAX,
    ALPHA_MIN,
    InformationDropout,
    alpha_from_logit,
    information_budget,
    information_heatmap,
    kl_log_normal,
    kl_log_uniform,
    log_normal_noise,
)
from xnn_toolkit.metrics.information import gaussian_total_correlation


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------------------- formulas


def test_alpha_range_and_formula():
    a = torch.tensor([-50.0, -1.0, 0.0, 2.0, 50.0])
    got = alpha_from_logit(a)
    for v, g in zip(a.tolist(), got.tolist()):
        assert g == pytest.approx(0.001 + 0.7 / (1 + math.exp(-v)), rel=1e-6)
    assert ALPHA_MAX == 0.7 and ALPHA_MIN == 0.001
    assert float(got.min()) >= 0.001 and float(got.max()) <= 0.701


def test_noise_is_reparametrised_log_normal():
    f = torch.rand(4, 3, 5, 5) + 0.1
    alpha = torch.full((4, 3, 1, 1), 0.4, requires_grad=True)
    z = log_normal_noise(f, alpha, torch.Generator().manual_seed(7))
    n = torch.randn(f.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(z, f * torch.exp(0.4 * n))
    z.sum().backward()
    assert torch.allclose(
        alpha.grad, (f * n * torch.exp(0.4 * n)).sum((2, 3), keepdim=True), rtol=1e-4
    )
    # log(z / f) / α is standard normal
    big = torch.ones(200_000)
    e = torch.log(log_normal_noise(big, torch.tensor(0.5), torch.Generator().manual_seed(0)))
    assert float((e / 0.5).mean()) == pytest.approx(0.0, abs=0.01)
    assert float((e / 0.5).std()) == pytest.approx(1.0, abs=0.01)


def test_kl_log_uniform_literal():
    f = torch.tensor([[0.0, 0.5, 2.0], [1.0, 0.0, 3.0]])
    alpha = torch.tensor([[0.1, 0.2, 0.7], [0.05, 0.3, 0.001]])
    got = kl_log_uniform(alpha, f)
    raw = kl_log_uniform(alpha, f, shifted=False)
    for i in range(2):
        for j in range(3):
            if f[i, j] == 0:
                assert got[i, j] == 0 and raw[i, j] == 0
            else:
                a = float(alpha[i, j])
                assert got[i, j].item() == pytest.approx(-math.log(a / 0.701), rel=1e-6, abs=1e-6)
                assert raw[i, j].item() == pytest.approx(-math.log(a), rel=1e-6)
    assert float(got.min()) >= 0
    # a per-channel alpha broadcasts over positions
    fm = torch.rand(2, 3, 4, 4)
    am = torch.tensor([0.1, 0.3, 0.6])[None, :, None, None]
    assert kl_log_uniform(am, fm).shape == (2, 3, 4, 4)
    with pytest.raises(InputError, match="after the ReLU"):
        kl_log_uniform(alpha, f - 1.0)


def test_kl_log_normal_matches_gaussian_kl():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(6, 4, generator=g) * 3 + 0.05
    alpha = torch.rand(6, 4, generator=g) * 0.7 + 0.001
    mu = torch.randn(4, generator=g)
    sigma = torch.rand(4, generator=g) + 0.2
    got = kl_log_normal(alpha, f, mu, sigma)
    # oracle: KL between the normals of log z and of the prior (KL is reparametrisation-invariant)
    ref = kl_divergence(Normal(torch.log(f), alpha), Normal(mu.expand(6, 4), sigma.expand(6, 4)))
    assert torch.allclose(got, ref, atol=1e-5)
    i, j = 2, 3
    lit = (
        (float(alpha[i, j]) ** 2 + (math.log(float(f[i, j])) - float(mu[j])) ** 2)
        / (2 * float(sigma[j]) ** 2)
        + math.log(float(sigma[j]) / float(alpha[i, j]))
        - 0.5
    )
    assert got[i, j].item() == pytest.approx(lit, rel=1e-5)
    with pytest.raises(InputError, match="strictly positive"):
        kl_log_normal(alpha, f - 10, mu, sigma)


def test_heatmap_and_budget_literal():
    g = torch.Generator().manual_seed(1)
    kl = torch.rand(2, 3, 4, 5, generator=g)
    hm = information_heatmap(kl)
    for b in range(2):
        s = [[sum(float(kl[b, c, i, j]) for c in range(3)) for j in range(5)] for i in range(4)]
        lo = min(min(r) for r in s)
        for i in range(4):
            for j in range(5):
                assert hm[b, i, j].item() == pytest.approx(s[i][j] - lo, rel=1e-5, abs=1e-6)
    assert information_heatmap(kl, size=(8, 10)).shape == (2, 8, 10)
    assert float(information_heatmap(kl, size=(8, 10)).flatten(1).min(1).values.abs().max()) == 0
    bud = information_budget(kl)
    assert bud.tolist() == pytest.approx([float(kl[0].sum()), float(kl[1].sum())], rel=1e-6)


# ----------------------------------------------------------------------------- planted fits

K, M, Q = 3, 3, 4
D = K * M + Q  # 3 classes x 3 read units, then 4 nuisance units the logits ignore


def fc_net() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, K))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(D))
        net[0].bias.fill_(-0.2)
        net[2].weight.zero_()
        net[2].bias.zero_()
        for c in range(K):
            net[2].weight[c, c * M : (c + 1) * M] = 1.0
    return net.eval()


def fc_data(n_per: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(K).repeat_interleave(n_per)
    x = torch.rand(len(y), D, generator=g) * 0.8
    x[:, K * M :] = 0.5 + torch.rand(len(y), Q, generator=g)
    for c in range(K):
        n = int((y == c).sum())
        x[y == c, c * M : (c + 1) * M] = 1.2 + 0.2 * torch.rand(n, M, generator=g)
    return x, y


@pytest.mark.parametrize("mode", ["class", "image"])
def test_planted_information_flows_through_read_units(mode):
    net = fc_net()
    x, y = fc_data()
    idr = InformationDropout(layers=["1"], mode=mode, beta=0.1, epochs=30).fit(net, (x, y))
    assert idr.priors_ == {"1": "log_uniform"}
    alpha = idr.alphas(net, x, y)["1"]
    kl = idr.kl(net, x, y)["1"]
    assert alpha.shape == kl.shape == (len(y), D)
    # Units the logits ignore carry no information: their α goes to the prior's optimum.
    assert float(alpha[:, K * M :].mean()) > 0.6
    for c in range(K):
        read = kl[y == c, : K * M].mean()
        ignored = kl[y == c, K * M :].mean()
        assert float(read) > 3 * float(ignored)
    if mode == "class":
        assert idr.alphas_["1"].shape == (K, D)
        assert torch.allclose(idr.alphas_["1"][y], alpha)
    budget = idr.information_budget(net, (x, y))
    assert budget["1"] == pytest.approx(float(kl.sum(1).mean()), rel=1e-5)


class LeftReader(nn.Module):
    """Logits read only the left half of a ReLU map; the right half is marked by channel 1."""

    S = 4

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.act = nn.ReLU()
        with torch.no_grad():
            self.conv.weight.copy_(torch.eye(2)[:, :, None, None])
            self.conv.bias.zero_()

    def forward(self, x):
        h = self.act(self.conv(x))
        left = h[:, 0, :, : self.S // 2].mean((1, 2))
        return torch.stack([8.0 * (left - 0.65), torch.zeros_like(left)], 1)


def left_data(n: int = 128, seed: int = 0):
    s = LeftReader.S
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.zeros(n, 2, s, s)
    x[:, 0] = torch.rand(n, s, s, generator=g) * 1.2
    level = torch.where(y == 0, 1.0, 0.3)[:, None, None]
    x[:, 0, :, : s // 2] = level + 0.1 * torch.rand(n, s, s // 2, generator=g)
    x[:, 1, :, s // 2 :] = 1.0
    return x, y


def test_amortised_heatmaps_localise_the_read_half():
    net = LeftReader().eval()
    x, y = left_data()
    idr = InformationDropout(mode="image", beta=0.1, epochs=20).fit(net, (x, y))
    assert idr.layers_ == ["act"]
    hm = idr.information_heatmaps(net, x)["act"]
    assert hm.shape == (len(x), 4, 4)
    assert float(hm.flatten(1).min(1).values.abs().max()) == 0
    assert float(hm[:, :, :2].mean()) > 3 * float(hm[:, :, 2:].mean())
    up = idr.information_heatmaps(net, x[:2], size=(8, 8))["act"]
    assert up.shape == (2, 8, 8)


def test_log_normal_prior_on_positive_layer_and_tc():
    net = nn.Sequential(nn.Linear(5, 6), nn.Softplus(), nn.Linear(6, 3)).eval()
    torch.manual_seed(0)
    x = torch.randn(60, 5)
    y = torch.arange(60) % 3
    idr = InformationDropout(layers=["1"], epochs=2, min_images=5).fit(net, (x, y))
    assert idr.priors_ == {"1": "log_normal"}
    with torch.no_grad():
        lf = torch.log(net[1](net[0](x)))
    assert torch.allclose(idr.prior_mu_["1"], lf.mean(0), atol=1e-5)
    assert torch.allclose(idr.prior_sigma_["1"], lf.std(0, unbiased=False), atol=1e-5)
    kl = idr.kl(net, x, y)["1"]
    ref = kl_log_normal(
        idr.alphas_["1"][y], torch.exp(lf), idr.prior_mu_["1"], idr.prior_sigma_["1"]
    )
    assert torch.allclose(kl, ref, atol=1e-5)
    tc = idr.total_correlation(net, (x, y))["1"]
    # literal: -1/2 log det(Σ0^-1 Σ) of the log-activations' covariance
    cov = np.cov(lf.double().numpy(), rowvar=False)
    lit = -0.5 * np.linalg.slogdet(np.linalg.inv(np.diag(np.diag(cov))) @ cov)[1]
    assert tc == pytest.approx(lit, rel=1e-6)
    assert tc == pytest.approx(gaussian_total_correlation(lf.double()), rel=1e-6)
    noisy = idr.total_correlation(net, (x, y), noisy=True)["1"]
    assert noisy < tc  # independent noise decorrelates


# ----------------------------------------------------------------------------- errors, safety


def test_errors():
    net = fc_net()
    x, y = fc_data(n_per=8)
    with pytest.raises(InputError, match="log-normal prior needs f"):
        InformationDropout(layers=["1"], prior="log_normal", min_images=1).fit(net, (x, y))
    with pytest.raises(InputError, match="negative activations"):
        InformationDropout(layers=["0"], min_images=1).fit(net, (x, y))  # pre-ReLU linear
    with pytest.raises(InputError, match="too few images"):
        InformationDropout(layers=["1"], min_images=9).fit(net, (x, y))
    with pytest.raises(InputError, match="init_alpha"):
        InformationDropout(init_alpha=0.9).fit(net, (x, y))
    with pytest.raises(InputError, match="mode"):
        InformationDropout(mode="pixel").fit(net, (x, y))
    with pytest.raises(NotFittedError):
        InformationDropout().kl(net, x, y)
    idr = InformationDropout(layers=["1"], epochs=1, min_images=1).fit(net, (x, y))
    with pytest.raises(InputError, match="pass labels"):
        idr.kl(net, x)
    with pytest.raises(InputError, match="pass eps"):
        idr.total_correlation(net, (x, y))


def test_model_unchanged_and_save_load(tmp_path):
    net = LeftReader().train()
    net.conv.register_forward_hook(lambda m, i, o: None)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    hooks = list(net.conv._forward_hooks.items())
    x, y = left_data(n=32)
    for mode in ("class", "image"):
        idr = InformationDropout(mode=mode, epochs=2, min_images=4).fit(net, (x, y))
        assert net.training and net.conv.training
        assert all(p.requires_grad and p.grad is None for p in net.parameters())
        assert list(net.conv._forward_hooks.items()) == hooks
        assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
        idr.save(tmp_path / mode)
        back = InformationDropout.load(tmp_path / mode)
        assert back.priors_ == idr.priors_ and back._saved_params() == idr._saved_params()
        a, b = idr.kl(net, x, y), back.kl(net, x, y)
        assert torch.equal(a["act"], b["act"])
