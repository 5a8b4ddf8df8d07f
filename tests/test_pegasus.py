"Tests of vqlearn.pegasus: label mixing, soft labels, mixed priors, scoring."
import math
import pytest, torch
from vqlearn.pegasus import (mix_labels, MixLabels, fit_mixed_prior, fit_mixed_prior2, soft_labels, draw, nearest_distance,
                             realness_threshold, pegasus_scores)
from vqlearn.pixelcnn import GatedPixelCNN
from vqlearn.vqvae import VQVAE
from vqlearn.vqvae2 import VQVAE2, HierarchicalPrior
from vqlearn.judge import Judge


def test_mix_labels_rate_and_only_switches():
    y = torch.arange(20000) % 2
    m = mix_labels(y, 0.075, 2, torch.Generator().manual_seed(0))
    assert abs((m == 2).float().mean().item() - 0.075) < 4 * math.sqrt(0.075 * 0.925 / len(y))
    assert torch.equal(m[m != 2], y[m != 2])
    assert torch.equal(mix_labels(y, 0.3, 2, torch.Generator().manual_seed(1)), mix_labels(y, 0.3, 2, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match=r'\[0, 1\]'): mix_labels(y, 1.5, 2)
    with pytest.raises(TypeError): mix_labels(y.float(), 0.5, 2)


def test_mix_labels_transform_touches_only_the_labels():
    codes = torch.randint(5, (64, 4, 4))
    tfm = MixLabels(1.0, 7, index=1)
    c2, l2 = tfm((codes, torch.zeros(64, dtype=torch.long)))
    assert c2 is codes and (l2 == 7).all()
    top, bottom, l3 = MixLabels(0.0, 7, index=2)((codes, codes, torch.ones(64, dtype=torch.long)))
    assert (l3 == 1).all()


def test_mixed_prior_learns_the_mixture():
    "Class 0 maps use codes 0-3, class 1 codes 4-7: the real classes stay pure, the mixed class draws from both."
    g = torch.Generator().manual_seed(0)
    y = torch.randint(2, (1000,), generator=g)
    maps = torch.randint(4, (1000, 4, 4), generator=g) + 4 * y[:, None, None]
    prior, hist = fit_mixed_prior(maps, y, 8, 0.3, 2, width=16, n_layers=2, steps=250, batch_size=32, lr=1e-2)
    assert prior.n_classes == 3 and hist['loss'][-1] < hist['loss'][0]
    share = [(prior.sample((300, 4, 4), labels=torch.full((300,), c), generator=torch.Generator().manual_seed(c)) < 4)
             .float().mean().item() for c in range(3)]
    assert share[0] > 0.95 and share[1] < 0.05 and 0.2 < share[2] < 0.8
    p0, _ = fit_mixed_prior(maps, y, 8, 0.0, 2, width=16, n_layers=2, steps=5, batch_size=32)
    with pytest.raises(ValueError, match=r'\[0, 2\)'): fit_mixed_prior(maps, y + 1, 8, 0.1, 2, steps=1)


def test_soft_labels_at_the_ends_equal_hard_labels():
    torch.manual_seed(0)
    prior = GatedPixelCNN(8, 16, 2, n_classes=3)
    for layer in prior.layers: torch.nn.init.normal_(layer.class_embed.weight)  # make the classes differ
    for lam, c in [(1.0, 0), (0.0, 1)]:
        hard = prior.sample((5, 4, 4), labels=torch.full((5,), c), generator=torch.Generator().manual_seed(2))
        soft = prior.sample((5, 4, 4), labels=soft_labels(lam, 5, 3), generator=torch.Generator().manual_seed(2))
        assert torch.equal(hard, soft)
    s = soft_labels(torch.tensor([0.0, 0.25, 1.0]), 3, 3)
    assert torch.allclose(s, torch.tensor([[0, 1, 0], [0.25, 0.75, 0], [1, 0, 0.]]))
    with pytest.raises(ValueError): soft_labels(1.5, 3)
    with pytest.raises(ValueError): soft_labels(torch.tensor([0.5, 0.5]), 3)


def test_draw_dispatches_on_the_prior():
    torch.manual_seed(0)
    vq = VQVAE(hidden=16, res_hidden=8, n_res=1, num_codes=8, dim=8).eval()
    prior = GatedPixelCNN(8, 8, 1, n_classes=3)
    x = draw(prior, vq, torch.tensor([0, 2]), generator=torch.Generator().manual_seed(0), image_size=16)
    assert x.shape == (2, 3, 16, 16) and 0 <= x.min() and x.max() <= 1
    vq2 = VQVAE2(hidden=16, res_hidden=8, n_res=1, num_codes_top=6, num_codes_bottom=8, dim=8).eval()
    hp = HierarchicalPrior(6, 8, 3, width=8, n_layers=1, cond_channels=4)
    x2 = draw(hp, vq2, soft_labels(0.5, 3, 3), generator=torch.Generator().manual_seed(0))
    assert x2.shape == (3, 3, 32, 32)
    maps = {'top': torch.randint(6, (40, 2, 2)), 'bottom': torch.randint(8, (40, 4, 4))}
    p2, _ = fit_mixed_prior2(maps, torch.arange(40) % 2, {'top': 6, 'bottom': 8}, 0.5, 2, width=8, n_layers=1, steps=3, batch_size=8)
    assert isinstance(p2, HierarchicalPrior) and p2.n_classes == 3


def test_nearest_distance_and_threshold_match_brute_force():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 6, generator=g), torch.randn(70, 6, generator=g)
    want = torch.tensor([min(float((x - y).norm()) for y in b) for x in a])
    assert torch.allclose(nearest_distance(a, b, batch_size=7), want, atol=1e-5)
    t = realness_threshold(b, a, q=0.5)
    assert math.isclose(t, float(want.quantile(0.5)), rel_tol=1e-5)


def test_pegasus_scores_balance_and_pass():
    torch.manual_seed(0)
    judge = Judge(3, widths=(4, 8, 8)).eval()
    x = torch.rand(10, 3, 32, 32)
    real = torch.randn(20, judge.head.in_features)
    s = pegasus_scores(judge, x, real, max_distance=1e9, pair=(0, 2), min_balance=0.0)
    assert torch.allclose(s['p_a'] + s['p_b'], torch.ones(10)) and s['passed'].all()
    assert torch.allclose(s['balance'], torch.minimum(s['p_a'], s['p_b']) / torch.maximum(s['p_a'], s['p_b']))
    none = pegasus_scores(judge, x, real, max_distance=0.0, pair=(0, 2))
    assert not none['passed'].any()

def test_blend_pairs_ends_midpoints_and_errors():
    "blend_pairs decodes the posterior means at t = 0 and 1, the lerp / slerp midpoint in between, and checks its input."
    from vqlearn.pegasus import blend_pairs
    from vqlearn.vae import ConvVAE
    torch.manual_seed(0)
    vae = ConvVAE(32, latent_dim=8, width=4).eval()
    xa, xb = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8), torch.rand(5, 3, 32, 32)
    with torch.no_grad():
        ma, mb = vae.encode(xa.float() / 255)[0], vae.encode(xb)[0]                 # (5, 8) posterior means
        for t, z in [(0.0, ma), (1.0, mb), (0.5, (ma + mb) / 2)]:
            torch.testing.assert_close(blend_pairs(vae, xa, xb, t, 'lerp'), vae.decode(z), atol=1e-5, rtol=1e-4)
        s = blend_pairs(vae, xa, xb, 0.5, 'slerp', batch_size=2)                     # in batches of 2: the same
        cos = (ma * mb).sum(1) / (ma.norm(dim=1) * mb.norm(dim=1))
        w = torch.sin(0.5 * torch.arccos(cos)) / torch.sin(torch.arccos(cos))       # slerp weights at t = 0.5
        torch.testing.assert_close(s, vae.decode(w[:, None] * (ma + mb)), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="'lerp' or 'slerp'"): blend_pairs(vae, xa, xb, 0.5, 'cubic')
    with pytest.raises(ValueError, match='one shape'): blend_pairs(vae, xa, xb[:4], 0.5)
    with pytest.raises(ValueError, match=r'\[0, 1\]'): blend_pairs(vae, xa, xb, 1.5)
