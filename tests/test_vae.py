"Tests for vqlearn.vae: the ConvVAE's shapes and layers, checkpoints, its loss and exact resume, metrics, interpolation and a tiny training run."
import math
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributions import Normal
from skimage.metrics import structural_similarity
from vqlearn.core import Checkpointable
from vqlearn.data import DeviceLoader, get_dataset
from vqlearn.elbo import gaussian_kl, gaussian_log_lik
from vqlearn.train import fit
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
    m.train(); m.sample(2)
    assert m.training                                                   # sample() restores the mode


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


def test_loss_state_dict_round_trip():
    m = ConvVAE(32, 8, width=4).train()
    x = torch.rand(2, 3, 32, 32)
    crit = VAELoss(beta=2.0, warmup=10)
    for _ in range(4): crit.step_fn(m, x)
    assert crit.state_dict() == {'step': 4}
    fresh = VAELoss(beta=2.0, warmup=10)
    fresh.load_state_dict(crit.state_dict())
    assert fresh.step == 4 and fresh.kl_weight() == crit.kl_weight() == pytest.approx(0.8)
    fresh.load_state_dict({'step': torch.tensor(7)})                   # tensors, as a checkpoint may hold them
    assert fresh.step == 7 and isinstance(fresh.step, int)
    with pytest.raises(KeyError, match='step'): fresh.load_state_dict({})


class _Crash(Exception): pass


class _CrashingLoss(VAELoss):
    "A VAELoss whose step function raises once `crash_at` training steps are done: a run killed mid-way."
    def __init__(self, crash_at: int, **kw):
        super().__init__(**kw)
        self.crash_at = crash_at

    def step_fn(self, model, batch):
        if self.step == self.crash_at: raise _Crash
        return super().step_fn(model, batch)


def _vae_run(ckpt, crit, resume=False, steps=12):
    ds = get_dataset('shapes', n=64, seed=0)
    torch.manual_seed(0)
    m = ConvVAE(32, 8, width=4)
    dl = DeviceLoader(ds, batch_size=16, shuffle=True, drop_last=True, seed=0)
    h = fit(m, dl, crit.step_fn, steps=steps, lr=2e-3, ckpt=ckpt, ckpt_every=2, resume=resume, log_every=1, progress=False)
    return m, h


def test_resume_is_exact_with_kl_warmup(tmp_path):
    "A run that crashes and resumes from fit's checkpoint ends exactly where an uninterrupted run ends (warm-up included)."
    ref_model, ref_hist = _vae_run(tmp_path / 'ref.safetensors', VAELoss(warmup=100))
    ck = tmp_path / 'run.safetensors'
    with pytest.raises(_Crash):
        _vae_run(ck, _CrashingLoss(7, warmup=100))                     # dies in step 8; last checkpoint after step 6
    crit = VAELoss(warmup=100)                                          # a fresh process: its counter starts at 0 ...
    model, hist = _vae_run(ck, crit, resume=True)
    assert crit.step == 12                                              # ... and fit restored it to 6, then ran 6 more
    assert hist['beta'] == pytest.approx(ref_hist['beta'], abs=1e-7) and hist['beta'][-1] == pytest.approx(0.12)
    for (name, a), b in zip(ref_model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name
    again = ConvVAE.from_checkpoint(ck)                                 # fit's checkpoints rebuild the model too
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu()), name


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(7)
    m = ConvVAE(64, 12, channels=1, width=4, max_width=8)
    x = torch.rand(3, 1, 64, 64)
    m(x)                                                                # a training pass moves the batch-norm statistics
    path = m.save(tmp_path / 'vae.safetensors', note='round trip')
    again = ConvVAE.from_checkpoint(path)
    assert isinstance(again, ConvVAE) and not again.training
    assert again.config == m.config == dict(image_size=64, latent_dim=12, channels=1, width=4, max_width=8)
    m.eval()
    z = torch.randn(2, 12)
    with torch.no_grad():
        assert torch.equal(again.encode(x)[0], m.encode(x)[0]) and torch.equal(again.decode(z), m.decode(z))
    for (name, a), b in zip(m.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name

    class Other(Checkpointable, nn.Module):
        def __init__(self):
            super().__init__()
            self.config, self.lin = {}, nn.Linear(2, 2)
    Other().save(tmp_path / 'other.safetensors')
    with pytest.raises(ValueError, match='Other'):
        ConvVAE.from_checkpoint(tmp_path / 'other.safetensors')


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
    m = ConvVAE(32, 8, width=4)
    x = torch.rand(2, 3, 32, 32)
    m(x)                                                                # batch-norm statistics away from their start
    path = interpolate(m, x[0], x[1], steps=5)                          # from a model in training mode ...
    assert m.training                                                   # ... which stays in training mode
    m.eval()
    ends = m.decode(m.encode(x)[0]).detach()                            # the path runs in eval mode
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
    assert ev['iwae_bpd'] == pytest.approx(-ev['iwae'] / (3072 * math.log(2)) + 8, rel=1e-5)
    with pytest.raises(ValueError): evaluate_vae(m, x[0])
    with pytest.raises(TypeError, match='float'): evaluate_vae(m, (x * 255).to(torch.uint8))


def _colour_by_hand(a, b):
    "The colour loss without adaptive pooling: the 3x3 grid of overlapping cells that pooling a 32-pixel image uses."
    cells = [(0, 11), (10, 22), (21, 32)]
    pool = lambda t: torch.stack([torch.stack([t[..., r0:r1, c0:c1].mean((-2, -1)) for c0, c1 in cells], -1)
                                  for r0, r1 in cells], -2)              # (B, C, 3, 3)
    return (pool(a) - pool(b)).pow(2).mean((1, 2, 3))                     # (B,)


def test_evaluate_vae_matches_independent_computation():
    "Every number of evaluate_vae against a computation that shares none of its code (catches e.g. a halved MSE)."
    torch.manual_seed(5)
    m = ConvVAE(32, 8, width=4)
    x = torch.rand(20, 3, 32, 32)
    m(x)                                                                # running statistics now differ from batch statistics
    with torch.no_grad():                                               # an informative posterior: 5 of 8 dims vary with x
        m.fc_mu.weight.mul_(60); m.fc_mu.weight[:3] = 0; m.fc_mu.bias[:3] = 0; m.fc_logvar.bias.fill_(-2.0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    torch.manual_seed(0)
    ev = evaluate_vae(m, x, sigma=0.2, k=8, batch_size=8)               # 3 batches: 8 + 8 + 4 images
    assert m.training and all(torch.equal(before[k], v) for k, v in m.state_dict().items())   # eval mode, nothing updated
    m.eval()
    with torch.no_grad():
        mu, logvar = m.encode(x)
        rec = m.decode(mu)                                              # (20, 3, 32, 32)
        err = (rec - x).pow(2).flatten(1).mean(1)                       # (20,)
        assert ev['mse'] == pytest.approx(err.mean().item(), rel=1e-5)
        assert ev['psnr'] == pytest.approx((10 * torch.log10(1 / err)).mean().item(), rel=1e-5)
        ref_ssim = np.mean([structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                                  data_range=1.0, channel_axis=0)
                            for a, b in zip(rec.double().numpy(), x.double().numpy())])
        assert ev['ssim'] == pytest.approx(ref_ssim, abs=1e-4)
        assert ev['colour'] == pytest.approx(_colour_by_hand(rec, x).mean().item(), rel=1e-4)
        kl_dims = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar)         # (20, 8)
        assert ev['kl'] == pytest.approx(kl_dims.sum(1).mean().item(), rel=1e-5) and ev['kl'] > 1.0
        assert ev['kl_per_dim'] == pytest.approx(kl_dims.mean(0).tolist(), rel=1e-5)
        assert ev['active_units'] == int((mu.var(0, unbiased=False) > 0.01).sum()) == 5
        # ELBO and IWAE with a Gaussian decoder of std 0.2, by brute force over 256 samples per image
        S = 256
        z = mu + (0.5 * logvar).exp() * torch.randn(S, *mu.shape)      # (S, 20, 8)
        ll = Normal(m.decode(z.flatten(0, 1)).view(S, *x.shape), 0.2).log_prob(x).flatten(2).sum(2)   # (S, 20)
        elbo_ref = (ll.mean(0) - kl_dims.sum(1)).mean().item()
        logw = ll + Normal(0.0, 1.0).log_prob(z).sum(-1) - Normal(mu, (0.5 * logvar).exp()).log_prob(z).sum(-1)
        iwae_ref = (torch.logsumexp(logw, 0) - math.log(S)).mean().item()   # a tighter bound than K = 8
    assert ev['elbo'] == pytest.approx(elbo_ref, abs=1.0)
    assert elbo_ref - 1.0 < ev['iwae'] < iwae_ref + 1.0
    assert ev['elbo_bpd'] == pytest.approx(-elbo_ref / (3072 * math.log(2)) + 8, abs=1e-3)


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


def test_interpolation_widget_walks_the_interpolation_path():
    "The slider's frame at t is the decoded interpolation at t; the widget is a VBox of the slider and its output."
    pytest.importorskip('ipywidgets')
    import matplotlib; matplotlib.use('Agg')
    from vqlearn.vae import interpolation_widget
    torch.manual_seed(0)
    m = ConvVAE(32, 8, width=4).eval()
    x0, x1 = torch.rand(3, 32, 32), torch.rand(3, 32, 32)
    w = interpolation_widget(m, x0, x1, mode='lerp', steps=5)
    slider, out = w.children
    assert (slider.min, slider.max) == (0.0, 1.0) and abs(slider.step - 0.25) < 1e-12
    path = interpolate(m, x0, x1, 5, 'lerp')
    with torch.no_grad(): ends = m.decode(m.encode(torch.stack([x0, x1]))[0])
    assert torch.allclose(path[0], ends[0], atol=1e-5) and torch.allclose(path[-1], ends[1], atol=1e-5)
    slider.value = 0.5   # moving the slider redraws without error
    assert slider.value == 0.5
