"Tests for vqlearn.elbo: closed-form and sampled KL, likelihoods, the ELBO and the IWAE bound."
import math
import pytest
import torch
from torch.distributions import Normal, Bernoulli, MultivariateNormal, kl_divergence
from vqlearn.elbo import (gaussian_kl, gaussian_kl_per_dim, reparameterize, std_normal_log_prob, diag_gaussian_log_prob,
                          mc_kl, gaussian_log_lik, bernoulli_log_lik, elbo, iwae_bound)

torch.set_num_threads(1)
f64 = dict(dtype=torch.float64)


def test_gaussian_kl_matches_torch():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(32, 10, generator=g), torch.randn(32, 10, generator=g)
    ref = kl_divergence(Normal(mu, (0.5 * logvar).exp()), Normal(0.0, 1.0)).sum(-1)
    kl = gaussian_kl(mu, logvar)
    assert kl.shape == (32,)
    assert torch.allclose(kl, ref, atol=1e-5)
    assert torch.allclose(gaussian_kl_per_dim(mu, logvar).sum(-1), kl)
    assert torch.allclose(gaussian_kl(torch.zeros(4, 3), torch.zeros(4, 3)), torch.zeros(4))


@pytest.mark.parametrize('mu,logvar', [(torch.zeros(3, 4), torch.zeros(3, 5)), (torch.zeros(4), torch.zeros(4))])
def test_gaussian_kl_bad_shapes(mu, logvar):
    with pytest.raises(ValueError):
        gaussian_kl(mu, logvar)


def test_gaussian_kl_bad_type():
    with pytest.raises(TypeError):
        gaussian_kl([[0.0]], torch.zeros(1, 1))


def test_reparameterize_moments_and_gradients():
    torch.manual_seed(0)
    mu, logvar = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[0.0, math.log(4.0), math.log(0.01)]])
    z = reparameterize(mu, logvar, n=100_000)
    assert z.shape == (100_000, 1, 3)
    assert torch.allclose(z.mean(0), mu, atol=0.03)
    assert torch.allclose(z.std(0), torch.tensor([[1.0, 2.0, 0.1]]), atol=0.03)
    mu_, lv_ = mu.clone().requires_grad_(), logvar.clone().requires_grad_()
    zz = reparameterize(mu_, lv_)
    assert zz.shape == mu.shape
    zz.sum().backward()
    assert torch.equal(mu_.grad, torch.ones_like(mu)) and lv_.grad is not None
    with pytest.raises(ValueError):
        reparameterize(mu, logvar, n=0)


def test_log_probs_and_mc_kl():
    torch.manual_seed(1)
    z, mu, lv = torch.randn(7, 4), torch.randn(7, 4), torch.randn(7, 4)
    assert torch.allclose(std_normal_log_prob(z), Normal(0.0, 1.0).log_prob(z).sum(-1), atol=1e-5)
    assert torch.allclose(diag_gaussian_log_prob(z, mu, lv), Normal(mu, (0.5 * lv).exp()).log_prob(z).sum(-1), atol=1e-4)
    mu, lv = torch.randn(3, 5, **f64), 0.3 * torch.randn(3, 5, **f64)
    est = mc_kl(reparameterize(mu, lv, n=200_000), mu, lv).mean(0)      # (3,)
    assert torch.allclose(est, gaussian_kl(mu, lv), atol=0.05)
    with pytest.raises(ValueError):
        mc_kl(torch.randn(10, 3, 4), mu, lv)


def test_likelihoods_match_torch():
    torch.manual_seed(2)
    x, m = torch.rand(3, 2, 4, 4), torch.rand(3, 2, 4, 4)
    assert torch.allclose(gaussian_log_lik(x, m, 0.2), Normal(m, 0.2).log_prob(x).flatten(1).sum(1), atol=1e-4)
    xb, lg = (torch.rand(3, 1, 4, 4) > 0.5).float(), torch.randn(3, 1, 4, 4)
    assert torch.allclose(bernoulli_log_lik(xb, lg), Bernoulli(logits=lg).log_prob(xb).flatten(1).sum(1), atol=1e-5)
    with pytest.raises(ValueError):
        gaussian_log_lik(x, m[:, :1])
    with pytest.raises(ValueError):
        gaussian_log_lik(x, m, sigma=0.0)
    with pytest.raises(ValueError):
        bernoulli_log_lik(x, m[:2])


class _LinGauss:
    "z ~ N(0, I_d), x|z ~ N(W z + b, s^2 I): exact evidence and posterior."
    def __init__(self, W, b, s): self.W, self.b, self.s = W, b, s
    def log_lik(self, x, z): return gaussian_log_lik(x, z @ self.W.T + self.b, self.s)
    def log_px(self, x):
        cov = self.W @ self.W.T + self.s ** 2 * torch.eye(self.W.shape[0], **f64)
        return MultivariateNormal(self.b, cov).log_prob(x)
    def posterior(self, x):
        cov = torch.linalg.inv(torch.eye(self.W.shape[1], **f64) + self.W.T @ self.W / self.s ** 2)
        return (x - self.b) @ self.W @ cov / self.s ** 2, cov


def _model(orthogonal: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(6, 3, generator=g, **f64)
    if orthogonal: W = torch.linalg.qr(W)[0] * torch.tensor([2.0, 1.0, 0.5], **f64)
    return _LinGauss(W, torch.randn(6, generator=g, **f64), 0.5), g


def test_elbo_is_a_bound_with_gap_kl():
    torch.manual_seed(3)
    lg, g = _model(orthogonal=False)
    x = torch.randn(16, 6, **f64)
    mu, lv = torch.randn(16, 3, **f64), torch.randn(16, 3, **f64)
    est = elbo(x, lambda x: (mu, lv), lg.log_lik, n=20_000)           # (16,)
    pm, pc = lg.posterior(x)
    gap = kl_divergence(MultivariateNormal(mu, torch.diag_embed(lv.exp())), MultivariateNormal(pm, pc))
    assert torch.allclose(est, lg.log_px(x) - gap, rtol=0.02, atol=0.2)  # ELBO = log p(x) - KL(q || posterior)
    assert (est < lg.log_px(x)).all()
    out, rec, kl = elbo(x, lambda x: (mu, lv), lg.log_lik, n=4, terms=True)
    assert torch.allclose(out, rec - kl) and torch.allclose(kl, gaussian_kl(mu, lv))


def test_tight_at_posterior_and_iwae():
    torch.manual_seed(4)
    lg, _ = _model(orthogonal=True)
    x = torch.randn(8, 6, **f64)
    pm, pc = lg.posterior(x)
    enc = lambda x: (pm, torch.diagonal(pc).log().expand_as(pm))
    assert torch.allclose(elbo(x, enc, lg.log_lik, kl='mc'), lg.log_px(x), atol=1e-9)
    assert torch.allclose(iwae_bound(x, enc, lg.log_lik, k=5, chunk=2), lg.log_px(x), atol=1e-9)
    bad = lambda x: (pm + 1.0, torch.diagonal(pc).log().expand_as(pm))
    l1 = torch.stack([iwae_bound(x, bad, lg.log_lik, k=1) for _ in range(400)]).mean(0)
    l64 = torch.stack([iwae_bound(x, bad, lg.log_lik, k=64) for _ in range(400)]).mean(0)
    assert (l1 < l64).all() and (l64 < lg.log_px(x) + 0.01).all()
    # k = 1 is the one-sample ELBO with the sampled KL (same random numbers)
    torch.manual_seed(5); a = iwae_bound(x, bad, lg.log_lik, k=1)
    torch.manual_seed(5); b = elbo(x, bad, lg.log_lik, kl='mc')
    assert torch.allclose(a, b)


def test_elbo_iwae_bad_inputs():
    lg, _ = _model(orthogonal=False)
    x = torch.randn(4, 6, **f64)
    enc = lambda x: (torch.zeros(4, 3, **f64), torch.zeros(4, 3, **f64))
    with pytest.raises(ValueError): iwae_bound(x, enc, lg.log_lik, k=0)
    with pytest.raises(ValueError): elbo(x, enc, lg.log_lik, kl='exact')
    with pytest.raises(TypeError): elbo(x, lambda x: torch.zeros(4, 3), lg.log_lik)
    with pytest.raises(ValueError): elbo(x, lambda x: (torch.zeros(5, 3), torch.zeros(5, 3)), lg.log_lik)
    with pytest.raises(ValueError): elbo(x, enc, lambda x, z: torch.zeros(len(x), 2))
