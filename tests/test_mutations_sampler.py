"""Mutation-style check of the Gated PixelCNN samplers.

The checks below are plain functions that raise when a sampler is wrong. `test_checks_pass` runs them on the real code;
`test_mutant_is_caught` breaks the code on purpose, one small source edit at a time (an off-by-one cache row, a
dropped `top_k`, an ignored temperature, a wrong CDF threshold, labels forced to class 0, an attention mask that lets
a position read its own code, a stale attention cache, soft labels collapsed to one class, ...), and requires that at
least one check fails. A mutant that no check notices means the checks are too weak.
"""
import __future__
import inspect, math, textwrap
import pytest
import torch
import vqlearn.pixelcnn as P
from test_pixelcnn import _as_if_trained, _separating_prior, _reference_sample   # random class embeddings; a prior
# whose label dominates; sampling straight from the definition


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed: int) -> torch.Generator: return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- the checks
def check_fast_equals_naive():
    "Both samplers give the same codes (float64) with labels, a half-size spatial condition, temperature, top-k, k=5."
    for kw, T, k in [(dict(n_classes=3, cond_channels=2), 1.0, None), (dict(n_classes=3, cond_channels=2), 0.6, 3),
                     (dict(cond_channels=1, kernel_size=5), 1.3, None), (dict(n_classes=3), 0.0, None)]:
        torch.manual_seed(1)
        net = _as_if_trained(P.GatedPixelCNN(7, width=8, n_layers=3, **kw).double())
        lab = torch.tensor([2, 0, 1]) if 'n_classes' in kw else None
        cond = torch.randn(3, kw['cond_channels'], 2, 3, dtype=torch.float64) if 'cond_channels' in kw else None
        a = net.sample((3, 4, 6), lab, cond, T, gen(3), "naive", k)
        b = net.sample((3, 4, 6), lab, cond, T, gen(3), "fast", k)
        assert torch.equal(a, b), (kw, T, k)


def check_inverse_cdf_exact():
    "pick_codes returns the first code whose cumulative probability exceeds u (a reference in float64)."
    p = torch.tensor([[0.25, 0.25, 0.5]], dtype=torch.float64)
    u = torch.tensor([0.05, 0.3, 0.45, 0.6, 0.95], dtype=torch.float64)
    assert P.pick_codes(p.log().expand(5, 3), u).tolist() == [0, 1, 1, 2, 2]
    logits = torch.randn(500, 9, dtype=torch.float64, generator=gen(0))
    u = torch.rand(500, dtype=torch.float64, generator=gen(1))
    want = (logits.softmax(1).cumsum(1) <= u[:, None]).sum(1)
    assert torch.equal(P.pick_codes(logits, u), want)


def check_frequencies_match_multinomial():
    "Inverse-CDF draws have the frequencies of torch.multinomial on softmax(logits / T), restricted to the top k."
    n = 100_000
    logits = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.0, 0.0], dtype=torch.float64)
    for T, k in [(1.0, None), (0.5, None), (2.0, None), (1.0, 3), (0.7, 2)]:
        z = logits / T
        if k: z = z.masked_fill(z < z.topk(k).values[-1], -math.inf)
        ref = torch.bincount(torch.multinomial(z.softmax(0), n, replacement=True, generator=gen(2)), minlength=6) / n
        got = torch.bincount(P.pick_codes(logits.expand(n, 6), P.draw_uniforms((n,), gen(3)), T, k), minlength=6) / n
        assert 0.5 * (got - ref).abs().sum() < 0.01, (T, k, got, ref)
        if k: assert (got[torch.isinf(z)] == 0).all()                  # nothing outside the top k, ever


def check_temperature_and_top_k_reach_the_samples():
    "Through GatedPixelCNN.sample: the first position (no context) has the frequencies of its softmax(logits / T), top-k."
    torch.manual_seed(4)
    net = P.GatedPixelCNN(5, width=8, n_layers=2).double()
    with torch.no_grad(): net.head[3].bias.copy_(torch.tensor([1.5, 0.0, -1.0, 0.5, -2.0], dtype=torch.float64))
    first = net(torch.zeros(1, 1, 1, dtype=torch.long))[0, :, 0, 0].detach()   # (K,): the logits of position (0, 0)
    n = 20_000
    for method in ("fast", "naive"):
        for T, k in [(0.5, None), (2.0, None), (1.0, 2)]:
            z = first / T
            if k: z = z.masked_fill(z < z.topk(k).values[-1], -math.inf)
            got = torch.bincount(net.sample((n, 1, 1), temperature=T, top_k=k, generator=gen(5), method=method).flatten(), minlength=5) / n
            assert 0.5 * (got - z.softmax(0)).abs().sum() < 0.02, (method, T, k, got, z.softmax(0))
        greedy = torch.zeros(2, 3, 3, dtype=torch.long)
        for t in range(9):
            i, j = divmod(t, 3)
            greedy[:, i, j] = net(greedy)[:, :, i, j].argmax(1)
        assert torch.equal(net.sample((2, 3, 3), temperature=0, generator=gen(6), method=method), greedy)


def check_self_consistent_and_causal():
    "Every sampled code is the inverse CDF of the model's own conditional given the sampled past; a uniform moves only later codes."
    torch.manual_seed(7)
    net = _as_if_trained(P.GatedPixelCNN(6, width=8, n_layers=3, n_classes=2, cond_channels=1).double().eval())
    lab, cond = torch.tensor([1, 0]), torch.randn(2, 1, 5, 5, dtype=torch.float64)
    u = P.draw_uniforms((2, 5, 5), gen(8))
    for sampler in (P.sample_fast, P.sample_naive):
        codes = sampler(net, u, lab, cond, 0.8, 4)
        logits = net(codes, lab, cond)                                 # (B, K, H, W): one teacher-forced pass
        redo = P.pick_codes(logits.permute(0, 2, 3, 1).reshape(-1, 6), u.reshape(-1), 0.8, 4).view(2, 5, 5)
        assert torch.equal(codes, redo), sampler.__name__
        for t in (3, 12, 24):
            u2 = u.clone(); u2.view(2, -1)[:, t] = (u2.view(2, -1)[:, t] + 0.5) % 1
            assert torch.equal(sampler(net, u2, lab, cond, 0.8, 4).view(2, -1)[:, :t], codes.view(2, -1)[:, :t])


def check_labels_followed():
    "Each row follows its own label: a per-class reference by definition, and class y draws mostly code y."
    net = _separating_prior()
    lab = torch.tensor([0, 1, 2, 1, 0, 2])
    u = P.draw_uniforms((6, 3, 4), gen(9))
    ref = _reference_sample(net, u, lab)
    for method in ("fast", "naive"):
        s = net.sample((6, 3, 4), lab, generator=gen(9), method=method)
        assert torch.equal(s, ref), method
        assert (s == lab[:, None, None]).float().mean() > 0.5, method


def check_seeds():
    "The generator alone fixes the codes (not the global RNG); another seed gives other codes."
    torch.manual_seed(10)
    net = P.GatedPixelCNN(8, width=8, n_layers=2)
    torch.manual_seed(0); a = net.sample((4, 4, 4), generator=gen(11))
    torch.manual_seed(1); b = net.sample((4, 4, 4), generator=gen(11))
    assert torch.equal(a, b) and not torch.equal(a, net.sample((4, 4, 4), generator=gen(12)))


def check_attention_causal_and_self_consistent():
    "With attention: features see exactly the earlier positions; sampled codes are the inverse CDF of teacher-forced logits."
    torch.manual_seed(12)
    net = _as_if_trained(P.GatedPixelCNN(6, width=8, n_layers=2, n_classes=2, attn_every=1, attn_heads=2).double().eval())
    x = net.code_embed(torch.randint(0, 6, (1, 4, 7))).permute(0, 3, 1, 2).detach()
    t = torch.arange(28)
    lab1 = torch.tensor([1]).repeat(28)
    assert torch.equal(P.dependency_maps(lambda z: net.features(z, lab1), x), (t[None] < t[:, None]).reshape(4, 7, 4, 7))
    lab = torch.tensor([[0.3, 0.7], [1.0, 0.0]], dtype=torch.float64)
    u = P.draw_uniforms((2, 4, 7), gen(13))
    for sampler in (P.sample_fast, P.sample_naive):
        codes = sampler(net, u, lab, None, 0.9, 5)
        redo = P.pick_codes(net(codes, lab).permute(0, 2, 3, 1).reshape(-1, 6), u.reshape(-1), 0.9, 5).view(2, 4, 7)
        assert torch.equal(codes, redo), sampler.__name__


def check_attention_fast_equals_naive():
    "Both samplers give the same codes (float64) with attention blocks, soft labels, a spatial condition, temperature, top-k."
    for kw, T, k in [(dict(n_classes=3, cond_channels=2, attn_every=2, attn_heads=2), 1.0, None),
                     (dict(n_classes=3, attn_every=1, attn_heads=4, kernel_size=5), 0.7, 3)]:
        torch.manual_seed(14)
        net = _as_if_trained(P.GatedPixelCNN(7, width=8, n_layers=3, **kw).double())
        lab = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.1, 0.6, 0.3]], dtype=torch.float64)
        cond = torch.randn(3, 2, 2, 3, dtype=torch.float64) if 'cond_channels' in kw else None
        a = net.sample((3, 4, 6), lab, cond, T, gen(15), "naive", k)
        b = net.sample((3, 4, 6), lab, cond, T, gen(15), "fast", k)
        assert torch.equal(a, b), (kw, T, k)


def check_attention_bias_names_the_offset():
    "A block whose bias table favours one offset, (-1 row, +1 column), with no content scores, copies the code found there."
    d, R = 4, 3
    blk = P.CausalSelfAttention(d, heads=1, max_offset=R).double()
    with torch.no_grad():
        for lin in (blk.query, blk.key): lin.weight.zero_(); lin.bias.zero_()
        blk.value.weight.zero_(); blk.value.weight[:, d:] = torch.eye(d); blk.value.bias.zero_()   # value = x_s
        blk.out.weight.copy_(torch.eye(d)); blk.out.bias.zero_()
        blk.pos_bias.fill_(-60.0); blk.pos_bias[0, 1, R + 1] = 60.0                # row index -dr = 1, column dc + R
    x = torch.randn(1, d, 4, 5, dtype=torch.float64)
    out = blk(torch.zeros_like(x), x)
    assert torch.allclose(out[:, :, 1:, :-1], x[:, :, :-1, 1:], atol=1e-9)         # (i, j) reads (i - 1, j + 1)


def check_soft_labels_mix():
    "Soft labels: one-hot equals the integer label; a mix is the weighted sum of the class embeddings."
    torch.manual_seed(16)
    net = _as_if_trained(P.GatedPixelCNN(5, width=8, n_layers=2, n_classes=3).double())
    codes, lab = torch.randint(0, 5, (3, 4, 4)), torch.tensor([2, 0, 1])
    assert torch.equal(net(codes, torch.nn.functional.one_hot(lab, 3).double()), net(codes, lab))
    mix = torch.tensor([[0.25, 0.0, 0.75]], dtype=torch.float64)
    layer = net.layers[1]
    want = 0.25 * layer.cond_bias(torch.tensor([0])) + 0.75 * layer.cond_bias(torch.tensor([2]))
    assert torch.allclose(layer.cond_bias(mix), want)
    a = net.sample((3, 4, 4), mix.expand(3, 3), generator=gen(17), method="fast")
    assert torch.equal(a, net.sample((3, 4, 4), mix.expand(3, 3), generator=gen(17), method="naive"))


CHECKS = [check_inverse_cdf_exact, check_seeds, check_labels_followed, check_soft_labels_mix,  # cheapest first
          check_attention_bias_names_the_offset,
          check_frequencies_match_multinomial, check_self_consistent_and_causal, check_fast_equals_naive,
          check_attention_causal_and_self_consistent, check_attention_fast_equals_naive,
          check_temperature_and_top_k_reach_the_samples]


@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
def test_checks_pass(check):
    check()


# ---------------------------------------------------------------- the mutants: (name, function, old text, new text)
MUTANTS = [
    ("fast: row window never slides (stale cache row)", "sample_fast",
     "vert_in[l][:, :, :n] = vert_in[l][:, :, 1:].clone()", "vert_in[l][:, :, :n] = vert_in[l][:, :, :n].clone()"),
    ("fast: vertical pre-activations of row 0 reused for every row", "sample_fast",
     "vert_pre_above[l] = vp", "vert_pre_above[l] = vp if i == 0 else vert_pre_above[l]"),
    ("fast: condition map read one row too high", "sample_fast",
     "c[:, :, i if c.shape[2] > 1 else 0]", "c[:, :, max(i - 1, 0) if c.shape[2] > 1 else 0]"),
    ("fast: residual read from the column to the left", "sample_fast",
     "torch.addmm(horiz_row[l][:, n + j], g", "torch.addmm(horiz_row[l][:, n + j - 1], g"),
    ("fast: new code written one column left in the vertical cache", "sample_fast",
     "vert_in[0][:, :, n, n + j] = e", "vert_in[0][:, :, n, n + j - 1] = e"),
    ("fast: temperature ignored", "sample_fast",
     "pick_codes(logits, u[:, i, j], temperature, top_k, check=False)", "pick_codes(logits, u[:, i, j], 1.0, top_k, check=False)"),
    ("fast: top_k ignored", "sample_fast",
     "pick_codes(logits, u[:, i, j], temperature, top_k, check=False)", "pick_codes(logits, u[:, i, j], temperature, None, check=False)"),
    ("naive: logits of the previous position", "sample_naive",
     "logits = model(codes, labels, cond)[:, :, i, j]", "logits = model(codes, labels, cond)[:, :, i, max(j - 1, 0)]"),
    ("pick_codes: top_k ignored", "pick_codes",
     "if top_k is not None and top_k < z.shape[-1]:", "if False:"),
    ("pick_codes: temperature ignored", "pick_codes",
     "/ temperature", "/ 1.0"),
    ("pick_codes: temperature multiplies", "pick_codes",
     "/ temperature", "* temperature"),
    ("pick_codes: threshold 1 - u", "pick_codes",
     "thr = u.to(cdf.dtype)[:, None] * cdf[:, -1:]", "thr = (1 - u.to(cdf.dtype))[:, None] * cdf[:, -1:]"),
    ("pick_codes: threshold scaled by the first CDF entry", "pick_codes",
     "* cdf[:, -1:]", "* cdf[:, :1]"),
    ("pick_codes: exclusive CDF (off by one code)", "pick_codes",
     "cdf = vals.softmax(-1).cumsum(-1)", "cdf = vals.softmax(-1).cumsum(-1) - vals.softmax(-1)"),
    ("pick_codes: temperature 0 is argmin", "pick_codes",
     "return logits.argmax(-1)", "return logits.argmin(-1)"),
    ("sample: labels forced to class 0", "GatedPixelCNN.sample",
     "labels, cond = self.check_condition(B, H, W, labels, cond)",
     "labels, cond = self.check_condition(B, H, W, labels, cond); labels = None if labels is None else torch.zeros_like(labels)"),
    ("check_condition: labels forced to class 0", "GatedPixelCNN.check_condition",
     "labels = labels.long()", "labels = torch.zeros_like(labels).long()"),
    ("sample: temperature dropped", "GatedPixelCNN.sample",
     "(self, u, labels, cond, temperature, top_k)", "(self, u, labels, cond, 1.0, top_k)"),
    ("sample: top_k dropped", "GatedPixelCNN.sample",
     "(self, u, labels, cond, temperature, top_k)", "(self, u, labels, cond, temperature, None)"),
    ("draw_uniforms: generator ignored", "draw_uniforms",
     "generator=generator, device=gdev", "generator=None, device=gdev"),
    ("attention: position t reads its own code (s <= t)", "CausalSelfAttention.forward",
     ".tril(-1)", ".tril(0)"),
    ("attention: keys and values from the features only", "CausalSelfAttention.forward",
     "kv = torch.cat([hs, xs], -1)", "kv = torch.cat([hs, torch.zeros_like(xs)], -1)"),
    ("attention: position bias of the transposed pair", "CausalSelfAttention.position_bias",
     "return self.pos_bias[:, r, c]", "return self.pos_bias[:, r.t(), c.t()]"),
    ("fast attention: stale cache (the newest position missing)", "sample_fast",
     "slice(0, t)", "slice(0, max(t - 1, 0))"),
    ("fast attention: reads the not-yet-written cache entry of position t", "sample_fast",
     "slice(0, t)", "slice(0, t + 1)"),
    ("fast attention: cached keys/values ignore the drawn code", "sample_fast",
     "torch.cat([attn_in[l][:, t], e], -1)", "torch.cat([attn_in[l][:, t], torch.zeros_like(e)], -1)"),
    ("fast attention: keys/values from the block's output instead of its input", "sample_fast",
     "attn_in[l][:, t] = h_t", "attn_in[l][:, t] = 0 * h_t"),
    ("soft labels: weights ignored (the heaviest class used)", "GatedLayer.cond_bias",
     "c = labels @ self.class_embed.weight", "c = self.class_embed(labels.argmax(1))"),
    ("soft labels: weights renormalised away (uniform mix)", "GatedLayer.cond_bias",
     "c = labels @ self.class_embed.weight", "c = (labels > 0).to(labels.dtype) @ self.class_embed.weight / (labels > 0).sum(1, keepdim=True)"),
]


def apply_mutant(monkeypatch, target: str, old: str, new: str):
    "Replace `old` by `new` (it must occur exactly once) in the source of `target`, recompile it, and patch it in."
    owner_name, _, name = target.rpartition('.')
    owner = getattr(P, owner_name) if owner_name else P
    src = textwrap.dedent(inspect.getsource(getattr(owner, name)))
    assert src.count(old) == 1, f"mutant of {target} is stale: {old!r} occurs {src.count(old)} times in its source"
    ns = dict(vars(P))                                                  # the module's globals, copied
    exec(compile(src.replace(old, new), f"<mutant of {target}>", "exec", __future__.annotations.compiler_flag), ns)
    monkeypatch.setattr(owner, name, ns[name])


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m[0] for m in MUTANTS])
def test_mutant_is_caught(mutant, monkeypatch):
    name, target, old, new = mutant
    apply_mutant(monkeypatch, target, old, new)
    for check in CHECKS:                                                # stop at the first check that notices
        try: check()
        except Exception: return
    pytest.fail(f"mutant '{name}' survives every check")
