"Tests of vqlearn.vqvae: shapes, encode/decode, errors, checkpoints, the training step, evaluation, code extraction and the stage API."
import inspect, math
import numpy as np
import pytest, torch
import vqlearn.vqvae as V
from vqlearn.vqvae import (VQVAE, vqvae_step, evaluate_vqvae, extract_codes, make_encoder, make_decoder, register_quantizer,
                           build_quantizer, quantizer_spec, QUANTIZER_CLASSES, VQVAE_SETTINGS, VQVAE_STAGE_KEYS,
                           train_vqvae, vqvae_stage, codes_stage)
from vqlearn.quantize import VectorQuantizer, VectorQuantizerEMA
from vqlearn.data import ArrayDataset, DeviceLoader, lesson_data, load_codes, stage_settings
from vqlearn.core import settings


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


def test_evaluate_and_extract(tmp_path):
    m = small()
    imgs = (torch.rand(10, 3, 32, 32) * 255).to(torch.uint8)
    ds = ArrayDataset(imgs, torch.arange(10) % 3, ['a', 'b', 'c'])
    res = evaluate_vqvae(m, ds, batch_size=4)
    assert set(res) == {'mse', 'psnr', 'perplexity', 'usage'} and res['mse'] > 0 and 0 < res['usage'] <= 1
    assert m.training  # evaluation put it back in training mode
    codes, labels = extract_codes(m, ds, batch_size=4)
    assert codes.shape == (10, 8, 8) and codes.dtype == torch.int64 and torch.equal(labels, ds.labels)
    # the same from a loader, from a tensor and from (images, labels)
    c2, l2 = extract_codes(m, DeviceLoader(ds, batch_size=3, shuffle=False, device='cpu'))
    assert torch.equal(c2, codes) and torch.equal(l2, labels)
    c3, l3 = extract_codes(m, imgs)
    assert torch.equal(c3, codes) and (l3 == -1).all()
    c4, l4 = extract_codes(m, (imgs.float() / 255, ds.labels))
    assert torch.equal(c4, codes) and torch.equal(l4, labels)
    with pytest.raises(TypeError): extract_codes(m, 42)
    with pytest.raises(ValueError, match='empty'): evaluate_vqvae(m, imgs[:0])
    with pytest.raises(ValueError, match='empty'): extract_codes(m, imgs[:0])


def test_evaluation_mse_is_the_plain_mean():
    "evaluate_vqvae's MSE and PSNR against an independent computation over the whole set (any batch size)."
    m = small()
    for _ in range(3): vqvae_step(m, torch.rand(4, 3, 32, 32))  # k-means init and a few codebook updates
    imgs = (torch.rand(11, 3, 32, 32) * 255).to(torch.uint8)
    x = imgs.float() / 255
    m.eval()
    with torch.no_grad(): x_hat = torch.sigmoid(m.decoder(m.quantizer.lookup(m.quantizer.quantize(m.encoder(x - 0.5)))))
    mse = ((x_hat - x) ** 2).mean().item()
    m.train()
    for bs in (1, 4, 11, 256):
        res = evaluate_vqvae(m, imgs, batch_size=bs)
        assert abs(res['mse'] - mse) < 1e-6 * mse, (bs, res['mse'], mse)
        assert abs(res['psnr'] - 10 * math.log10(1 / mse)) < 1e-4
    codes = m.eval().encode(x)
    counts = torch.bincount(codes.reshape(-1), minlength=m.num_codes).double()
    p = counts / counts.sum()
    assert abs(res['perplexity'] - math.exp(-(p[p > 0] * p[p > 0].log()).sum().item())) < 1e-3
    assert abs(res['usage'] - (counts > 0).double().mean().item()) < 1e-9


def test_integer_images_are_refused():
    "uint8 (or any integer) images given to the model itself were silently 255 times too bright: now a TypeError."
    m = small().eval()
    x = torch.rand(2, 3, 32, 32)
    for bad in ((x * 255).to(torch.uint8), (x * 255).long(), x > 0.5):
        for call in (m.encode, m, m.encode_latents):
            with pytest.raises(TypeError, match=r'float.*x\.float\(\) / 255'): call(bad)
    with pytest.raises(TypeError, match='float tensor'): m.encode(x.numpy())
    # the dataset entry points convert uint8 and give the codes of the float images
    assert torch.equal(extract_codes(m, (x * 255).round().to(torch.uint8))[0], m.encode((x * 255).round() / 255))


def test_empty_batches_are_refused():
    m = small()
    for call in (m.encode, m, lambda x: vqvae_step(m, x)):
        with pytest.raises(ValueError, match=r'empty batch.*B = 0'): call(torch.rand(0, 3, 32, 32))
    with pytest.raises(ValueError, match=r'empty batch.*B = 0'): m.decode(torch.zeros(0, 8, 8, dtype=torch.long))


def test_shape_errors_say_what_was_expected():
    m = small()
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\).*\(2, 1, 32, 32\)'): m(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\).*\(3, 32, 32\)'): m.encode(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r'\(30, 30\) is not divisible by the down-sampling factor 4'): m(torch.rand(1, 3, 30, 30))


@pytest.mark.parametrize('quantizer', ['plain', 'ema', 'ema_restart',
                                       VectorQuantizer(32, 8, beta=0.5, restart_after=3),
                                       VectorQuantizerEMA(32, 8, decay=0.8, eps=1e-3, kmeans_init=True, init_count=2.0)])
def test_checkpoint_round_trip(tmp_path, quantizer):
    m = small(quantizer=quantizer)
    vqvae_step(m, torch.rand(4, 3, 32, 32))  # change the codebook from its initial state
    if not isinstance(quantizer, str):
        assert m.config['quantizer'] == {'class': type(quantizer).__name__, **quantizer.config}
    p = m.save(tmp_path / 'm.safetensors', note='x')
    again = VQVAE.from_checkpoint(p)
    assert not again.training and type(again.quantizer) is type(m.quantizer) and again.config == m.config
    assert again.quantizer.config == m.quantizer.config
    m.eval(); x = torch.rand(3, 3, 32, 32)
    assert torch.equal(again.encode(x), m.encode(x)) and torch.equal(again(x)[0], m(x)[0])
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), m.state_dict().values()))


def test_quantizer_registry(tmp_path):
    class MyQuantizer(VectorQuantizerEMA): pass
    m = small(quantizer=MyQuantizer(32, 8, decay=0.5))
    p = m.save(tmp_path / 'm.safetensors')
    with pytest.raises(ValueError, match=r"unknown quantizer class 'MyQuantizer'.*register_quantizer"): VQVAE.from_checkpoint(p)
    try:
        assert register_quantizer(MyQuantizer) is MyQuantizer
        again = VQVAE.from_checkpoint(p)
        assert type(again.quantizer) is MyQuantizer and again.quantizer.decay == 0.5
    finally: QUANTIZER_CLASSES.pop('MyQuantizer', None)
    assert type(build_quantizer({'class': 'VectorQuantizer', 'num_codes': 7, 'dim': 3})) is VectorQuantizer
    with pytest.raises(ValueError, match='spec'): build_quantizer({'num_codes': 7})
    with pytest.raises(TypeError, match='config'): quantizer_spec(torch.nn.Identity())
    with pytest.raises(TypeError, match='config'): VQVAE(quantizer=torch.nn.Identity())


def test_lesson_module_keeps_no_benchmark_code_and_no_train_privates():
    src = inspect.getsource(V)
    assert not hasattr(V, 'lr_schedule') and not hasattr(V, 'CPU_RECIPE') and not hasattr(V, '_image_batches')
    assert 'from .train import _' not in src and '_atomic_save' not in src
    assert not hasattr(V, 'save_codes') or V.save_codes.__module__ == 'vqlearn.data'


def test_helpers():
    assert make_encoder(hidden=16, dim=8)(torch.rand(1, 3, 32, 32)).shape == (1, 8, 8, 8)
    assert make_decoder(hidden=16, dim=8)(torch.rand(1, 8, 8, 8)).shape == (1, 3, 32, 32)


# ---- settings and the stage API --------------------------------------------------------------------------------

def test_settings_modes():
    assert set(VQVAE_SETTINGS) == {'quick', 'docs', 'full'}
    for mode in ('quick', 'docs', 'full'):
        C = settings(**VQVAE_SETTINGS, mode=mode)
        assert set(VQVAE_STAGE_KEYS) <= set(C) and C.mode == mode
    q, d, f = (settings(**VQVAE_SETTINGS, mode=m) for m in ('quick', 'docs', 'full'))
    assert q.data == 'shapes' and d.data == f.data == 'cifar10'
    assert d.classes == ['horse', 'bird'] and f.classes is None
    assert f.model['hidden'] == 128 and d.model['hidden'] == 64 and f.model['num_codes'] == d.model['num_codes'] == 512
    assert VQVAE(**d.model).config == VQVAE().config  # docs trains the standard-size model


def tiny_settings(**kw):
    C = settings(**VQVAE_SETTINGS, mode='quick')
    C.update({**dict(n_train=48, n_test=16, steps=6, batch_size=8, warmup=2, log_every=3,
                     model=dict(hidden=16, res_hidden=8, n_res=1, num_codes=16, dim=8)), **kw})
    return C


def test_lesson_data_reads_an_npz_when_asked(tmp_path, monkeypatch):
    names = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    labels = np.array([2, 7, 0] * 20, dtype=np.uint8)
    np.savez(tmp_path / 'c.npz', images=np.random.randint(0, 256, (60, 32, 32, 3), dtype=np.uint8), labels=labels,
             classes=np.array(names))
    monkeypatch.setenv('VQLEARN_NPZ', str(tmp_path / 'c.npz'))
    train, test = lesson_data(settings(**VQVAE_SETTINGS, mode='docs'))
    assert len(train) + len(test) == 40 and len(test) == 4 and train.classes == ['horse', 'bird']
    assert set(train.labels.tolist()) | set(test.labels.tolist()) == {0, 1}
    # the npz is part of the artifact's identity
    a = stage_settings(settings(**VQVAE_SETTINGS, mode='docs'), VQVAE_STAGE_KEYS)
    monkeypatch.delenv('VQLEARN_NPZ')
    assert a != stage_settings(settings(**VQVAE_SETTINGS, mode='docs'), VQVAE_STAGE_KEYS)
    q = tiny_settings()
    train, test = lesson_data(q)
    assert (len(train), len(test)) == (48, 16)


def test_train_vqvae_returns_a_trained_model_and_history():
    C = tiny_settings()
    m, hist = train_vqvae(C, device='cpu')
    assert isinstance(m, VQVAE) and not m.training and m.config['hidden'] == 16
    assert hist.steps_of('mse')[-1] == C.steps and len(hist['mse']) == 2


def test_stages_are_cached_and_consistent(tmp_path, monkeypatch):
    C = tiny_settings()
    calls = []
    real = V.train_vqvae
    monkeypatch.setattr(V, 'train_vqvae', lambda C, device=None: calls.append(1) or real(C, device))
    ck = vqvae_stage(C, device='cpu', folder=tmp_path)
    assert ck.is_file() and ck.parent == tmp_path and calls == [1]
    assert vqvae_stage(C, device='cpu', folder=tmp_path) == ck and calls == [1]  # cached: not trained again
    from vqlearn.train import load_checkpoint
    assert load_checkpoint(ck)['history'].steps_of('mse')[-1] == C.steps  # the training history is kept
    model = VQVAE.from_checkpoint(ck)
    train, test = lesson_data(C)
    for split, data in (('train', train), ('test', test)):
        p = codes_stage(C, split, device='cpu', folder=tmp_path)
        cm = load_codes(p)
        codes, labels = extract_codes(model, data)
        assert torch.equal(cm.maps['codes'], codes) and torch.equal(cm.labels, labels) and torch.equal(labels, data.labels)
        assert cm.num_codes == {'codes': 16} and cm.meta['split'] == split and cm.meta['classes'] == data.classes
        assert cm.meta['code_shape'] == [8, 8]
    assert calls == [1] and codes_stage(C, 'test', folder=tmp_path) == p
    # another setting is another artifact
    C2 = tiny_settings(steps=4)
    assert vqvae_stage(C2, device='cpu', folder=tmp_path) != ck and calls == [1, 1]
    # a corrupt checkpoint is made again; codes of the old checkpoint are then made again too
    before = p.read_bytes()
    ck.write_bytes(b'garbage')
    assert vqvae_stage(C, device='cpu', folder=tmp_path) == ck and calls == [1, 1, 1]
    with torch.no_grad():  # make the new checkpoint differ from the first one for sure
        m = VQVAE.from_checkpoint(ck); m.quantizer.embedding.mul_(-1); m.save(ck)
    codes_stage(C, 'test', device='cpu', folder=tmp_path)
    assert load_codes(p).meta['vqvae_sha1'] == V._file_digest(ck) and p.read_bytes() != before
    with pytest.raises(ValueError, match='split'): codes_stage(C, 'valid', folder=tmp_path)
    with pytest.raises(KeyError, match='VQVAE_SETTINGS'): vqvae_stage({'data': 'shapes'}, folder=tmp_path)


def test_benchmark_runs_from_a_checkout_without_installing(tmp_path):
    "bench/vqvae_quality.py trains with fit, saves a checkpoint VQVAE.from_checkpoint reloads, and needs no install."
    import subprocess, sys
    from pathlib import Path
    bench = Path(__file__).resolve().parents[1] / 'bench' / 'vqvae_quality.py'
    g = np.random.default_rng(0)
    np.savez(tmp_path / 'imgs.npz', images=g.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), labels=np.arange(40) % 2)
    # -I -S: no PYTHONPATH, no .pth files, so the (editable) installed vqlearn is invisible; only the libraries stay
    libs = [p for p in sys.path if p.endswith('site-packages')]
    prog = ("import sys, runpy; sys.path += {libs!r}; sys.argv = {argv!r}; "
            "runpy.run_path({bench!r}, run_name='__main__')")
    run = lambda code: subprocess.run([sys.executable, '-I', '-S', '-c', code], cwd=tmp_path, capture_output=True, text=True,
                                      env={'OMP_NUM_THREADS': '1', 'PATH': '/usr/bin:/bin'})
    control = run(f"import sys; sys.path += {libs!r}; import vqlearn")
    assert control.returncode != 0 and "No module named 'vqlearn'" in control.stderr
    argv = [str(bench), '--data', 'imgs.npz', '--minutes', '0.02', '--threads', '1', '--holdout', '8', '--model', 'vqvae',
            '--ckpt', 'm_{q}.safetensors', '--log-every', '5']
    out = run(prog.format(libs=libs, argv=argv, bench=str(bench)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert '| ema_restart |' in out.stdout
    m = VQVAE.from_checkpoint(tmp_path / 'm_ema_restart.safetensors')
    assert isinstance(m, VQVAE) and m.config == VQVAE().config
    valid = torch.from_numpy(np.load(tmp_path / 'imgs.npz')['images'][32:]).permute(0, 3, 1, 2)
    res = evaluate_vqvae(m, valid)
    printed = [l for l in out.stdout.splitlines() if '| ema_restart |' in l][0]
    assert printed.split('|')[2].strip() == f"{res['mse']:.4f}"  # the reloaded model scores what the benchmark printed


def test_shipped_vqvae_artifacts(tmp_path, monkeypatch):
    "The shipped weights serve the docs settings only; their code files hold the shipped model's codes of the lesson's images."
    from vqlearn import vqvae as V
    from vqlearn.core import settings
    from vqlearn.data import get_dataset, load_codes
    C = settings(**V.VQVAE_SETTINGS, mode='docs')
    train = get_dataset('shapes', train=True, n=24, seed=0, size=32)
    test = get_dataset('shapes', train=False, n=10, seed=1, size=32)
    monkeypatch.setattr(V, 'lesson_data', lambda C: (train, test))   # stands in for the CIFAR horses and birds
    ck, tr, te = V.vqvae_artifacts(C, 'shipped', folder=tmp_path)
    assert ck == V.shipped_vqvae() and tr.parent == te.parent == tmp_path
    model = V.VQVAE.from_checkpoint(ck)
    for f, ds in ((tr, train), (te, test)):
        codes = load_codes(f)
        assert torch.equal(codes.maps['codes'], model.encode(ds.images.float() / 255))
        assert torch.equal(codes.labels, ds.labels)
    with pytest.raises(ValueError, match="docs configuration"):
        V.vqvae_artifacts(settings(**V.VQVAE_SETTINGS, mode='quick'), 'shipped', folder=tmp_path)
    with pytest.raises(ValueError, match="'stage' or 'shipped'"):
        V.vqvae_artifacts(C, 'pretrained', folder=tmp_path)
