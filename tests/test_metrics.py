"Tests for vqlearn.metrics: SSIM and PSNR against scikit-image and torchmetrics, the colour loss and the VAE diagnostics."
import functools, math
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage.metrics import structural_similarity, peak_signal_noise_ratio
from torchmetrics.functional.image import structural_similarity_index_measure as tm_ssim, peak_signal_noise_ratio as tm_psnr
from vqlearn.data import make_shapes
from vqlearn.metrics import (mse, psnr, ssim, ssim_map, ssim_loss, gaussian_window, gaussian_filter, colour_loss, color_loss,
                             bits_per_dim, kl_per_dim, active_units)

torch.set_num_threads(1)


def sk_ssim(x, y, data_range=1.0):
    return np.mean([structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                          data_range=data_range, channel_axis=0) for a, b in zip(x.double().numpy(), y.double().numpy())])


@functools.lru_cache(maxsize=None)
def _shapes(n=12, seed=0):
    return make_shapes(n, size=32, seed=seed)[0].float() / 255      # (n, 3, 32, 32) synthetic "real-looking" images


@functools.lru_cache(maxsize=None)
def _pairs():
    g = torch.Generator().manual_seed(0)
    s = _shapes()
    blur = F.pad(gaussian_filter(s, 5, 1.0), (2, 2, 2, 2), mode='replicate')
    return {'random rgb': (torch.rand(6, 3, 32, 32, generator=g), torch.rand(6, 3, 32, 32, generator=g)),
            'random grey non-square': (torch.rand(3, 1, 40, 27, generator=g), torch.rand(3, 1, 40, 27, generator=g)),
            'shapes noise': (s, (s + 0.1 * torch.randn(s.shape, generator=g)).clamp(0, 1)),
            'shapes blur': (s, blur),
            'shapes tint': (s, (s * torch.tensor([1.0, 0.85, 0.65]).view(1, 3, 1, 1) + 0.05).clamp(0, 1)),
            'shapes vs shapes': (s, _shapes(seed=1))}


@pytest.mark.parametrize('name', list(_pairs()))
def test_ssim_matches_skimage(name):
    x, y = _pairs()[name]
    assert abs(ssim(x, y).item() - sk_ssim(x, y)) < 1e-4
    per = ssim(x, y, reduction='none')
    ref = [sk_ssim(a[None], b[None]) for a, b in zip(x, y)]
    assert np.abs(per.double().numpy() - np.array(ref)).max() < 1e-4


@pytest.mark.parametrize('name', ['random rgb', 'shapes noise', 'shapes tint'])
def test_ssim_matches_torchmetrics_interior(name):
    x, y = _pairs()[name]
    _, full = tm_ssim(x.double(), y.double(), data_range=1.0, return_full_image=True, reduction='none')
    ref = full[..., 5:-5, 5:-5].flatten(1).mean(1).mean().item()
    assert abs(ssim(x, y).item() - ref) < 1e-4


def test_ssim_properties():
    x, y = _pairs()['shapes noise']
    assert torch.allclose(ssim(x, x), torch.tensor(1.0), atol=1e-6)
    assert torch.allclose(ssim(x, y), ssim(y, x), atol=1e-6)
    assert ssim(x, y).ndim == 0 and ssim(x, y, reduction='none').shape == (len(x),)
    assert ssim_map(x, y).shape == (len(x), 3, 22, 22)
    assert torch.allclose(ssim_loss(x, y), 1 - ssim(x, y))
    w = gaussian_window(11, 1.5)
    assert w.shape == (11,) and torch.isclose(w.sum(), torch.tensor(1.0)) and torch.allclose(w, w.flip(0))


def test_ssim_differentiable():
    g = torch.Generator().manual_seed(1)
    a = torch.rand(1, 2, 12, 13, dtype=torch.float64, generator=g).requires_grad_()
    b = torch.rand(1, 2, 12, 13, dtype=torch.float64, generator=g)
    assert torch.autograd.gradcheck(lambda a: ssim(a, b), (a,), fast_mode=True)
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    ssim_loss(x, torch.rand(2, 3, 16, 16)).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_psnr_and_mse():
    x, y = _pairs()['random rgb']
    ref = np.mean([peak_signal_noise_ratio(a, b, data_range=1.0) for a, b in zip(x.double().numpy(), y.double().numpy())])
    assert abs(psnr(x, y).item() - ref) < 1e-4
    assert abs(psnr(x, x + 0.1).item() - 20.0) < 1e-3
    assert psnr(x, x).item() == 100.0                              # floored MSE: a finite cap
    assert torch.allclose(mse(x, y), ((x - y) ** 2).mean())
    assert mse(x, y, reduction='none').shape == (len(x),)


@pytest.mark.parametrize('name', ['random rgb', 'shapes noise', 'shapes blur', 'shapes tint'])
def test_data_range(name):
    "Images on [0, 255] with data_range=255 score as the same images on [0, 1]; the references agree at data_range=255."
    x, y = _pairs()[name]
    X, Y = 255 * x.double(), 255 * y.double()
    assert psnr(X, Y, data_range=255).item() == pytest.approx(psnr(x.double(), y.double()).item(), abs=1e-9)
    assert ssim(X, Y, data_range=255).item() == pytest.approx(ssim(x.double(), y.double()).item(), abs=1e-9)
    ref_psnr = np.mean([peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(X.numpy(), Y.numpy())])
    assert psnr(X, Y, data_range=255).item() == pytest.approx(ref_psnr, abs=1e-6)
    assert psnr(X, Y, data_range=255).item() == pytest.approx(tm_psnr(X, Y, data_range=255.0, dim=(1, 2, 3)).item(), abs=1e-6)
    assert ssim(X, Y, data_range=255).item() == pytest.approx(sk_ssim(X, Y, data_range=255), abs=1e-6)
    _, full = tm_ssim(X, Y, data_range=255.0, return_full_image=True, reduction='none')
    assert ssim(X, Y, data_range=255).item() == pytest.approx(full[..., 5:-5, 5:-5].flatten(1).mean(1).mean().item(), abs=1e-6)
    # the range matters: the same [0, 255] images scored as if their range were 1 are very different numbers
    assert abs(psnr(X, Y).item() - psnr(X, Y, data_range=255).item()) > 40
    assert abs(ssim(X, Y, data_range=255).item() - ssim(X, Y, data_range=1.0).item()) > 1e-3


def test_colour_loss():
    x = torch.rand(2, 3, 30, 30)
    assert colour_loss(x, x).item() == 0.0 and color_loss is colour_loss
    shift = torch.tensor([0.1, 0.0, -0.2]).view(1, 3, 1, 1)
    assert torch.isclose(colour_loss(x, x + shift), torch.tensor((0.01 + 0.04) / 3), atol=1e-6)   # per-channel MSE, averaged
    checker = 0.1 * (1 - 2 * ((torch.arange(30)[:, None] + torch.arange(30)[None]) % 2)).float()  # zero mean in each 10x10 cell
    y = x + checker
    assert colour_loss(x, y).item() < 1e-10 and mse(x, y).item() > 0.009        # blind to detail, not to colour
    assert colour_loss(x, x + shift, reduction='none').shape == (2,)


@pytest.mark.parametrize('fn', [mse, psnr, ssim, colour_loss])
def test_bad_inputs(fn):
    with pytest.raises(ValueError): fn(torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 17))
    with pytest.raises(ValueError): fn(torch.rand(3, 16, 16), torch.rand(3, 16, 16))
    with pytest.raises(TypeError): fn(torch.zeros(1, 3, 16, 16, dtype=torch.uint8), torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError): fn(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), reduction='sum')


def test_ssim_too_small_and_bad_window():
    with pytest.raises(ValueError, match='at least 11x11'): ssim(torch.rand(1, 1, 10, 30), torch.rand(1, 1, 10, 30))
    with pytest.raises(ValueError): gaussian_window(10)


def test_bits_per_dim():
    assert bits_per_dim(0.0, 3072, n_bins=256).item() == 8.0
    assert torch.isclose(bits_per_dim(100 * math.log(2), 100), torch.tensor(1.0))
    assert torch.allclose(bits_per_dim(torch.tensor([0.0, 50 * math.log(2)]), 100), torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError): bits_per_dim(1.0, 0)


def test_active_units_and_kl_per_dim():
    g = torch.Generator().manual_seed(2)
    mu = torch.cat([torch.randn(300, 4, generator=g), 0.01 * torch.randn(300, 6, generator=g)], 1)
    lv = torch.cat([torch.full((300, 4), -1.0), torch.zeros(300, 6)], 1)
    assert active_units(mu) == 4 and active_units(mu, threshold=10.0) == 0
    k = kl_per_dim(mu, lv)
    assert k.shape == (10,) and (k[:4] > 0.3).all() and (k[4:] < 1e-3).all()
    with pytest.raises(ValueError): active_units(torch.zeros(1, 5))


def test_ssim_low_precision_and_autocast():
    x, y = _pairs()['shapes noise']
    ref = ssim(x.bfloat16().float(), y).item()
    assert ssim(x.bfloat16(), y).dtype == torch.float32
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert abs(ssim(x.bfloat16(), y).item() - ref) < 1e-6
