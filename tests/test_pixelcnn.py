"Tests for vqlearn.pixelcnn: masks, causality, conditioning, samplers (fast == naive), helpers and bad input."
import math
import pytest
import torch
import torch.nn.functional as F
from vqlearn.pixelcnn import (make_mask, MaskedConv2d, GatedPixelCNN, dependency_maps, pick_codes, draw_uniforms,
                              sample_fast, sample_naive, RasterMarkovSource, CodeLoader, evaluate_nll, prior_step)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def earlier(S):
    t = torch.arange(S * S)
    return (t[None, :] < t[:, None]).reshape(S, S, S, S)


def test_masks_exact():
    assert torch.equal(make_mask(3, "A"), torch.tensor([[1., 1, 1], [1, 0, 0], [0, 0, 0]]))
    assert torch.equal(make_mask(3, "B"), torch.tensor([[1., 1, 1], [1, 1, 0], [0, 0, 0]]))
    for bad in [dict(kernel_size=4), dict(kernel_size=0), dict(mask_type="C")]:
        with pytest.raises(ValueError): make_mask(**{'kernel_size': 3, 'mask_type': 'A', **bad})
    with pytest.raises(ValueError): MaskedConv2d(1, 1, 3, "X")


def test_masked_conv_is_causal_and_keeps_size():
    torch.manual_seed(0)
    conv = MaskedConv2d(2, 3, 5, "A").double()
    x = torch.randn(1, 2, 7, 7, dtype=torch.float64)
    assert conv(x).shape == (1, 3, 7, 7)
    d = dependency_maps(conv, x)
    assert not (d & ~earlier(7)).any()
    convb = MaskedConv2d(2, 3, 3, "B").double()
    db = dependency_maps(convb, x)
    assert db[3, 3, 3, 3] and not (db & ~(earlier(7) | torch.eye(49, dtype=torch.bool).reshape(7, 7, 7, 7))).any()


@pytest.mark.parametrize("L,k", [(2, 3), (3, 3), (2, 5)])
def test_gated_receptive_field_exact(L, k):
    "Every output sees exactly the earlier positions in its predicted field (no blind spot), with conditioning on."
    torch.manual_seed(L)
    S, n = 9, k // 2
    net = GatedPixelCNN(3, dim=4, n_layers=L, n_classes=2, cond_channels=1, kernel_size=k).double()
    lab, cond = torch.tensor([1]).repeat(S * S), torch.randn(S * S, 1, S, S, dtype=torch.float64)
    dep = dependency_maps(lambda z: net.features(z, lab, cond), torch.randn(1, 4, S, S, dtype=torch.float64))
    i, j, r, c = torch.meshgrid(*[torch.arange(S)] * 4, indexing='ij')
    dr, dc = r - i, c - j
    field = ((dr == 0) & (dc >= -n * L) & (dc <= -1)) | ((dr >= -(1 + n * L)) & (dr <= -1) & (dc.abs() <= n * L))
    assert torch.equal(dep, field & earlier(S))


def test_changing_a_code_moves_only_later_logits():
    torch.manual_seed(0)
    net = GatedPixelCNN(6, dim=8, n_layers=3).double()
    codes = torch.randint(0, 6, (1, 5, 5))
    out = net(codes)
    for t in range(25):
        c2 = codes.clone(); c2.view(-1)[t] = (c2.view(-1)[t] + 1) % 6
        diff = (net(c2) - out).abs().sum(1).view(-1)
        assert (diff[:t + 1] == 0).all()
        if t % 5 < 4: assert diff[t + 1] > 0            # the right neighbour sees it ...
        if t + 5 < 25: assert diff[t + 5] > 0           # ... and so does the position below


def test_forward_shapes_and_bad_input():
    net = GatedPixelCNN(5, dim=8, n_layers=2, n_classes=3, cond_channels=2)
    codes, lab, cond = torch.randint(0, 5, (2, 4, 6)), torch.tensor([0, 2]), torch.randn(2, 2, 4, 6)
    assert net(codes, lab, cond).shape == (2, 5, 4, 6)
    assert net(codes, 1, cond).shape == (2, 5, 4, 6)                    # one int label for the batch
    assert net(codes, lab, torch.randn(2, 2, 2, 3)).shape == (2, 5, 4, 6)  # half-size cond is upsampled
    with pytest.raises(TypeError): net(codes.float(), lab, cond)
    with pytest.raises(TypeError): net(codes[0], lab, cond)
    with pytest.raises(ValueError): net(codes + 5, lab, cond)
    with pytest.raises(ValueError): net(codes, None, cond)
    with pytest.raises(ValueError): net(codes, torch.tensor([0, 3]), cond)
    with pytest.raises(ValueError): net(codes, torch.tensor([0, 1, 2]), cond)
    with pytest.raises(ValueError): net(codes, lab, None)
    with pytest.raises(ValueError): net(codes, lab, torch.randn(2, 3, 4, 6))
    with pytest.raises(ValueError): net(codes, lab, torch.randn(2, 2, 3, 6))   # 3 does not divide 4
    plain = GatedPixelCNN(5, dim=8, n_layers=2)
    with pytest.raises(ValueError): plain(codes, lab)
    with pytest.raises(ValueError): plain(codes, cond=cond)
    for bad in [dict(num_codes=1), dict(n_layers=0), dict(kernel_size=4)]:
        with pytest.raises(ValueError): GatedPixelCNN(**{'num_codes': 5, **bad})


@pytest.mark.parametrize("kw", [dict(), dict(n_classes=3), dict(cond_channels=2, kernel_size=5)])
def test_fast_equals_naive(kw):
    torch.manual_seed(1)
    net = GatedPixelCNN(9, dim=8, n_layers=3, **kw).double()
    lab = torch.tensor([2, 0, 1]) if 'n_classes' in kw else None
    cond = torch.randn(3, 2, 5, 4, dtype=torch.float64) if 'cond_channels' in kw else None
    for T, k in [(1.0, None), (1.5, 4), (0.3, None)]:
        a = net.sample((3, 5, 4), lab, cond, T, torch.Generator().manual_seed(3), "naive", k)
        b = net.sample((3, 5, 4), lab, cond, T, torch.Generator().manual_seed(3), "fast", k)
        assert torch.equal(a, b) and b.dtype == torch.int64 and b.shape == (3, 5, 4)
        assert 0 <= b.min() and b.max() < 9


def test_top1_is_greedy_and_sampler_keeps_training_mode():
    torch.manual_seed(2)
    net = GatedPixelCNN(7, dim=8, n_layers=2).double().train()
    s = net.sample((2, 4, 4), top_k=1, generator=torch.Generator().manual_seed(0))
    assert net.training
    greedy = torch.zeros(2, 4, 4, dtype=torch.long)
    for t in range(16):                                    # argmax decoding by hand
        i, j = divmod(t, 4)
        greedy[:, i, j] = net(greedy)[:, :, i, j].argmax(1)
    assert torch.equal(s, greedy)
    a = net.sample((2, 4, 4), top_k=7, generator=torch.Generator().manual_seed(0))
    b = net.sample((2, 4, 4), top_k=None, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)                               # top-k with k = K changes nothing


def test_sample_bad_arguments_and_seeds():
    net = GatedPixelCNN(4, dim=8, n_layers=2, n_classes=2)
    for bad in [dict(temperature=0), dict(temperature=-1), dict(top_k=0), dict(method="slow"), dict(shape=(2, 3)),
                dict(shape=(0, 3, 3)), dict(labels=None), dict(labels=torch.tensor([0, 5]))]:
        with pytest.raises(ValueError): net.sample(**{'shape': (2, 3, 3), 'labels': torch.tensor([0, 1]), **bad})
    s1 = net.sample((2, 3, 3), torch.tensor([0, 1]), generator=torch.Generator().manual_seed(5))
    s2 = net.sample((2, 3, 3), torch.tensor([0, 1]), generator=torch.Generator().manual_seed(5))
    assert torch.equal(s1, s2)


def test_pick_codes_matches_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]], dtype=torch.float64).expand(100_000, 4)
    got = torch.bincount(pick_codes(logits, draw_uniforms((100_000,), g)), minlength=4) / 1e5
    assert (got - logits[0].softmax(0)).abs().max() < 0.01
    assert pick_codes(logits[:2], torch.tensor([0.0, 0.999999]), top_k=2).tolist() == [0, 3]  # only the two largest
    hot = pick_codes(logits[:1000], draw_uniforms((1000,), g), temperature=0.01)
    assert (hot == 0).all()                                # low temperature -> argmax


def test_markov_source_entropy_and_inverse():
    src = RasterMarkovSource([0.25] * 4, H=3, W=5)
    assert math.isclose(src.entropy_per_code, math.log(4))
    src = RasterMarkovSource([0.5, 0.5, 0.0], H=4, W=4)
    assert math.isclose(src.entropy_per_code, math.log(2))
    x = src.sample(200, torch.Generator().manual_seed(0))
    assert x.shape == (200, 4, 4) and torch.equal(src.noise_to_codes(src.residuals(x)), x)
    assert set(src.residuals(x).unique().tolist()) <= {0, 1}
    for bad in ([1.0], [0.5, 0.6], [-0.1, 1.1]):
        with pytest.raises(ValueError): RasterMarkovSource(bad)


def test_true_model_scores_the_entropy():
    "The exact conditional NLL of the source on its own samples is H(q) per code (law of large numbers)."
    q = torch.tensor([0.6, 0.3, 0.1], dtype=torch.float64)
    src = RasterMarkovSource(q, H=6, W=6)
    x = src.sample(3000, torch.Generator().manual_seed(1))
    nll = -q.log()[src.residuals(x)].mean()
    assert abs(nll - src.entropy_per_code) < 0.01


def test_code_loader_and_evaluate_nll():
    codes, labels = torch.randint(0, 5, (10, 3, 3)), torch.arange(10)
    dl = CodeLoader(codes, labels, batch_size=4, seed=1, device='cpu')
    assert len(dl) == 2 and len(CodeLoader(codes, batch_size=4, drop_last=False, device='cpu')) == 3
    batches = list(dl)
    for c, l in batches: assert c.shape == (4, 3, 3) and torch.equal(c, codes[l])   # labels travel with their maps
    assert not torch.equal(torch.cat([l for _, l in batches]), torch.cat([l for _, l in list(dl)]))  # reshuffled per epoch
    assert list(CodeLoader(codes, batch_size=4, device='cpu'))[0][1] is None
    with pytest.raises(ValueError): CodeLoader(codes.float())
    with pytest.raises(ValueError): CodeLoader(codes, labels[:3])
    net = GatedPixelCNN(5, dim=8, n_layers=2)
    assert math.isclose(evaluate_nll(net, codes, batch_size=3), float(net.nll(codes).detach()), rel_tol=1e-5)
    assert math.isclose(float(prior_step(net, (codes, labels))['loss'].detach()), float(net.nll(codes).detach()), rel_tol=1e-6)

def test_code_loader_epochs_replay_and_resume():
    "CodeLoader's epochs are fixed by (seed, epoch) like DeviceLoader's, and can start at any batch (fit resumes there)."
    from vqlearn.pixelcnn import CodeLoader
    codes, labels = torch.randint(0, 7, (50, 4, 4)), torch.arange(50)
    dl = CodeLoader(codes, labels, batch_size=8, seed=3)
    e0 = [y for _, y in dl]; e1 = [y for _, y in dl]
    assert dl.epoch == 2 and not all(torch.equal(a, b) for a, b in zip(e0, e1))
    assert all(torch.equal(a, y) for a, (_, y) in zip(e0, CodeLoader(codes, labels, 8, seed=3).iter_epoch(0)))
    assert torch.equal(next(dl.iter_epoch(1, start=2))[1], e1[2])
    assert sorted(torch.cat(e0).tolist()) == sorted(torch.cat(e0).unique().tolist())  # no repeats within an epoch
