"Tests of vqlearn.quantize: lookup vs brute force, gradients, EMA arithmetic, chunking, autocast, bad inputs, codebook health."
import pytest, torch
import torch.nn.functional as F
from vqlearn.quantize import (VectorQuantizer, VectorQuantizerEMA, VQOutput, sq_distances, nearest_code, code_stats,
                              check_latents, kmeans)


def brute_codes(z_e, cb):
    flat = z_e.movedim(1, -1).reshape(-1, z_e.shape[1])
    return ((flat[:, None] - cb[None]) ** 2).sum(-1).argmin(1)


@pytest.mark.parametrize('cls', [VectorQuantizer, VectorQuantizerEMA])
def test_output_matches_brute_force(cls):
    torch.manual_seed(0)
    vq = cls(num_codes=50, dim=12).eval()
    vq.codebook.data.normal_()
    z_e = torch.randn(3, 12, 4, 5)
    out = vq(z_e)
    assert isinstance(out, VQOutput)
    assert out.z_q.shape == z_e.shape and out.codes.shape == (3, 4, 5) and out.codes.dtype == torch.int64
    ref = brute_codes(z_e, vq.codebook)
    assert torch.equal(out.codes.reshape(-1), ref)
    assert torch.allclose(out.z_q.movedim(1, -1).reshape(-1, 12), vq.codebook[ref], atol=1e-5)
    assert out.loss.ndim == 0 and out.perplexity.ndim == 0 and 0 < out.usage <= 1


def test_defaults_follow_the_paper():
    vq = VectorQuantizer()
    assert (vq.num_codes, vq.dim, vq.beta) == (512, 64, 0.25) and vq.embedding.shape == (512, 64)
    ema = VectorQuantizerEMA(512, 64)
    assert ema.decay == 0.99 and ema.beta == 0.25 and not any(p.requires_grad for p in ema.parameters())


def test_distances_float32_under_autocast_and_no_broadcast():
    torch.manual_seed(1)
    z, cb = torch.randn(500, 64), torch.randn(512, 64)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        d = sq_distances(z.bfloat16(), cb)
    assert d.dtype == torch.float32 and d.shape == (500, 512)
    ref = torch.cdist(z.bfloat16().float().double(), cb.double()).pow(2)
    assert torch.allclose(d.double(), ref, rtol=1e-4, atol=1e-3)
    vq = VectorQuantizer(512, 64); vq.embedding.data.normal_()
    z_e = torch.randn(2, 64, 8, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        a = vq(z_e)
    assert torch.equal(a.codes, vq(z_e).codes)


def test_chunked_equals_unchunked():
    torch.manual_seed(2)
    z, cb = torch.randn(1001, 16), torch.randn(64, 16)
    full = nearest_code(z, cb)
    for c in (1, 7, 100, 1000, 5000): assert torch.equal(nearest_code(z, cb, chunk_size=c), full)
    a, b = VectorQuantizer(64, 16), VectorQuantizer(64, 16, chunk_size=9)
    b.load_state_dict(a.state_dict()); a.embedding.data.normal_(); b.embedding.data.copy_(a.embedding.data)
    z_e = torch.randn(2, 16, 6, 6)
    oa, ob = a(z_e), b(z_e)
    assert torch.equal(oa.codes, ob.codes) and torch.equal(oa.z_q, ob.z_q)


def test_gradient_identities():
    torch.manual_seed(3)
    vq = VectorQuantizer(20, 6, beta=0.4); vq.embedding.data.normal_()
    z_e = torch.randn(2, 6, 3, 3, requires_grad=True)
    w = torch.randn(2, 6, 3, 3)
    out = vq(z_e); out.z_q.retain_grad()
    ((w * out.z_q).sum() + out.loss).backward()
    e_k = vq.embedding.detach()[out.codes].movedim(-1, 1)
    n = z_e.numel()
    assert torch.allclose(z_e.grad, w + 0.4 * 2 / n * (z_e.detach() - e_k), atol=1e-6)
    g = torch.zeros_like(vq.embedding).index_add_(0, out.codes.reshape(-1), (e_k - z_e.detach()).movedim(1, -1).reshape(-1, 6))
    assert torch.allclose(vq.embedding.grad, g * 2 / n, atol=1e-6)
    # the straight-through path alone sends nothing into the codebook
    vq.zero_grad(set_to_none=True)
    (w * vq(torch.randn(2, 6, 3, 3, requires_grad=True)).z_q).sum().backward()
    assert vq.embedding.grad is None
    # the loss is codebook + beta * commitment
    out = vq(torch.randn(2, 6, 3, 3))
    assert torch.allclose(out.loss, out.codebook_loss + 0.4 * out.commitment_loss)


def test_ema_hand_computation_with_smoothing():
    ema = VectorQuantizerEMA(num_codes=3, dim=2, decay=0.9, eps=0.01)
    e0 = torch.tensor([[0., 0.], [5., 5.], [-9., 9.]])
    ema.embedding.copy_(e0); ema.embed_sum.copy_(e0)
    z = torch.tensor([[1., 0.], [0., 1.], [4., 6.]])  # two to code 0, one to code 1, none to code 2
    out = ema(z.t().reshape(1, 2, 1, 3))
    assert out.codes.reshape(-1).tolist() == [0, 0, 1]
    N = 0.9 * torch.ones(3) + 0.1 * torch.tensor([2., 1., 0.])
    m = 0.9 * e0 + 0.1 * torch.stack([z[0] + z[1], z[2], torch.zeros(2)])
    n = N.sum(); Nt = (N + 0.01) / (n + 3 * 0.01) * n
    assert torch.allclose(ema.cluster_size, N) and torch.allclose(ema.embed_sum, m)
    assert torch.allclose(ema.embedding, m / Nt[:, None], atol=1e-6)
    assert torch.allclose(out.loss, 0.25 * F.mse_loss(z, e0[[0, 0, 1]]))


def test_ema_unused_codes_keep_their_norm():
    torch.manual_seed(4)
    ema = VectorQuantizerEMA(64, 8)
    before = ema.embedding.norm(dim=1).clone()
    out = ema(torch.randn(4, 8, 4, 4) * 0.05)
    unused = torch.ones(64, dtype=torch.bool); unused[out.codes.unique()] = False
    assert unused.any()
    assert torch.allclose(ema.embedding.norm(dim=1)[unused], before[unused], rtol=1e-3)


def test_eval_mode_does_not_update():
    ema = VectorQuantizerEMA(16, 4, kmeans_init=True, restart_after=1).eval()
    state = {k: v.clone() for k, v in ema.state_dict().items()}
    ema(torch.randn(2, 4, 3, 3))
    assert all(torch.equal(state[k], v) for k, v in ema.state_dict().items())


@pytest.mark.parametrize('cls', [VectorQuantizer, VectorQuantizerEMA])
def test_kmeans_init_and_restart(cls):
    torch.manual_seed(5)
    vq = cls(32, 4, kmeans_init=True, restart_after=3)
    z = torch.randn(2, 4, 8, 8) * 3 + 10  # far from the initial codebook
    out = vq(z)
    assert bool(vq.initted) and out.usage > 0.5  # k-means put codes where the data is
    # now feed data that only ever uses a few codes: the others are re-seeded onto encoder outputs after 3 steps
    z2 = torch.randn(2, 4, 8, 8) * 0.01 - 50
    for _ in range(4): vq(z2)
    cb = vq.codebook.detach()
    assert (cb.mean(1) < -40).float().mean() > 0.9  # nearly all codes moved next to the new data
    # a reloaded quantizer does not re-initialise
    vq2 = cls(32, 4, kmeans_init=True); vq2.load_state_dict(vq.state_dict())
    vq2(z); assert not torch.allclose(vq2.codebook, kmeans(z.movedim(1, -1).reshape(-1, 4), 32))


def test_code_stats():
    counts, ppl, usage = code_stats(torch.tensor([0, 0, 1, 1]), 4)
    assert counts.tolist() == [2, 2, 0, 0] and torch.isclose(ppl, torch.tensor(2.)) and usage == 0.5


@pytest.mark.parametrize('bad,err', [
    (torch.randn(2, 7, 4, 4), ValueError),  # D mismatch
    (torch.randn(2, 8, 4), ValueError),  # wrong ndim
    (torch.full((1, 8, 2, 2), float('nan')), ValueError),
    (torch.full((1, 8, 2, 2), float('inf')), ValueError),
    (torch.zeros(1, 8, 2, 2, dtype=torch.long), TypeError),
    ([[1.0]], TypeError),
])
@pytest.mark.parametrize('cls', [VectorQuantizer, VectorQuantizerEMA])
def test_bad_input(cls, bad, err):
    vq = cls(16, 8)
    with pytest.raises(err) as e: vq(bad)
    msg = str(e.value)
    assert ('8' in msg or 'NaN' in msg or 'dtype' in msg or 'Tensor' in msg)


def test_single_nan_is_caught_with_count():
    z = torch.randn(1, 8, 3, 3); z[0, 2, 1, 1] = float('nan')
    with pytest.raises(ValueError, match='1 NaN/inf'): check_latents(z, 8)
    check_latents(z, 8, check_finite=False)  # can be switched off


def test_lookup_range():
    vq = VectorQuantizer(10, 3)
    assert vq.lookup(torch.tensor([[[0, 9]]])).shape == (1, 3, 1, 2)
    for bad in (torch.tensor([[[10]]]), torch.tensor([[[-1]]])):
        with pytest.raises(ValueError, match=r'\[0, 9\]'): vq.lookup(bad)
    with pytest.raises(TypeError): vq.lookup(torch.tensor([[[1.0]]]))


def test_bad_constructor_args():
    with pytest.raises(ValueError): VectorQuantizer(0, 4)
    with pytest.raises(ValueError): VectorQuantizerEMA(4, 4, decay=1.0)
    with pytest.raises(ValueError): VectorQuantizerEMA(4, 4, restart_after=0)


def test_output_is_a_named_tuple():
    out = VectorQuantizer(8, 4)(torch.randn(1, 4, 2, 2))
    assert isinstance(out, tuple) and out._fields[:5] == ('z_q', 'codes', 'loss', 'perplexity', 'usage')
    z_q, codes, *_ = out
    assert z_q is out.z_q and codes is out.codes


def test_code_stats_uses_the_metrics_perplexity():
    from vqlearn.metrics import perplexity
    codes = torch.tensor([0, 0, 0, 1, 2, 2, 5])
    counts, ppl, _ = code_stats(codes, 8)
    assert torch.isclose(ppl, perplexity(counts)) and abs(ppl.item() - perplexity(torch.tensor([3., 1, 2, 1])).item()) < 1e-6


@pytest.mark.parametrize('cls,extra', [(VectorQuantizer, {}), (VectorQuantizerEMA, dict(decay=0.9, eps=1e-3, init_count=2.0))])
def test_config_rebuilds_the_quantizer(cls, extra):
    kw = dict(num_codes=12, dim=5, beta=0.3, kmeans_init=True, kmeans_iters=3, restart_after=7, chunk_size=11,
              check_finite=False, **extra)
    vq = cls(**kw)
    assert vq.config == {**{k: v for k, v in cls().config.items()}, **kw}  # every constructor argument, nothing else
    import inspect
    assert set(vq.config) == set(inspect.signature(cls).parameters)
    again = cls(**vq.config)
    assert again.config == vq.config and (again.num_codes, again.dim, again.beta, again.restart_after) == (12, 5, 0.3, 7)
    if extra: assert (again.decay, again.eps) == (0.9, 1e-3) and torch.all(again.cluster_size == 2.0)


def _inertia(x, c):
    return ((x[:, None] - c[None]) ** 2).sum(-1).min(1).values.sum().item()


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_kmeans_reaches_a_lloyd_fixed_point(seed):
    "Each centre is the mean of the points assigned to it, and the inertia is far below that of the random start."
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(6, 3, generator=g) * 4
    x = (means[torch.randint(0, 6, (600,), generator=g)] + 0.5 * torch.randn(600, 3, generator=g))  # (600, 3)
    c = kmeans(x, 6, iters=50, generator=torch.Generator().manual_seed(seed))
    start = x[torch.randperm(600, generator=torch.Generator().manual_seed(seed))[:6]]  # kmeans' own random start
    a = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    for j in range(6):
        if (a == j).any(): assert torch.allclose(c[j], x[a == j].mean(0), atol=1e-5), f"centre {j} is not the mean of its points"
    assert _inertia(x, c) < 0.9 * _inertia(x, start)
    # the default 10 iterations also move the centres well away from the start
    c10 = kmeans(x, 6, generator=torch.Generator().manual_seed(seed))
    assert _inertia(x, c10) < 0.9 * _inertia(x, start)


def test_kmeans_init_runs_lloyd_iterations():
    "The quantizer's k-means initialisation really iterates: its codes are means of the first batch's vectors."
    torch.manual_seed(0)
    z = torch.randn(1, 2, 16, 16) * 3
    vq = VectorQuantizerEMA(4, 2, kmeans_init=True, kmeans_iters=30)
    vq._maybe_init(z.movedim(1, -1).reshape(-1, 2))
    flat = z.movedim(1, -1).reshape(-1, 2)
    a = nearest_code(flat, vq.codebook)
    for j in range(4):
        if (a == j).any(): assert torch.allclose(vq.codebook[j], flat[a == j].mean(0), atol=1e-5)
