"Tests for vqlearn.pixelcnn: masks, causality, conditioning, samplers (fast == naive), helpers and bad input."
import math
import pytest
import torch
import torch.nn.functional as F
from vqlearn.pixelcnn import (make_mask, MaskedConv2d, GatedLayer, GatedPixelCNN, dependency_maps, pick_codes,
                              draw_uniforms, sample_fast, sample_naive, RasterMarkovSource, CausalSelfAttention,
                              attention_offsets, RowCopySource)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _as_if_trained(net):
    "Random class embeddings and attention position biases, as a trained model has them (a new model's are zero)."
    for layer in net.layers:
        if layer.class_embed is not None: torch.nn.init.normal_(layer.class_embed.weight)
    for blk in net.attn.values(): torch.nn.init.normal_(blk.pos_bias)
    return net


def earlier(S, W=None):
    "(S, W, S, W) bool: input (r, c) comes strictly before output (i, j) in raster order (W defaults to S)."
    W = W or S
    t = torch.arange(S * W)
    return (t[None, :] < t[:, None]).reshape(S, W, S, W)


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
    net = _as_if_trained(GatedPixelCNN(3, width=4, n_layers=L, n_classes=2, cond_channels=1, kernel_size=k).double())
    lab, cond = torch.tensor([1]).repeat(S * S), torch.randn(S * S, 1, S, S, dtype=torch.float64)
    dep = dependency_maps(lambda z: net.features(z, lab, cond), torch.randn(1, 4, S, S, dtype=torch.float64))
    i, j, r, c = torch.meshgrid(*[torch.arange(S)] * 4, indexing='ij')
    dr, dc = r - i, c - j
    field = ((dr == 0) & (dc >= -n * L) & (dc <= -1)) | ((dr >= -(1 + n * L)) & (dr <= -1) & (dc.abs() <= n * L))
    assert torch.equal(dep, field & earlier(S))


def test_changing_a_code_moves_only_later_logits():
    torch.manual_seed(0)
    net = GatedPixelCNN(6, width=8, n_layers=3).double()
    codes = torch.randint(0, 6, (1, 5, 5))
    out = net(codes)
    for t in range(25):
        c2 = codes.clone(); c2.view(-1)[t] = (c2.view(-1)[t] + 1) % 6
        diff = (net(c2) - out).abs().sum(1).view(-1)
        assert (diff[:t + 1] == 0).all()
        if t % 5 < 4: assert diff[t + 1] > 0            # the right neighbour sees it ...
        if t + 5 < 25: assert diff[t + 5] > 0           # ... and so does the position below


def test_forward_shapes_and_bad_input():
    net = GatedPixelCNN(5, width=8, n_layers=2, n_classes=3, cond_channels=2)
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
    plain = GatedPixelCNN(5, width=8, n_layers=2)
    with pytest.raises(ValueError): plain(codes, lab)
    with pytest.raises(ValueError): plain(codes, cond=cond)
    for bad in [dict(num_codes=1), dict(n_layers=0), dict(kernel_size=4)]:
        with pytest.raises(ValueError): GatedPixelCNN(**{'num_codes': 5, **bad})


@pytest.mark.parametrize("kw", [dict(), dict(n_classes=3), dict(cond_channels=2, kernel_size=5)])
def test_fast_equals_naive(kw):
    torch.manual_seed(1)
    net = _as_if_trained(GatedPixelCNN(9, width=8, n_layers=3, **kw).double())
    lab = torch.tensor([2, 0, 1]) if 'n_classes' in kw else None
    cond = torch.randn(3, 2, 5, 4, dtype=torch.float64) if 'cond_channels' in kw else None
    for T, k in [(1.0, None), (1.5, 4), (0.3, None)]:
        a = net.sample((3, 5, 4), lab, cond, T, torch.Generator().manual_seed(3), "naive", k)
        b = net.sample((3, 5, 4), lab, cond, T, torch.Generator().manual_seed(3), "fast", k)
        assert torch.equal(a, b) and b.dtype == torch.int64 and b.shape == (3, 5, 4)
        assert 0 <= b.min() and b.max() < 9


def test_top1_is_greedy_and_sampler_keeps_training_mode():
    torch.manual_seed(2)
    net = GatedPixelCNN(7, width=8, n_layers=2).double().train()
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
    net = GatedPixelCNN(4, width=8, n_layers=2, n_classes=2)
    for bad in [dict(temperature=-1), dict(temperature=math.nan), dict(temperature=math.inf), dict(top_k=0), dict(method="slow"), dict(shape=(2, 3)),
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


def test_fast_equals_naive_float32_fixed_seed():
    "In float32 the two samplers add in different orders; for this seed no draw lands on a CDF step, so codes agree."
    torch.manual_seed(4)
    net = _as_if_trained(GatedPixelCNN(16, width=16, n_layers=4, n_classes=4))
    lab = torch.arange(8) % 4
    a = net.sample((8, 10, 10), lab, generator=torch.Generator().manual_seed(0), method="naive")
    b = net.sample((8, 10, 10), lab, generator=torch.Generator().manual_seed(0), method="fast")
    assert torch.equal(a, b)
    assert not torch.equal(b, net.sample((8, 10, 10), lab, generator=torch.Generator().manual_seed(1)))


def _greedy(net, shape, labels=None, cond=None):
    "Argmax decoding by hand, one full forward pass per position."
    B, H, W = shape
    out = torch.zeros(B, H, W, dtype=torch.long)
    for t in range(H * W):
        i, j = divmod(t, W)
        out[:, i, j] = net(out, labels, cond)[:, :, i, j].argmax(1)
    return out


@pytest.mark.parametrize("kw", [dict(), dict(n_classes=3, cond_channels=2, kernel_size=5)])
def test_temperature_zero_is_argmax_in_both_samplers(kw):
    "Temperature 0 means argmax (it used to raise): identical codes from naive and fast, equal to greedy decoding."
    torch.manual_seed(6)
    net = _as_if_trained(GatedPixelCNN(9, width=8, n_layers=3, **kw).double())
    lab = torch.tensor([2, 0, 1]) if 'n_classes' in kw else None
    cond = torch.randn(3, 2, 5, 4, dtype=torch.float64) if 'cond_channels' in kw else None
    a = net.sample((3, 5, 4), lab, cond, 0, torch.Generator().manual_seed(3), "naive")
    b = net.sample((3, 5, 4), lab, cond, 0.0, torch.Generator().manual_seed(4), "fast", top_k=2)  # no randomness left
    assert torch.equal(a, b) and torch.equal(a, _greedy(net, (3, 5, 4), lab, cond))
    logits = torch.tensor([[0.1, 3.0, -2.0], [5.0, 4.0, 4.5]])
    assert pick_codes(logits, torch.tensor([0.0, 0.99]), temperature=0).tolist() == [1, 0]
    tiny = pick_codes(logits, torch.tensor([0.99, 0.99]), temperature=1e-300)   # the limit, without overflow to NaN
    assert tiny.tolist() == [1, 0]


def _broken(net, where="head"):
    "Poison the model so that its logits become NaN (a diverged training run)."
    with torch.no_grad():
        if where == "head": net.head[3].bias[2] = math.nan
        else: net.head[3].bias[0] = math.inf
    return net


@pytest.mark.parametrize("method", ["fast", "naive"])
@pytest.mark.parametrize("where", ["head", "inf"])
def test_nonfinite_logits_raise(method, where):
    "NaN or inf logits used to be sampled as code K-1 without a word: now a clear ValueError."
    torch.manual_seed(0)
    net = _broken(GatedPixelCNN(5, width=8, n_layers=2), where)
    for T in (1.0, 0.0):
        with pytest.raises(ValueError, match="NaN or inf"):
            net.sample((2, 3, 3), temperature=T, generator=torch.Generator().manual_seed(0), method=method)
    with pytest.raises(ValueError, match="NaN or inf"):
        (sample_fast if method == "fast" else sample_naive)(net, draw_uniforms((2, 3, 3), torch.Generator().manual_seed(0)))


def test_pick_codes_rejects_nonfinite_and_bad_input():
    u = torch.tensor([0.3, 0.9])
    for bad in (math.nan, math.inf, -math.inf):
        logits = torch.tensor([[0.0, 1.0, 2.0], [0.0, bad, 1.0]])
        with pytest.raises(ValueError, match="NaN or inf"): pick_codes(logits, u)
        with pytest.raises(ValueError, match="NaN or inf"): pick_codes(logits, u, temperature=0)
    with pytest.raises(TypeError, match="float"): pick_codes(torch.tensor([[0, 1], [1, 0]]), u)
    with pytest.raises(ValueError, match=r"\(2,\)"): pick_codes(torch.zeros(2, 3), torch.zeros(3))


def test_empty_batches_and_wrong_dtypes_get_clear_messages():
    net = GatedPixelCNN(5, width=8, n_layers=2, n_classes=2, cond_channels=1)
    empty, lab, cond = torch.zeros(0, 4, 4, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, 4, 4)
    with pytest.raises(ValueError, match="empty"): net(empty, lab, cond)
    with pytest.raises(ValueError, match="empty"): GatedPixelCNN(5, width=8, n_layers=2)(empty)
    with pytest.raises(ValueError, match="empty"): net.nll(empty, lab, cond)
    with pytest.raises(ValueError, match="B = 0"): net.sample((0, 4, 4), lab, cond)
    with pytest.raises(ValueError, match="empty"): sample_fast(net, torch.rand(0, 4, 4, dtype=torch.float64), lab, cond)
    with pytest.raises(ValueError, match="empty"): sample_naive(net, torch.rand(0, 4, 4, dtype=torch.float64), lab, cond)
    codes, lab, cond = torch.zeros(2, 4, 4, dtype=torch.long), torch.tensor([0, 1]), torch.zeros(2, 1, 4, 4)
    with pytest.raises(TypeError, match="integers"): net(codes, lab.float(), cond)
    with pytest.raises(TypeError, match="integers"): net(codes, lab.bool(), cond)
    with pytest.raises(TypeError, match="float"): net(codes, lab, cond.long())
    with pytest.raises(TypeError, match="integer tensor"): net(codes.float(), lab, cond)
    with pytest.raises(TypeError, match="float tensor"): sample_fast(net, torch.zeros(2, 4, 4, dtype=torch.long), lab, cond)
    with pytest.raises(TypeError, match="float tensor"): sample_naive(net, torch.rand(4, 4), lab, cond)
    assert net.double()(codes, lab, cond).dtype == torch.float64          # a float32 cond follows a float64 model


def test_class_embeddings_start_at_zero():
    "A new conditional model starts as an unconditional one: its labels change nothing until it is trained."
    torch.manual_seed(0)
    net = GatedPixelCNN(5, width=8, n_layers=3, n_classes=4)
    assert all(not layer.class_embed.weight.any() for layer in net.layers)
    codes = torch.randint(0, 5, (2, 4, 4))
    assert torch.equal(net(codes, torch.tensor([0, 1])), net(codes, torch.tensor([3, 2])))
    _as_if_trained(net)
    assert (net(codes, torch.tensor([0, 1])) - net(codes, torch.tensor([3, 2]))).abs().min() > 0


def test_names_explain_themselves_and_width():
    layer = GatedLayer(8, kernel_size=5, mask_type="A", n_classes=3, cond_channels=2)
    names = {n.split('.')[0] for n, _ in layer.named_parameters()}
    assert names == {'conv_vert', 'conv_horiz', 'vert_to_horiz', 'horiz_out', 'class_embed', 'cond_conv'}
    assert layer.horiz_kernel == 2 and layer.reach == 2 and layer.width == 8
    net = GatedPixelCNN(11, width=12, n_layers=2)
    assert net.width == 12 and net.code_embed.weight.shape == (11, 12) and not hasattr(net, 'dim')
    with pytest.raises(TypeError): GatedPixelCNN(11, dim=12)


def test_checkpoint_roundtrip(tmp_path):
    "GatedPixelCNN is Checkpointable: from_checkpoint rebuilds it from its config alone, with the same outputs."
    torch.manual_seed(0)
    net = _as_if_trained(GatedPixelCNN(6, width=8, n_layers=3, n_classes=2, cond_channels=1, kernel_size=5))
    codes, lab, cond = torch.randint(0, 6, (2, 4, 4)), torch.tensor([1, 0]), torch.randn(2, 1, 2, 2)
    net.save(tmp_path / 'p.safetensors', note='test')
    back = GatedPixelCNN.from_checkpoint(tmp_path / 'p.safetensors', device='cpu')
    assert back.config == net.config == dict(num_codes=6, width=8, n_layers=3, n_classes=2, cond_channels=1, kernel_size=5)
    assert not back.training and torch.equal(back(codes, lab, cond), net.eval()(codes, lab, cond))
    g = lambda: torch.Generator().manual_seed(2)
    assert torch.equal(back.sample((2, 4, 4), lab, cond, generator=g()), net.sample((2, 4, 4), lab, cond, generator=g()))
    other = GatedPixelCNN(6, width=8, n_layers=2)
    other.save(tmp_path / 'q.safetensors')
    assert GatedPixelCNN.from_checkpoint(tmp_path / 'q.safetensors').n_layers == 2
    (tmp_path / 'bad.safetensors').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match='bad.safetensors'): GatedPixelCNN.from_checkpoint(tmp_path / 'bad.safetensors')


def _separating_prior(K=6, n_classes=3, seed=2):
    "A prior whose label dominates: class y puts most of its mass on code y (about 75% of draws), context does the rest."
    torch.manual_seed(seed)
    net = GatedPixelCNN(K, width=8, n_layers=2, n_classes=n_classes).double()
    d, last = net.width, net.layers[-1]
    with torch.no_grad():
        emb = last.class_embed.weight                                  # (n_classes, 4d): [vertical 2d | horizontal 2d]
        emb.zero_(); emb[:, 3 * d:] = 10.0                             # the last horizontal gates wide open ...
        emb[:, 2 * d:3 * d] = -10.0
        for y in range(n_classes): emb[y, 2 * d + y] = 10.0            # ... +1 on channel y only, -1 elsewhere
        last.horiz_out.weight[:, :, 0, 0] = 3 * torch.eye(d); last.horiz_out.bias.zero_()
        net.head[1].weight[:, :, 0, 0] = torch.eye(d); net.head[1].bias.zero_()
        net.head[3].weight[:, :, 0, 0] += torch.eye(K, d)              # channel y -> logit y
    return net.eval()


def _reference_sample(net, u, labels):
    "Inverse-CDF sampling straight from the definition, one full forward pass per position, per row's own label."
    B, H, W = u.shape
    out = torch.zeros(B, H, W, dtype=torch.long)
    for t in range(H * W):
        i, j = divmod(t, W)
        p = net(out, labels)[:, :, i, j].softmax(1).cumsum(1)           # (B, K)
        out[:, i, j] = (p <= u[:, i, j, None] * p[:, -1:]).sum(1).clamp(max=net.num_codes - 1)
    return out


@pytest.mark.parametrize("method", ["fast", "naive"])
def test_samples_follow_each_rows_label(method):
    "Catches 'sample labels forced to class 0': label-1 rows match a per-class reference and differ from label 0."
    net = _separating_prior()
    lab = torch.tensor([0, 1, 2, 1, 0, 2])
    s = net.sample((6, 4, 5), lab, generator=torch.Generator().manual_seed(1), method=method)
    u = draw_uniforms((6, 4, 5), torch.Generator().manual_seed(1))
    assert torch.equal(s, _reference_sample(net, u, lab))
    assert (s == lab[:, None, None]).float().mean() > 0.5                # class y mostly draws code y (chance: 1/6)
    for y in range(3):                                                 # the same uniforms, every row given label y
        only_y = net.sample((6, 4, 5), torch.full((6,), y), generator=torch.Generator().manual_seed(1), method=method)
        assert torch.equal(s[lab == y], only_y[lab == y])
        assert (s[lab != y] != only_y[lab != y]).float().mean() > 0.5  # another label gives other maps


# ---------------------------------------------------------------- causal self-attention
def _embedded(net, H, W, seed=0):
    "The code embeddings (1, width, H, W) of a random map: dependence maps through real codes."
    codes = torch.randint(0, net.num_codes, (1, H, W), generator=torch.Generator().manual_seed(seed))
    return net.code_embed(codes).permute(0, 3, 1, 2).detach()


@pytest.mark.parametrize("L,every,k", [(1, 1, 3), (2, 2, 3), (2, 1, 5), (3, 2, 3)])
def test_attention_sees_exactly_every_earlier_position(L, every, k):
    "With an attention block, the features at (i, j) depend on exactly the earlier positions, however few gated layers."
    torch.manual_seed(L + k)
    H, W = 6, 9                                                         # wider than any field here: row ends are far
    net = _as_if_trained(GatedPixelCNN(5, width=8, n_layers=L, n_classes=2, cond_channels=1, kernel_size=k,
                                       attn_every=every, attn_heads=2).double())
    lab, cond = torch.tensor([1]).repeat(H * W), torch.randn(H * W, 1, H, W, dtype=torch.float64)
    dep = dependency_maps(lambda z: net.features(z, lab, cond), _embedded(net, H, W))
    assert torch.equal(dep, earlier(H, W))
    plain = GatedPixelCNN(5, width=8, n_layers=L, kernel_size=k).double()   # the same stack without attention misses some
    assert (earlier(H, W) & ~dependency_maps(lambda z: plain.features(z), _embedded(plain, H, W))).any()


def test_attention_needs_the_codes_in_its_keys_and_values():
    "Keys/values from the features alone miss the end of the row above at the start of a row; with the codes, nothing is missed."
    torch.manual_seed(3)
    net = _as_if_trained(GatedPixelCNN(5, width=8, n_layers=2, attn_every=2, attn_heads=2).double())
    blk = net.attn['1']
    def gated(z):
        v = h = z
        for layer in net.layers: v, h = layer(v, h)
        return h
    x = _embedded(net, 6, 8)
    dep_feat = dependency_maps(lambda z: blk(gated(z), torch.zeros_like(z)), x)
    assert not (dep_feat & ~earlier(6, 8)).any() and dep_feat.sum() > 0
    assert not dep_feat[2, 0, 1, 7] and not dep_feat[4, 1, 3, 7]        # (i-1, W-1) is invisible from (i, 0) and (i, 1)
    assert torch.equal(dependency_maps(lambda z: blk(gated(z), z), x), earlier(6, 8))


def test_attention_block_alone_and_offsets():
    torch.manual_seed(0)
    blk = CausalSelfAttention(8, heads=4, max_offset=2).double()
    torch.nn.init.normal_(blk.pos_bias)
    x = torch.randn(1, 8, 4, 5, dtype=torch.float64)
    assert torch.equal(dependency_maps(lambda z: blk(torch.zeros_like(z), z), x), earlier(4, 5))
    h = torch.randn(2, 8, 4, 5, dtype=torch.float64)
    out = blk(h, torch.randn(2, 8, 4, 5, dtype=torch.float64))
    assert out.shape == h.shape and torch.equal(out[:, :, 0, 0], h[:, :, 0, 0] + blk.out.bias[None])  # (0, 0): nothing to read
    r, c = attention_offsets(4, 5, 2)                                   # (20, 20)
    assert r.shape == (20, 20) and (r[19, 0], c[19, 0]) == (2, 0)        # 3 rows up, 4 left: clipped to (2, -2)
    assert (r[6, 0], c[6, 0]) == (1, 1) and (r[6, 4], c[6, 4]) == (1, 4)  # (1, 1) -> (0, 0): (-1, -1); -> (0, 4): (-1, +3 clipped to 2)
    assert blk.position_bias(4, 5).shape == (4, 20, 20)
    for bad in [dict(heads=3), dict(heads=0), dict(max_offset=0)]:
        with pytest.raises(ValueError): CausalSelfAttention(**{'width': 8, **bad})


def test_changing_a_code_moves_only_later_logits_with_attention():
    "One gated layer + attention: a code moves no earlier logit, and the logits of the last position see the first code."
    torch.manual_seed(1)
    net = _as_if_trained(GatedPixelCNN(6, width=8, n_layers=1, attn_every=1, attn_heads=2).double())
    codes = torch.randint(0, 6, (1, 5, 7))
    out = net(codes)
    for t in range(35):
        c2 = codes.clone(); c2.view(-1)[t] = (c2.view(-1)[t] + 1) % 6
        diff = (net(c2) - out).abs().sum(1).view(-1)
        assert (diff[:t + 1] == 0).all() and (diff[t + 1:] > 0).all()   # every later position sees it


ATTN_CONFIGS = [dict(attn_every=1, attn_heads=2), dict(n_classes=3, cond_channels=2, attn_every=2, attn_heads=4),
                dict(n_classes=3, attn_every=1, attn_heads=2, attn_max_offset=1, kernel_size=5)]


@pytest.mark.parametrize("kw", ATTN_CONFIGS)
def test_attention_fast_equals_naive(kw):
    "Identical codes from the cached sampler with attention blocks: labels (integer and soft), cond, temperature, top-k."
    torch.manual_seed(2)
    net = _as_if_trained(GatedPixelCNN(9, width=8, n_layers=3, **kw).double())
    labs = [None] if 'n_classes' not in kw else [torch.tensor([2, 0, 1]), torch.tensor([[0.2, 0.3, 0.5], [0, 1, 0], [0.5, 0.5, 0]])]
    cond = torch.randn(3, 2, 5, 3, dtype=torch.float64) if 'cond_channels' in kw else None
    for lab in labs:
        for T, k in [(1.0, None), (1.5, 4), (0.4, None), (0.0, None)]:
            a = net.sample((3, 5, 6), lab, cond, T, torch.Generator().manual_seed(3), "naive", k)
            b = net.sample((3, 5, 6), lab, cond, T, torch.Generator().manual_seed(3), "fast", k)
            assert torch.equal(a, b), (kw, T, k)


def test_attention_fast_equals_naive_float32_fixed_seed():
    torch.manual_seed(4)
    net = _as_if_trained(GatedPixelCNN(16, width=16, n_layers=4, n_classes=4, attn_every=2, attn_heads=2))
    lab = torch.arange(6) % 4
    a = net.sample((6, 8, 8), lab, generator=torch.Generator().manual_seed(0), method="naive")
    b = net.sample((6, 8, 8), lab, generator=torch.Generator().manual_seed(0), method="fast")
    assert torch.equal(a, b)


def test_attention_off_by_default_keeps_config_and_state(tmp_path):
    "Default: no attention modules, the old config keys, and checkpoints of attention-free models load as before."
    torch.manual_seed(0)
    net = GatedPixelCNN(6, width=8, n_layers=3, n_classes=2)
    assert set(net.config) == {'num_codes', 'width', 'n_layers', 'n_classes', 'cond_channels', 'kernel_size'}
    assert not any(k.startswith('attn') for k in net.state_dict()) and net.attn_layers == []
    torch.manual_seed(0)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), GatedPixelCNN(6, width=8, n_layers=3, n_classes=2).state_dict().values()))
    anet = _as_if_trained(GatedPixelCNN(6, width=8, n_layers=4, attn_every=2, attn_heads=2, attn_max_offset=5))
    assert anet.attn_layers == [1, 3] and anet.config['attn_every'] == 2 and anet.config['attn_max_offset'] == 5
    back = GatedPixelCNN.from_checkpoint(anet.save(tmp_path / 'a.safetensors'), device='cpu')
    codes = torch.randint(0, 6, (2, 5, 5))
    assert back.config == anet.config and torch.equal(back(codes), anet.eval()(codes))
    g = lambda: torch.Generator().manual_seed(1)
    assert torch.equal(back.sample((2, 5, 5), generator=g()), anet.sample((2, 5, 5), generator=g()))


def test_attention_bad_arguments():
    for bad in [dict(attn_every=-1), dict(attn_every=1.5), dict(attn_every=True), dict(attn_every=1, attn_heads=3),
                dict(attn_every=1, attn_max_offset=0)]:
        with pytest.raises(ValueError): GatedPixelCNN(5, width=8, n_layers=2, **bad)


# ---------------------------------------------------------------- soft labels
def test_soft_one_hot_labels_are_exactly_the_integer_labels():
    "One-hot soft labels give bit-identical logits, NLL and sampled codes (both samplers, same seed)."
    torch.manual_seed(5)
    for dt in (torch.float32, torch.float64):
        net = _as_if_trained(GatedPixelCNN(7, width=8, n_layers=3, n_classes=3, cond_channels=1, attn_every=3, attn_heads=2).to(dt))
        lab = torch.tensor([2, 0, 1, 1])
        soft = F.one_hot(lab, 3).float()                                  # float32 weights, whatever the model's dtype
        codes, cond = torch.randint(0, 7, (4, 5, 4)), torch.randn(4, 1, 5, 4)
        assert torch.equal(net(codes, soft, cond), net(codes, lab, cond))
        assert torch.equal(net.nll(codes, soft, cond), net.nll(codes, lab, cond))
        for method in ("fast", "naive"):
            a = net.sample((4, 5, 4), soft, cond, generator=torch.Generator().manual_seed(0), method=method, temperature=0.9, top_k=5)
            b = net.sample((4, 5, 4), lab, cond, generator=torch.Generator().manual_seed(0), method=method, temperature=0.9, top_k=5)
            assert torch.equal(a, b), (dt, method)


def test_soft_labels_interpolate_the_class_embeddings():
    torch.manual_seed(6)
    net = _as_if_trained(GatedPixelCNN(5, width=8, n_layers=2, n_classes=3).double())
    lam = 0.3
    mix = torch.tensor([[lam, 0.0, 1 - lam]], dtype=torch.float64)
    for layer in net.layers:                                              # lam * e_0 + (1 - lam) * e_2 in every layer
        want = lam * layer.cond_bias(torch.tensor([0])) + (1 - lam) * layer.cond_bias(torch.tensor([2]))
        assert torch.allclose(layer.cond_bias(mix), want, atol=1e-12)
    codes = torch.randint(0, 5, (1, 4, 4))
    mid, a, b = net(codes, mix), net(codes, torch.tensor([0])), net(codes, torch.tensor([2]))
    assert (mid - a).abs().min() > 0 and (mid - b).abs().min() > 0
    ends = [net(codes, torch.tensor([[1.0, 0, 0]], dtype=torch.float64)), net(codes, torch.tensor([[0, 0, 1.0]], dtype=torch.float64))]
    assert torch.equal(ends[0], a) and torch.equal(ends[1], b)
    s = [net.sample((64, 4, 4), torch.tensor([[l, 0.0, 1 - l]]).expand(64, 3), generator=torch.Generator().manual_seed(2))
         for l in (0.0, 0.5, 1.0)]
    assert not torch.equal(s[1], s[0]) and not torch.equal(s[1], s[2])


def test_soft_labels_bad_input_clear_errors():
    net = GatedPixelCNN(5, width=8, n_layers=2, n_classes=3)
    codes = torch.zeros(2, 4, 4, dtype=torch.long)
    cases = [(torch.tensor([[0.5, 0.5], [1.0, 0.0]]), "shape \\(2, 3\\)"),            # wrong number of classes
             (torch.tensor([[0.5, 0.5, 0.0]]), "shape \\(2, 3\\)"),                     # wrong batch
             (torch.tensor([[1.5, -0.5, 0.0], [1.0, 0, 0]]), ">= 0"),
             (torch.tensor([[0.5, 0.6, 0.0], [1.0, 0, 0]]), "sum to 1.*row 0"),
             (torch.tensor([[1.0, 0, 0], [0.2, 0.2, 0.2]]), "sum to 1.*row 1"),
             (torch.tensor([[math.nan, 1.0, 0.0], [1.0, 0, 0]]), "finite")]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg): net(codes, bad)
        with pytest.raises(ValueError, match=msg): net.sample((2, 4, 4), bad)
    with pytest.raises(TypeError, match="integers"): net(codes, torch.tensor([0.0, 1.0]))   # float (B,): neither kind
    with pytest.raises(ValueError, match="shape"): net(codes, torch.tensor([[0, 1, 0], [1, 0, 0]]))   # integer (B, n)
    with pytest.raises(ValueError, match="n_classes=None"): GatedPixelCNN(5, width=8, n_layers=2)(codes, torch.tensor([[1.0, 0, 0]] * 2))


# ---------------------------------------------------------------- the long-range source
def test_row_copy_source():
    src = RowCopySource(K=4, H=6, W=5, shift=3, eps=0.2)
    p = torch.tensor([0.8 + 0.05, 0.05, 0.05, 0.05], dtype=torch.float64)
    assert math.isclose(src.copy_entropy, float(-(p * p.log()).sum()))
    assert math.isclose(src.entropy_per_code, (3 * math.log(4) + 3 * src.copy_entropy) / 6)
    x = src.sample(4000, torch.Generator().manual_seed(0))
    assert x.shape == (4000, 6, 5) and x.dtype == torch.int64 and 0 <= x.min() and x.max() < 4
    assert abs(float((x[:, 3:] == x[:, :3]).double().mean()) - 0.85) < 0.01          # 1 - eps + eps / K
    assert abs(float((x[:, 1] == x[:, 0]).double().mean()) - 0.25) < 0.02            # top rows independent
    z = RowCopySource(3, 4, 4, 2, eps=0.0).sample(50)
    assert torch.equal(z[:, 2:], z[:, :2]) and RowCopySource(3, 4, 4, 2, eps=0.0).copy_entropy == 0
    assert math.isclose(RowCopySource(3, 4, 4, 2, eps=1.0).entropy_per_code, math.log(3))
    for bad in [dict(K=1), dict(shift=0), dict(shift=8), dict(eps=1.5)]:
        with pytest.raises(ValueError): RowCopySource(**{'K': 4, 'H': 8, 'W': 8, **bad})
