"Tests for vqlearn.vae: the ConvVAE's shapes and layers, its loss, metrics, interpolation and a tiny training run."
import math
import pytest
import torch
import torch.nn as nn
from vqlearn.elbo import gaussian_kl, gaussian_log_lik
from vqlearn.vae import (ConvVAE, VAEOutput, VAELoss, VAE_STAGES, evaluate_vae, lerp, slerp, interpolate, saturation,
                         compare_losses)

torch.set_num_threads(1)


@pytest.mark.parametrize('size,latent,fmap', [(32, 128, 4), (64, 64, 4), (96, 1024, 3)])
def test_shapes_per_size(size, latent, fmap):
    torch.manual_seed(0)
    m = ConvVAE(size, latent, width=4).eval()
    x = torch.rand(2, 3, size, size)
    mu, logvar = m.encode(x)
    assert mu.shape == logvar.shape == (2, latent)
    assert m.fmap == fmap
    out = m(x)
    assert isinstance(out, VAEOutput) and out.x_hat.shape == x.shape and out.z.shape == (2, latent)
    xh = m.decode(torch.randn(5, latent) * 10)
    assert xh.shape == (5, 3, size, size) and xh.min() >= 0 and xh.max() <= 1
    assert m.sample(4).shape == (4, 3, size, size)


def test_architecture_follows_seed():
    m = ConvVAE(96, 1024, width=8)
    convs = [l for l in m.encoder.modules() if isinstance(l, nn.Conv2d)]
    assert len(convs) == VAE_STAGES[96] == 5
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) for c in convs)
    assert sum(isinstance(l, nn.BatchNorm2d) for l in m.encoder.modules()) == 5
    assert sum(isinstance(l, nn.LeakyReLU) for l in m.encoder.modules()) == 5
    assert isinstance(m.fc_mu, nn.Linear) and isinstance(m.fc_logvar, nn.Linear) and m.fc_mu.out_features == 1024
    assert isinstance(m.fc_dec, nn.Linear) and m.fc_dec.in_features == 1024
    deconvs = [l for l in m.decoder.modules() if isinstance(l, nn.ConvTranspose2d)]
    assert len(deconvs) == 5 and all(d.kernel_size == (4, 4) and d.stride == (2, 2) for d in deconvs)


def test_grey_images():
    m = ConvVAE(32, 8, channels=1, width=4)
    assert m(torch.rand(3, 1, 32, 32)).x_hat.shape == (3, 1, 32, 32)


@pytest.mark.parametrize('size', [16, 28, 48, 128, '32'])
def test_bad_sizes(size):
    with pytest.raises(ValueError, match='32, 64 or 96'):
        ConvVAE(size)


def test_bad_inputs():
    m = ConvVAE(32, 8, width=4)
    with pytest.raises(ValueError): m.encode(torch.rand(2, 3, 64, 64))
    with pytest.raises(ValueError): m.encode(torch.rand(3, 32, 32))
    with pytest.raises(ValueError): m.encode(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError): m.decode(torch.randn(2, 9))
    with pytest.raises(ValueError): ConvVAE(32, 0)


def test_loss_is_negative_elbo_and_warmup():
    torch.manual_seed(1)
    m = ConvVAE(32, 8, width=4)
    x = torch.rand(4, 3, 32, 32)
    out = m(x)
    sigma, D = 0.2, 3 * 32 * 32
    res = VAELoss(mse=1 / (2 * sigma ** 2))(out, x)
    nelbo = -(gaussian_log_lik(x, out.x_hat, sigma) - gaussian_kl(out.mu, out.logvar)).mean()
    assert torch.allclose(res['loss'] * D + D * (math.log(sigma) + 0.5 * math.log(2 * math.pi)), nelbo, rtol=1e-5)
    assert torch.allclose(res['kl'], gaussian_kl(out.mu, out.logvar).mean())
    lw = VAELoss(beta=2.0, warmup=10)
    assert [lw.kl_weight(s) for s in (0, 5, 10, 20)] == [0.0, 1.0, 2.0, 2.0]
    assert VAELoss(beta=0.5).kl_weight(0) == 0.5
    # the warm-up counter advances only on training steps
    crit = VAELoss(warmup=10)
    m.train(); crit.step_fn(m, (x, None)); crit.step_fn(m, x)
    m.eval(); r = crit.step_fn(m, (x, None))
    assert crit.step == 2 and torch.isclose(r['beta'], torch.tensor(0.2))


def test_loss_terms_and_gradients():
    torch.manual_seed(2)
    m = ConvVAE(32, 8, width=4)
    x = torch.rand(4, 3, 32, 32)
    r = VAELoss(mse=0, bce=1, ssim=2, colour=3)(m(x), x)
    assert set(r) == {'loss', 'kl', 'mse', 'bce', 'ssim', 'colour'} and all(v.ndim == 0 for v in r.values())
    r['loss'].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


@pytest.mark.parametrize('kw', [dict(mse=-1.0), dict(mse=0.0), dict(beta=-1.0), dict(warmup=-5)])
def test_loss_bad_args(kw):
    with pytest.raises(ValueError): VAELoss(**kw)


def test_lerp_slerp():
    torch.manual_seed(3)
    z0, z1 = torch.randn(128), torch.randn(128)
    ts = torch.linspace(0, 1, 9)[:, None]
    zs, zl = slerp(z0, z1, ts), lerp(z0, z1, ts)
    assert torch.allclose(zs[0], z0, atol=1e-5) and torch.allclose(zs[-1], z1, atol=1e-5)
    assert torch.allclose(zl[4], (z0 + z1) / 2)
    assert zs.norm(dim=-1).min() > 0.95 * min(z0.norm(), z1.norm())
    assert zl.norm(dim=-1)[4] < 0.8 * min(z0.norm(), z1.norm())
    # on the unit circle slerp moves at constant angular speed
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(a, b, 0.5), torch.tensor([math.sqrt(0.5), math.sqrt(0.5)]), atol=1e-6)
    assert torch.allclose(slerp(a, 3 * a, 0.5), 2 * a)                 # parallel: falls back to lerp


def test_interpolate_endpoints_and_errors():
    torch.manual_seed(4)
    m = ConvVAE(32, 8, width=4).eval()
    x = torch.rand(2, 3, 32, 32)
    path = interpolate(m, x[0], x[1], steps=5)
    ends = m.decode(m.encode(x)[0]).detach()
    assert path.shape == (5, 3, 32, 32)
    assert torch.allclose(path[0], ends[0], atol=1e-5) and torch.allclose(path[-1], ends[1], atol=1e-5)
    with pytest.raises(ValueError): interpolate(m, x[0], x[1], mode='cubic')
    with pytest.raises(ValueError): interpolate(m, x[0], x[1], steps=1)


def test_evaluate_vae():
    torch.manual_seed(5)
    m = ConvVAE(32, 8, width=4)
    x = torch.rand(20, 3, 32, 32)
    ev = evaluate_vae(m, x, k=8, batch_size=8)
    assert m.training                                                   # mode restored
    for k in ['mse', 'psnr', 'ssim', 'colour', 'kl', 'elbo', 'iwae', 'elbo_bpd', 'iwae_bpd', 'active_units', 'kl_per_dim']:
        assert k in ev
    assert len(ev['kl_per_dim']) == 8 and abs(sum(ev['kl_per_dim']) - ev['kl']) < 1e-3 * max(1, ev['kl'])
    assert ev['iwae'] >= ev['elbo'] - 1.0
    assert ev['elbo_bpd'] == pytest.approx(-ev['elbo'] / (3072 * math.log(2)) + 8, rel=1e-5)
    with pytest.raises(ValueError): evaluate_vae(m, x[0])


def test_saturation():
    grey = torch.rand(2, 1, 8, 8).expand(2, 3, 8, 8)
    assert torch.allclose(saturation(grey), torch.zeros(2))
    red = torch.zeros(1, 3, 8, 8); red[:, 0] = 1.0
    assert torch.allclose(saturation(red), torch.ones(1))
    with pytest.raises(ValueError): saturation(torch.rand(2, 1, 8, 8))


def test_tiny_training_run():
    from vqlearn.data import get_dataset
    ds = get_dataset('shapes', n=256, seed=0)
    x = ds.images[:64].float() / 255
    res, models = compare_losses(ds, x, {'MSE': dict(mse=50.0), 'SSIM': dict(mse=0.0, ssim=10.0)}, steps=30, width=4,
                                 latent=8, lr=5e-3, bs=32, warmup=10)
    for r in res.values():
        assert r['loss_last'] < r['loss_first']
    assert set(models) == {'MSE', 'SSIM'}


def test_loss_under_autocast_is_float32():
    torch.manual_seed(6)
    m = ConvVAE(32, 8, width=4)
    x = torch.rand(2, 3, 32, 32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        r = VAELoss(mse=50, ssim=1, colour=1)(m(x), x)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in r.values())
