"Tests of vqlearn.vqvae: shapes, encode/decode, errors, the training step, code extraction and saving."
import pytest, torch
from vqlearn.vqvae import (VQVAE, vqvae_step, evaluate_vqvae, extract_codes, save_codes, load_codes, lr_schedule,
                           make_encoder, make_decoder, CPU_RECIPE)
from vqlearn.quantize import VectorQuantizer, VectorQuantizerEMA
from vqlearn.data import ArrayDataset, DeviceLoader


def small(**kw):
    torch.manual_seed(0)
    return VQVAE(hidden=16, res_hidden=8, n_res=1, num_codes=32, dim=8, **kw)


def test_default_shapes_and_quantizer():
    m = VQVAE()
    assert m.num_codes == 512 and m.code_shape(32) == (8, 8) and m.downsample == 4
    assert isinstance(m.quantizer, VectorQuantizerEMA) and m.quantizer.kmeans_init and m.quantizer.restart_after
    assert isinstance(VQVAE(quantizer='plain').quantizer, VectorQuantizer)
    assert not VQVAE(quantizer='ema').quantizer.kmeans_init
    x = torch.rand(2, 3, 32, 32)
    x_hat, q = m(x)
    assert x_hat.shape == x.shape and q.codes.shape == (2, 8, 8) and q.z_q.shape == (2, 64, 8, 8)
    assert 0 <= x_hat.min() and x_hat.max() <= 1


@pytest.mark.parametrize('n_down,size,shape', [(1, 32, (16, 16)), (2, 32, (8, 8)), (3, 32, (4, 4)), (2, (16, 24), (4, 6))])
def test_downsampling_factor(n_down, size, shape):
    m = VQVAE(hidden=16, res_hidden=8, n_res=1, num_codes=16, dim=4, n_down=n_down)
    assert m.code_shape(size) == shape
    H, W = (size, size) if isinstance(size, int) else size
    codes = m.encode(torch.rand(2, 3, H, W))
    assert codes.shape == (2, *shape) and codes.dtype == torch.int64
    assert m.decode(codes).shape == (2, 3, H, W)


def test_encode_decode_consistent_with_forward():
    m = small().eval()
    x = torch.rand(3, 3, 32, 32)
    x_hat, q = m(x)
    assert torch.equal(m.encode(x), q.codes)
    assert torch.allclose(m.decode(q.codes), x_hat, atol=1e-6)


def test_bad_inputs():
    m = small()
    with pytest.raises(ValueError, match=r'\[0, 31\]'): m.decode(torch.full((1, 8, 8), 32))
    with pytest.raises(ValueError, match=r'\[0, 31\]'): m.decode(torch.full((1, 8, 8), -1))
    with pytest.raises(ValueError, match='B, h, w'): m.decode(torch.zeros(8, 8, dtype=torch.long))
    with pytest.raises(TypeError): m.decode(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match='B, 3, H, W'): m.encode(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match='divisible'): m.encode(torch.rand(2, 3, 30, 30))
    with pytest.raises(ValueError, match='NaN'): m(torch.full((1, 3, 32, 32), float('nan')))
    with pytest.raises(ValueError): VQVAE(quantizer='nope')
    with pytest.raises(ValueError): VQVAE(dim=16, quantizer=VectorQuantizer(8, 8))


def test_step_trains_and_gradients_reach_encoder():
    m = small(quantizer='plain')
    x = torch.rand(4, 3, 32, 32)
    out = vqvae_step(m, (x, torch.zeros(4, dtype=torch.long)))
    assert set(out) >= {'loss', 'mse', 'vq', 'perplexity', 'usage'} and out['loss'].ndim == 0
    out['loss'].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.encoder.parameters())
    assert m.quantizer.embedding.grad is not None


def test_short_training_reduces_error():
    torch.manual_seed(0)
    m = small()
    x = torch.rand(16, 3, 4, 4).repeat_interleave(8, 2).repeat_interleave(8, 3)  # 8x8 blocks of random colour
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    first = None
    for i in range(100):
        out = vqvae_step(m, x); opt.zero_grad(); out['loss'].backward(); opt.step()
        first = first or out['mse'].item()
    assert out['mse'].item() < 0.7 * first


def test_evaluate_and_extract_save_load(tmp_path):
    m = small()
    imgs = (torch.rand(10, 3, 32, 32) * 255).to(torch.uint8)
    ds = ArrayDataset(imgs, torch.arange(10) % 3, ['a', 'b', 'c'])
    res = evaluate_vqvae(m, ds, batch_size=4)
    assert set(res) == {'mse', 'psnr', 'perplexity', 'usage'} and res['mse'] > 0 and 0 < res['usage'] <= 1
    codes, labels = extract_codes(m, ds, batch_size=4)
    assert codes.shape == (10, 8, 8) and codes.dtype == torch.int64 and torch.equal(labels, ds.labels)
    # the same from a loader, from a tensor and from (images, labels)
    c2, l2 = extract_codes(m, DeviceLoader(ds, batch_size=3, shuffle=False, device='cpu'))
    assert torch.equal(c2, codes) and torch.equal(l2, labels)
    c3, l3 = extract_codes(m, imgs)
    assert torch.equal(c3, codes) and (l3 == -1).all()
    c4, l4 = extract_codes(m, (imgs.float() / 255, ds.labels))
    assert torch.equal(c4, codes) and torch.equal(l4, labels)
    p = save_codes(tmp_path / 'sub' / 'codes.safetensors', codes, labels, num_codes=32, classes=ds.classes, note='x')
    c, l, meta = load_codes(p)
    assert torch.equal(c, codes) and torch.equal(l, labels) and c.dtype == torch.int64
    assert meta == {'num_codes': 32, 'classes': ['a', 'b', 'c'], 'note': 'x'}
    assert [f.name for f in (tmp_path / 'sub').iterdir()] == ['codes.safetensors']  # no temporary file left
    with pytest.raises(ValueError): save_codes(tmp_path / 'bad.safetensors', codes[0], labels)
    with pytest.raises(ValueError): save_codes(tmp_path / 'bad.safetensors', codes, labels[:3])
    with pytest.raises(TypeError): extract_codes(m, 42)


def test_helpers():
    assert lr_schedule(0.0) == 0.0 and lr_schedule(0.03) == 1.0 and lr_schedule(1.0) < 1e-12
    assert all(lr_schedule(a) >= lr_schedule(b) for a, b in [(0.1, 0.2), (0.5, 0.9)])
    assert set(CPU_RECIPE) == {'batch_size', 'lr', 'warmup'}
    assert make_encoder(hidden=16, dim=8)(torch.rand(1, 3, 32, 32)).shape == (1, 8, 8, 8)
    assert make_decoder(hidden=16, dim=8)(torch.rand(1, 8, 8, 8)).shape == (1, 3, 32, 32)
