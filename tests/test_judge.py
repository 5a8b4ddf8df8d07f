"Tests of vqlearn.judge: the Fréchet distance against references and closed forms, the judge's shapes and errors, checkpoints, training, the stage and judge_samples."
import math, os
import numpy as np
import pytest, scipy.linalg, torch
import torch.nn.functional as F
import vqlearn.judge as J
from vqlearn.judge import (Judge, JudgeOutputs, ResidualBlock, JUDGE_SETTINGS, frechet_distance, frechet_distance_gaussians,
                           gaussian_stats, judge_outputs, judge_samples, judge_stage, random_shift, train_judge, evaluate_judge)
from vqlearn.core import load_tensors, settings
from vqlearn.data import lesson_data


def scipy_fd(mu1, s1, mu2, s2) -> float:
    "Reference: the general matrix square root of the product (what the original FID code does)."
    mu1, s1, mu2, s2 = (np.asarray(t, dtype=np.float64) for t in (mu1, s1, mu2, s2))
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real)


def rand_cov(F_, g, rank=None):
    A = torch.randn(F_, rank or F_, generator=g, dtype=torch.float64)
    return A @ A.T / F_


# --- the Fréchet distance -----------------------------------------------------------------------------------------
def test_frechet_closed_form_for_diagonal_covariances():
    g = torch.Generator().manual_seed(0)
    mu_a, mu_b = torch.randn(20, generator=g, dtype=torch.float64), torch.randn(20, generator=g, dtype=torch.float64)
    va, vb = torch.rand(20, generator=g, dtype=torch.float64) + 0.05, 3 * torch.rand(20, generator=g, dtype=torch.float64)
    expected = ((mu_a - mu_b) ** 2).sum() + ((va.sqrt() - vb.sqrt()) ** 2).sum()
    assert frechet_distance_gaussians(mu_a, va.diag(), mu_b, vb.diag()) == pytest.approx(expected.item(), rel=1e-12)
    # one dimension: (mu_a - mu_b)^2 + (sigma_a - sigma_b)^2
    assert frechet_distance_gaussians(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]), torch.tensor([[9.0]])) == pytest.approx(9 + 1)


@pytest.mark.parametrize('F_,seed', [(3, 0), (16, 1), (64, 2)])
def test_frechet_matches_scipy_on_full_covariances(F_, seed):
    g = torch.Generator().manual_seed(seed)
    mu_a, mu_b = torch.randn(F_, generator=g, dtype=torch.float64), torch.randn(F_, generator=g, dtype=torch.float64)
    ca, cb = rand_cov(F_, g), rand_cov(F_, g)
    ref = scipy_fd(mu_a, ca, mu_b, cb)
    assert frechet_distance_gaussians(mu_a, ca, mu_b, cb) == pytest.approx(ref, rel=1e-8)
    # float32 inputs are computed in float64 all the same
    assert frechet_distance_gaussians(mu_a.float(), ca.float(), mu_b.float(), cb.float()) == pytest.approx(ref, rel=1e-5)


def test_frechet_distance_of_features_uses_unbiased_moments():
    g = torch.Generator().manual_seed(3)
    fa = torch.randn(300, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 10, generator=g, dtype=torch.float64)
    fb = torch.randn(200, 10, generator=g, dtype=torch.float64) * 2 + 1
    mu, cov = gaussian_stats(fa)
    assert torch.allclose(mu, fa.mean(0)) and torch.allclose(cov, torch.from_numpy(np.cov(fa.numpy(), rowvar=False)))
    ref = scipy_fd(fa.mean(0), np.cov(fa.numpy(), rowvar=False), fb.mean(0), np.cov(fb.numpy(), rowvar=False))
    assert frechet_distance(fa, fb) == pytest.approx(ref, rel=1e-8)
    assert frechet_distance(fa.numpy(), fb.float()) == pytest.approx(ref, rel=1e-5)   # numpy and float32 inputs


def test_frechet_matches_torchmetrics_helper():
    fid = pytest.importorskip('torchmetrics.image.fid')
    if not hasattr(fid, '_compute_fid'): pytest.skip('torchmetrics moved its FID helper')
    g = torch.Generator().manual_seed(4)
    ca, cb = rand_cov(12, g), rand_cov(12, g)
    mu_a, mu_b = torch.randn(12, generator=g, dtype=torch.float64), torch.zeros(12, dtype=torch.float64)
    assert frechet_distance_gaussians(mu_a, ca, mu_b, cb) == pytest.approx(fid._compute_fid(mu_a, ca, mu_b, cb).item(), rel=1e-8)


def test_frechet_invariances():
    g = torch.Generator().manual_seed(5)
    fa = torch.randn(400, 8, generator=g, dtype=torch.float64) @ torch.randn(8, 8, generator=g, dtype=torch.float64)
    fb = torch.randn(400, 8, generator=g, dtype=torch.float64) + 0.5
    d = frechet_distance(fa, fb)
    assert d > 1
    assert frechet_distance(fa, fa) < 1e-9 * d                                       # zero against itself
    assert frechet_distance(fb, fa) == pytest.approx(d, rel=1e-9)                     # symmetric
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    v = torch.randn(8, generator=g, dtype=torch.float64) * 10
    assert frechet_distance(fa @ Q + v, fb @ Q + v) == pytest.approx(d, rel=1e-8)     # rotate and move both together
    assert frechet_distance(fa + v, fa) == pytest.approx((v ** 2).sum().item(), rel=1e-9)  # a shift adds ||v||^2
    assert frechet_distance(2 * fa, 2 * fb) == pytest.approx(4 * d, rel=1e-8)         # scale: squared


def test_frechet_of_singular_covariances():
    "More features than images: singular covariances still give a finite, non-negative distance, zero against itself."
    g = torch.Generator().manual_seed(6)
    fa, fb = torch.randn(10, 32, generator=g), torch.randn(12, 32, generator=g) + 1
    assert frechet_distance(fa, fa) == pytest.approx(0, abs=1e-8)
    d = frechet_distance(fa, fb)
    assert math.isfinite(d) and d > 32 * 0.9                                          # at least the mean difference, ~32
    ca, cb = rand_cov(8, g, rank=3), rand_cov(8, g, rank=5)
    z = torch.zeros(8, dtype=torch.float64)
    assert frechet_distance_gaussians(z, ca, z, cb) == pytest.approx(scipy_fd(z, ca, z, cb), rel=1e-5, abs=1e-8)


def test_frechet_bad_inputs():
    for a, b in [(torch.randn(10, 4), torch.randn(10, 5)), (torch.randn(1, 4), torch.randn(10, 4)), (torch.randn(10), torch.randn(10)),
                 (torch.full((5, 2), float('inf')), torch.randn(5, 2))]:
        with pytest.raises(ValueError): frechet_distance(a, b)
    with pytest.raises(ValueError): frechet_distance_gaussians(torch.zeros(3), torch.eye(3), torch.zeros(3), torch.eye(4))


# --- the judge ----------------------------------------------------------------------------------------------------
def small_judge(**kw):
    torch.manual_seed(0)
    return Judge(3, widths=[4, 8], **kw)


def test_judge_shapes_any_size():
    for pool, n_feat in [('concat', 16), ('avg', 8), ('max', 8)]:
        j = small_judge(pool=pool).eval()
        for size in (32, 48, 64):
            x = torch.rand(5, 3, size, size)
            assert j(x).shape == (5, 3) and j.features(x).shape == (5, n_feat) == (5, j.n_features)
    j = Judge(2, in_channels=1, widths=[4, 8, 16], blocks=2, stem_stride=2).eval()
    assert j(torch.rand(2, 1, 64, 64)).shape == (2, 2) and len(j.stages) == 6


def test_judge_pooling_is_what_it_says():
    j = small_judge(pool='concat').eval()
    x = torch.rand(3, 3, 16, 16)
    h = j.stages(j.stem((x - 0.5) / 0.25))
    assert torch.allclose(j.features(x), torch.cat([h.mean((2, 3)), h.amax((2, 3))], 1), atol=1e-6)


def test_residual_block():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8)
    b = ResidualBlock(4, 4).eval()
    with torch.no_grad(): b.bn2.weight.zero_(); b.bn2.bias.zero_()
    assert torch.equal(b(x), F.relu(x))                                               # F(x) = 0: identity, then relu
    assert ResidualBlock(4, 6, stride=2)(x).shape == (2, 6, 4, 4)


def test_judge_errors():
    j = small_judge(image_size=32).eval()
    x = torch.rand(2, 3, 32, 32)
    with pytest.raises(TypeError, match='255'): j((x * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'): j(x[:, :2])
    with pytest.raises(ValueError, match=r'\(B, 3, H, W\)'): j(x[0])
    with pytest.raises(ValueError, match='32x32'): j(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match='255'): j(x * 255)
    with pytest.raises(ValueError, match=r'\(x \+ 1\) / 2'): j(x * 2 - 1)
    with pytest.raises(ValueError, match='clamp'): j(x + 0.05)
    with pytest.raises(TypeError): j(x.numpy())
    j.train(); j(x * 1.1)                                                                 # no range check (no sync) while training
    for bad in [dict(n_classes=1), dict(n_classes=3, pool='mean'), dict(n_classes=3, widths=[]), dict(n_classes=3, classes=['a'])]:
        with pytest.raises(ValueError): Judge(**bad)


def test_judge_checkpoint_round_trip(tmp_path):
    j = small_judge(image_size=32, classes=['a', 'b', 'c'])
    j.train(); j(torch.rand(8, 3, 32, 32))                                                # move the batch-norm statistics
    j.eval()
    path = j.save(tmp_path / 'j.safetensors', note='x')
    k = Judge.from_checkpoint(path)
    assert not k.training and k.config == j.config and k.classes == ['a', 'b', 'c'] and k.image_size == 32
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(k(x), j(x)) and torch.equal(k.features(x), j.features(x))
    with pytest.raises(ValueError, match='shape mismatch'): Judge.from_checkpoint(_other_checkpoint(tmp_path))


def _other_checkpoint(tmp_path):
    "A checkpoint whose weights do not fit its config."
    from vqlearn.core import save_tensors
    j = small_judge()
    tensors = {f'model.{k}': v for k, v in j.state_dict().items()}
    tensors['model.head.weight'] = torch.zeros(3, 99)
    return save_tensors(tmp_path / 'bad.safetensors', tensors, {'format': 'vqlearn-model-1', 'class': 'Judge', 'config': j.config})


def test_random_shift():
    torch.manual_seed(0)
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    assert torch.equal(random_shift(x, 0), x)
    y = random_shift(x, 1)
    assert y.shape == x.shape
    for i in range(2):   # the centre 4x4 of y is a window of x shifted by at most one pixel
        assert any(torch.equal(y[i, :, 1:5, 1:5], x[i, :, 1 + dy:5 + dy, 1 + dx:5 + dx]) for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    outs = [random_shift(x, 2) for _ in range(5)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])                             # the offsets are random


# --- judging samples ----------------------------------------------------------------------------------------------
class ColourJudge(Judge):
    "A hand-made judge: features are the mean colour (B, 3); the class is the brightest channel (logits = 10 * features)."
    def __init__(self):
        super().__init__(3, widths=[1])
        self.head = torch.nn.Linear(3, 3)
        with torch.no_grad(): self.head.weight.copy_(10 * torch.eye(3)); self.head.bias.zero_()
    def features(self, x):
        self._check(x)
        return x.mean((2, 3))


def colour_images():
    "10 flat images: 4 red, 3 green, 3 blue."
    cols = torch.tensor([[1., 0, 0]] * 4 + [[0, 1., 0]] * 3 + [[0, 0, 1.]] * 3)
    return cols[:, :, None, None].expand(-1, -1, 8, 8).clone(), torch.tensor([0] * 4 + [1] * 3 + [2] * 3)


def test_judge_samples_counts_right_answers():
    x, true = colour_images()
    j = ColourJudge()
    drawn_for = true.clone(); drawn_for[[0, 5, 9]] = torch.tensor([1, 2, 0])             # 3 of 10 samples are of the wrong class
    r = judge_samples(j, x, drawn_for)
    assert r['n'] == 10 and r['accuracy'] == pytest.approx(0.7)
    assert r['class_accuracy'] == pytest.approx([3 / 4, 2 / 3, 2 / 3])                 # by the class the samples were drawn for
    p = math.exp(10) / (math.exp(10) + 2)                                                 # softmax of (10, 0, 0)
    assert r['confidence'] == pytest.approx(p, rel=1e-5)
    assert 'frechet' not in r
    assert judge_samples(j, (x, true))['accuracy'] == 1.0                                # labels carried by the data
    assert 'accuracy' not in judge_samples(j, x)                                         # no labels: no accuracy


def test_judge_samples_frechet_uses_the_features():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 8, 8, generator=g)
    real = torch.rand(30, 3, 8, 8, generator=g) * 0.5
    j = ColourJudge()
    r = judge_samples(j, x, real=real, batch_size=7)
    assert r['frechet'] == pytest.approx(frechet_distance(x.mean((2, 3)), real.mean((2, 3))), rel=1e-5) and r['n_real'] == 30
    pre = judge_outputs(j, real)
    assert isinstance(pre, JudgeOutputs) and pre.features.shape == (30, 3) and pre.logits.shape == (30, 3)
    assert judge_samples(j, x, real=pre)['frechet'] == pytest.approx(r['frechet'], rel=1e-9)


def test_judge_samples_restores_mode_and_checks_labels():
    x, true = colour_images()
    j = ColourJudge().train()
    judge_samples(j, x, true)
    assert j.training                                                                    # eval mode only inside
    for bad in [true[:3], true + 3, true.float(), -true - 1]:
        with pytest.raises(ValueError): judge_samples(j, x, bad)
    with pytest.raises(ValueError): judge_samples(j, x[:0])


# --- training and the stage ---------------------------------------------------------------------------------------
def tiny_settings():
    C = settings(**JUDGE_SETTINGS, mode='quick')
    C.update(classes=['circle', 'cross'], n_train=600, n_test=200, steps=200, eval_every=None, log_every=20)
    return C


def test_training_and_stage(tmp_path, monkeypatch):
    C = tiny_settings()
    path = judge_stage(C, folder=tmp_path)
    j = Judge.from_checkpoint(path)
    assert j.classes == ['circle', 'cross'] and j.image_size == 32
    _, heldout = lesson_data(C)
    acc = evaluate_judge(j, heldout)['accuracy']
    assert acc > 0.5 + 3 * (0.25 / len(heldout)) ** 0.5, acc   # 3 standard errors above chance (0.66 for 84 images;
                                                               # measured 0.75-0.94 over eight seeds)
    meta = load_tensors(path)[1]
    assert meta['heldout']['accuracy'] == pytest.approx(acc) and meta['history'][-1]['step'] == 200
    r = judge_samples(j, heldout)                                                         # real images judged as samples
    assert r['accuracy'] == pytest.approx(acc)
    # the second call reuses the artifact; other settings make another
    monkeypatch.setattr(J, 'train_judge', lambda *a, **k: (_ for _ in ()).throw(AssertionError('retrained')))
    assert judge_stage(C, folder=tmp_path) == path
    C2 = dict(C, steps=201)
    with pytest.raises(AssertionError, match='retrained'): judge_stage(C2, folder=tmp_path)
    with pytest.raises(KeyError): judge_stage({k: v for k, v in C.items() if k != 'model'}, folder=tmp_path)


def test_judge_settings_have_the_same_keys():
    keys = {m: set(c) for m, c in JUDGE_SETTINGS.items()}
    assert keys['quick'] == keys['docs'] == keys['full'] and set(J.JUDGE_STAGE_KEYS) <= keys['quick']


def test_shortcut_is_a_strided_1x1_convolution_and_trains_on_odd_batches_with_threads():
    """The shortcut picks every stride-th pixel then convolves: a strided 1x1 convolution's numbers, without the oneDNN kernel
    that corrupts memory under torch 2.14 (1x1, stride 2, channels_last, odd batch, 2 threads; the suite runs on 1 thread)."""
    import subprocess, sys
    torch.manual_seed(0)
    b = ResidualBlock(8, 16, stride=2).eval().to(memory_format=torch.channels_last)
    x = torch.rand(3, 8, 33, 33).contiguous(memory_format=torch.channels_last)    # odd size: 17 x 17 out
    with torch.no_grad():
        ref = b.shortcut[1](F.conv2d(x, b.shortcut[0].weight, stride=2))
        out = b.shortcut(x[..., ::2, ::2])
        assert out.shape == (3, 16, 17, 17) and torch.allclose(out, ref, atol=1e-6)
        assert b(x).shape == (3, 16, 17, 17)
    code = ("import torch, torch.nn.functional as F; from vqlearn.judge import Judge; torch.set_num_threads(2); "
            "torch.manual_seed(0); m = Judge(2, widths=(8, 16, 32)); opt = torch.optim.SGD(m.parameters(), 0.01)\n"
            "for B in (3, 5, 7) * 4:\n"
            "    loss = F.cross_entropy(m(torch.rand(B, 3, 32, 32)), torch.randint(0, 2, (B,))); opt.zero_grad(); loss.backward(); opt.step()\n"
            "print('trained')")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '2'})
    assert r.returncode == 0 and 'trained' in r.stdout, (r.returncode, r.stderr[-1000:])
