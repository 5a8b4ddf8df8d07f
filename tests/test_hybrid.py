"Tests of vqlearn.hybrid: the three hybrid quantizers, the S = K identity, the projection's Jacobian, the hybrid prior's exact likelihood and its samplers."
import math
import pytest, torch
import torch.nn.functional as F
from vqlearn.hybrid import (ProjectedVQ, FrequencyMaskedVQ, ProjectedFrequencyVQ, HybridPixelCNN, project, projected_latent,
                            logistic_mixture_logprob, sample_logistic_mixture, round_to, fit_hybrid_prior,
                            evaluate_hybrid_nll, hybrid_parts, decode_parts, gaussian_bits)
from vqlearn.quantize import VectorQuantizer, VectorQuantizerEMA
from vqlearn.vqvae import VQVAE
from vqlearn.vqvae2 import VQVAE2

M = dict(hidden=16, res_hidden=8, n_res=1, num_codes=16, dim=8)


def _train_twins(qa, qb, steps=5):
    "Train two VQ-VAEs built from the same random state with quantizers qa() and qb(); return per-step outputs and gradients."
    out = []
    for make in (qa, qb):
        torch.manual_seed(0); m = VQVAE(**M, quantizer=make()); opt = torch.optim.Adam(m.parameters(), 1e-3)
        x = torch.rand(steps, 4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
        rec = []
        for s in range(steps):
            torch.manual_seed(s); xh, q = m(x[s]); loss = F.mse_loss(xh, x[s]) + q.loss
            opt.zero_grad(); loss.backward(); rec.append((xh.detach(), loss.detach(), [p.grad.clone() for p in m.parameters()]))
            opt.step()
        out.append(rec)
    return out


@pytest.mark.parametrize('codebook', ['ema', 'plain'])
def test_keep_all_codes_is_the_plain_vqvae(codebook):
    "S = K: bit-identical outputs, losses and gradients to the VQ-VAE with the same inner quantizer, step after step."
    inner = (lambda: VectorQuantizerEMA(16, 8, 0.25, 0.99, kmeans_init=True, restart_after=20)) if codebook == 'ema' else \
            (lambda: VectorQuantizer(16, 8, 0.25, kmeans_init=True, restart_after=20))
    a, b = _train_twins(inner, lambda: FrequencyMaskedVQ(16, 8, keep_top=16, codebook=codebook))
    for (xa, la, ga), (xb, lb, gb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(la, lb) and all(torch.equal(g, h) for g, h in zip(ga, gb))


def test_keep_fewer_codes_changes_the_model():
    "S < K is a different model (the test above could not pass by ignoring keep_top)."
    a, b = _train_twins(lambda: VectorQuantizerEMA(16, 8, 0.25, 0.99, kmeans_init=True, restart_after=20),
                        lambda: FrequencyMaskedVQ(16, 8, keep_top=4))
    assert not torch.equal(a[-1][0], b[-1][0])


def test_projection_properties_and_jacobian():
    g = torch.Generator().manual_seed(0)
    z, e = torch.randn(3, 6, 2, 2, dtype=torch.float64, generator=g), torch.randn(3, 6, 2, 2, dtype=torch.float64, generator=g)
    alpha, p = project(z, e)
    assert torch.allclose(F.cosine_similarity(p, e, dim=1).abs(), torch.ones(3, 2, 2, dtype=torch.float64))
    assert torch.allclose(project(e, e)[1], e) and torch.allclose(alpha, (z * e).sum(1) / e.pow(2).sum(1))
    # the stable form's Jacobian is the projection matrix e e^T / |e|^2 at each position (autograd vs the formula)
    z0, e0 = z[0, :, 0, 0], e[0, :, 0, 0]
    f = lambda v: projected_latent(v.view(1, 6, 1, 1), (v + (e0 - v).detach()).view(1, 6, 1, 1), True)[1].view(6)
    J = torch.autograd.functional.jacobian(f, z0)
    assert torch.allclose(J, torch.outer(e0, e0) / e0.dot(e0), atol=1e-12)
    # the report's form (projection onto the straight-through z_q) blows up like 1/|e|
    f2 = lambda s: lambda v: projected_latent(v.view(1, 6, 1, 1), (v + (s * e0 - v).detach()).view(1, 6, 1, 1), False)[1].view(6)
    n1, n2 = (float(torch.linalg.matrix_norm(torch.autograd.functional.jacobian(f2(s), z0), 2)) for s in (1.0, 1e-3))
    assert n2 > 300 * n1
    with pytest.raises(ValueError, match='shape'): project(z, e[:, :3])


@pytest.mark.parametrize('make', [lambda: ProjectedVQ(16, 8), lambda: FrequencyMaskedVQ(16, 8, keep_top=5),
                                  lambda: ProjectedFrequencyVQ(16, 8, keep_top=5)])
def test_compose_rebuilds_the_latent(make):
    "compose(codes, part) gives back the hybrid latent of the forward pass; kept positions hold the code vectors."
    torch.manual_seed(0); q = make()
    z_e = torch.randn(2, 8, 4, 4)
    q.train(); q(z_e); q(torch.randn(2, 8, 4, 4))                      # k-means start and a frequency table
    q.eval(); out = q(z_e)
    assert torch.allclose(q.compose(out.codes, out.extra[q.part]), out.z_q, atol=1e-5)
    if 'mask' in out.extra:
        Mk = out.extra['mask']
        assert 0 < Mk.float().mean() < 1
        assert torch.equal(Mk, q.kept_codes()[out.codes]) and int(q.kept_codes().sum()) == 5
        e = q.lookup(out.codes)
        assert torch.allclose(out.z_q.movedim(1, -1)[Mk], e.movedim(1, -1)[Mk], atol=1e-5)
    if q.part == 'alpha':
        assert out.extra['proj_loss'] >= 0 and out.loss > 0


def test_projected_loss_pulls_alpha_to_one():
    "The projection loss is (alpha - 1)^2 |e|^2 / D: zero exactly when z_e's component along its code equals the code."
    q = ProjectedVQ(4, 3, codebook='plain', kmeans_init=False, restart_after=None)
    with torch.no_grad(): q.vq.embedding.copy_(torch.tensor([[1., 0, 0], [0, 2, 0], [0, 0, 3], [5, 5, 5]]))
    out = q(torch.tensor([0., 2, 0.7]).view(1, 3, 1, 1))               # nearest code 1, component along it = the code
    assert int(out.codes) == 1 and abs(float(out.extra['alpha']) - 1) < 1e-6 and float(out.extra['proj_loss']) < 1e-12
    out = q(torch.tensor([0., 3, 0]).view(1, 3, 1, 1))                 # alpha = 6 / 4
    assert int(out.codes) == 1 and math.isclose(float(out.extra['alpha']), 1.5, rel_tol=1e-6)
    assert math.isclose(float(out.extra['proj_loss']), 0.5 ** 2 * 4 / 3, rel_tol=1e-5)


def test_errors_and_checkpoints(tmp_path):
    with pytest.raises(ValueError, match='keep_top'): FrequencyMaskedVQ(16, 8, keep_top=17)
    with pytest.raises(ValueError, match='codebook'): ProjectedVQ(16, 8, codebook='sparse')
    q = ProjectedVQ(16, 8)
    with pytest.raises(ValueError, match='alpha'): q.compose(torch.zeros(1, 2, 2, dtype=torch.long), torch.ones(1, 2, 3))
    torch.manual_seed(0); m = VQVAE(**M, quantizer=ProjectedFrequencyVQ(16, 8, keep_top=6))
    x = torch.rand(4, 3, 32, 32)
    m.train(); m(x); m(torch.rand(4, 3, 32, 32)); m.eval()
    m.save(tmp_path / 'm.safetensors')
    m2 = VQVAE.from_checkpoint(tmp_path / 'm.safetensors')
    assert type(m2.quantizer) is ProjectedFrequencyVQ and m2.quantizer.keep_top == 6
    assert torch.equal(m2.quantizer.kept_codes(), m.quantizer.kept_codes())
    assert torch.equal(m2(x)[0], m(x)[0])


def test_plugs_into_vqvae2():
    torch.manual_seed(0)
    m = VQVAE2(hidden=16, res_hidden=8, n_res=1, n_res_top=0, num_codes_top=8, num_codes_bottom=16, dim=8,
               quantizer={'top': 'ema_restart', 'bottom': ProjectedVQ(16, 8)})
    xh, qs = m(torch.rand(2, 3, 32, 32))
    assert xh.shape == (2, 3, 32, 32) and qs['bottom'].extra['alpha'].shape == (2, 8, 8)
    (F.mse_loss(xh, torch.rand(2, 3, 32, 32)) + qs['bottom'].loss).backward()
    assert m.encoder_bottom[0].weight.grad.abs().sum() > 0


def test_logistic_mixture_is_normalised_and_matches_the_cdf():
    g = torch.Generator().manual_seed(0)
    params = torch.randn(1, 6, dtype=torch.float64, generator=g)
    w = 0.1
    grid = torch.arange(-2000, 2000, dtype=torch.float64) * w
    total = logistic_mixture_logprob(grid, params.expand(len(grid), 6), w).exp().sum()
    assert abs(float(total) - 1) < 1e-6
    pi, mu, ls = params[0].chunk(3)
    x = torch.tensor([0.3], dtype=torch.float64)
    ref = (pi.softmax(0) * (torch.sigmoid((x + w / 2 - mu) / ls.exp()) - torch.sigmoid((x - w / 2 - mu) / ls.exp()))).sum()
    assert torch.allclose(logistic_mixture_logprob(x, params, w).exp(), ref[None])
    u = torch.rand(100_000, 2, dtype=torch.float64, generator=g)
    s = sample_logistic_mixture(params.expand(len(u), 6), u)
    want = float((pi.softmax(0) * torch.sigmoid((0.3 - mu) / ls.exp())).sum())
    assert abs(float((s <= 0.3).double().mean()) - want) < 6e-3
    with pytest.raises(ValueError, match='params'): logistic_mixture_logprob(x, params[:, :5], w)


def _prior(**kw):
    torch.manual_seed(0)
    net = HybridPixelCNN(5, width=8, n_layers=2, **{**dict(loc=1.0, scale=0.5, precision=0.05), **kw}).double()
    for p in net.parameters(): p.data.normal_(0, 0.4)
    return net


def test_hybrid_prior_likelihood_is_exact():
    "On a 1 x 2 map the probabilities of every (code, bin) pair, over a wide grid, add up to one."
    net = _prior(scalar_codes=[1, 3], precision=1.0)                    # unit bins: a grid this wide holds all the mass
    grid = torch.arange(-60, 64, dtype=torch.float64)                   # alpha in [-60, 64): (alpha - 1) / 0.5 in [-122, 126)
    total = 0.0
    for c0 in range(5):
        a0s = grid if c0 in (1, 3) else torch.zeros(1, dtype=torch.float64)
        for c1 in range(5):
            a1s = grid if c1 in (1, 3) else torch.zeros(1, dtype=torch.float64)
            A0, A1 = torch.meshgrid(a0s, a1s, indexing='ij')
            codes = torch.tensor([c0, c1]).view(1, 1, 2).expand(A0.numel(), 1, 2)
            alphas = torch.stack([A0.flatten(), A1.flatten()], -1).view(-1, 1, 2)
            with torch.no_grad(): c, s = net.nll_terms(codes, alphas)
            total += float((-(c + s).sum((1, 2))).exp().sum())
    assert abs(total - 1) < 1e-6, total   # the mass outside the grid: < 1e-8 for ten random nets (seeds 0-9)


def test_hybrid_prior_samplers_agree_and_errors():
    net = _prior(n_classes=2, scalar_codes=[0, 2, 4])
    lab = torch.tensor([0, 1, 1])
    for T in (1.0, 0.5):
        a = net.sample((3, 3, 4), lab, temperature=T, generator=torch.Generator().manual_seed(2), method='naive')
        b = net.sample((3, 3, 4), lab, temperature=T, generator=torch.Generator().manual_seed(2), method='fast')
        assert torch.equal(a[0], b[0]) and torch.allclose(a[1], b[1], atol=1e-9)
    assert (b[1][b[0] % 2 == 1] == 0).all() and torch.allclose(b[1], round_to(b[1], 0.05))
    with pytest.raises(ValueError, match='alphas'): net(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3))
    with pytest.raises(TypeError, match='codes'): net(torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match='scalar_codes'): HybridPixelCNN(5, width=8, n_layers=1, scalar_codes=[7])


def test_hybrid_prior_learns_the_scalar_given_the_code():
    "alpha = 1 + 0.2 * code exactly: after training, the scalar costs far fewer nats than under the untrained model."
    torch.manual_seed(0)
    codes = torch.randint(0, 4, (256, 3, 3))
    alphas = 1 + 0.2 * codes.double() + 0.01 * torch.randn(256, 3, 3, dtype=torch.float64)
    net = HybridPixelCNN(4, width=16, n_layers=2, loc=1.3, scale=0.25, precision=0.02).double()
    before = evaluate_hybrid_nll(net, codes, alphas)
    fit_hybrid_prior(net, codes, alphas, steps=300, batch_size=64, lr=5e-3, progress=False, log_every=100)
    after = evaluate_hybrid_nll(net, codes, alphas)
    assert after['scalar'] < before['scalar'] - 1.0 and after['code'] < math.log(4) + 0.05
    with torch.no_grad(): c, s = net.nll_terms(codes, alphas)
    assert math.isclose(after['bits'], float((c + s).sum()) / 256 / math.log(2), rel_tol=1e-6)


def test_parts_decode_and_gaussian_bits():
    torch.manual_seed(0)
    m = VQVAE(**M, quantizer=ProjectedVQ(16, 8)).eval()
    x = torch.rand(5, 3, 32, 32)
    d = hybrid_parts(m, x)
    assert d['codes'].shape == (5, 8, 8) and d['alpha'].shape == (5, 8, 8)
    assert torch.allclose(decode_parts(m, d['codes'], d['alpha']), m(x)[0].detach(), atol=1e-5)
    r = torch.randn(1000, 3, dtype=torch.float64)
    sigma = torch.ones(3)
    b_fine, r_hat = gaussian_bits(r, sigma, torch.full((3,), 1e-3))
    ref = -(torch.distributions.Normal(0.0, 1.0).log_prob(r_hat).sum(1) + 3 * math.log(1e-3)) / math.log(2)
    assert torch.allclose(b_fine.double(), ref, atol=1e-2)
    assert gaussian_bits(r, sigma, torch.full((3,), 0.5))[0].mean() < b_fine.mean() - 20
