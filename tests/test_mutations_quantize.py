"""Mutation-style checks of the quantizers: properties written as functions that pass on the real quantizers and
fail on deliberately broken variants (one source line changed, compiled and monkeypatched onto the class)."""
import __future__, inspect, textwrap
import pytest, torch
import torch.nn.functional as F
import vqlearn.quantize as Q
from vqlearn.quantize import VectorQuantizer, VectorQuantizerEMA


def _fresh(cls, seed=0, **kw):
    "A quantizer (K=24, D=5) with codes spread out, and a batch of latents (2, 5, 3, 4) that uses several of them."
    torch.manual_seed(seed)
    vq = cls(24, 5, **kw)
    with torch.no_grad():
        cb = torch.randn(24, 5)
        vq.codebook.copy_(cb)
        if isinstance(vq, VectorQuantizerEMA): vq.embed_sum.copy_(cb * vq.cluster_size[:, None])
    return vq, torch.randn(2, 5, 3, 4)


def _brute(z_e, cb):
    flat = z_e.detach().movedim(1, -1).reshape(-1, z_e.shape[1])
    return ((flat[:, None] - cb.detach()[None]) ** 2).sum(-1).argmin(1)  # (N,)


def _picked(z_e, cb, codes):
    return cb.detach()[codes.reshape(-1)].view(z_e.shape[0], *z_e.shape[2:], -1).movedim(-1, 1)  # (B, D, H, W)


# ---- the properties ------------------------------------------------------------------------------------------

def nearest_code_assignment(cls):
    "codes are the brute-force nearest codes (before any update), z_q carries their values, quantize() agrees."
    vq, z_e = _fresh(cls)
    cb0 = vq.codebook.detach().clone()
    ref = _brute(z_e, cb0)
    assert len(ref.unique()) > 3
    out = vq.eval()(z_e)
    assert torch.equal(out.codes.reshape(-1), ref), "codes are not the nearest codes"
    assert torch.allclose(out.z_q, _picked(z_e, cb0, out.codes), atol=1e-6), "z_q is not the picked codes"
    assert torch.equal(vq.quantize(z_e).reshape(-1), ref)
    vq.train()
    out = vq(z_e)  # training mode: assigned with the codebook as it was before this step's update
    assert torch.equal(out.codes.reshape(-1), ref), "training-mode codes are not the nearest codes"


def straight_through_is_identity(cls):
    "The gradient of any function of z_q reaches z_e unchanged; z_q sends nothing into the codebook."
    vq, z_e = _fresh(cls)
    z_e.requires_grad_(True)
    w = torch.randn(z_e.shape)
    (w * vq(z_e).z_q).sum().backward()
    assert z_e.grad is not None and torch.allclose(z_e.grad, w, atol=1e-6), "straight-through gradient is not the identity"
    cb = vq.codebook
    assert cb.grad is None or cb.grad.abs().max() == 0, "z_q sent a gradient into the codebook"


def codebook_learns_only_from_codebook_loss(cls):
    "Plain codebook: gradient 2/n (e_k - z_e) summed per code from the codebook loss, none from the commitment loss."
    if cls is not VectorQuantizer: return
    vq, z_e = _fresh(cls)
    z_e.requires_grad_(True)
    out = vq(z_e)
    e_k, n = _picked(z_e, vq.codebook, out.codes), z_e.numel()
    assert torch.allclose(out.codebook_loss, F.mse_loss(e_k, z_e.detach()), atol=1e-6)
    out.commitment_loss.backward(retain_graph=True)
    assert vq.embedding.grad is None or vq.embedding.grad.abs().max() == 0, "the commitment loss moved the codebook"
    z_e.grad = None
    out.codebook_loss.backward()
    assert z_e.grad is None or z_e.grad.abs().max() == 0, "the codebook loss moved the encoder"
    ref = torch.zeros_like(vq.embedding).index_add_(0, out.codes.reshape(-1),
                                                     (e_k - z_e.detach()).movedim(1, -1).reshape(-1, 5)) * 2 / n
    assert torch.allclose(vq.embedding.grad, ref, atol=1e-6), "wrong codebook gradient"


def commitment_weight(cls):
    "loss = codebook_loss + beta * commitment_loss, commitment = mean ||z_e - e_k||^2, z_e gets beta * 2/n (z_e - e_k)."
    for beta in (0.25, 1.7):
        vq, z_e = _fresh(cls, beta=beta)
        z_e.requires_grad_(True)
        cb0 = vq.codebook.detach().clone()
        out = vq(z_e)
        e_k, n = _picked(z_e, cb0, out.codes), z_e.numel()
        commit = F.mse_loss(z_e.detach(), e_k)
        assert torch.allclose(out.commitment_loss, commit, atol=1e-6), "wrong commitment loss"
        book = F.mse_loss(e_k, z_e.detach()) if cls is VectorQuantizer else torch.tensor(0.)
        assert torch.allclose(out.loss, book + beta * commit, atol=1e-6), f"loss is not codebook + {beta} * commitment"
        out.loss.backward()
        assert torch.allclose(z_e.grad, beta * 2 / n * (z_e.detach() - e_k), atol=1e-6), "wrong encoder gradient of the VQ loss"


def ema_update_formula(cls):
    "N <- g N + (1-g) n, m <- g m + (1-g) sum z, e = m / N~ with Laplace smoothing; nothing moves in eval mode."
    if cls is not VectorQuantizerEMA: return
    for g, eps in ((0.9, 0.1), (0.6, 1e-5)):
        vq, z_e = _fresh(cls, decay=g, eps=eps, init_count=1.5)
        N0, m0, cb0 = vq.cluster_size.clone(), vq.embed_sum.clone(), vq.embedding.clone()
        vq.eval()(z_e)
        assert torch.equal(vq.embedding, cb0) and torch.equal(vq.cluster_size, N0), "eval mode updated the codebook"
        vq.train()(z_e)
        codes = _brute(z_e, cb0)
        flat = z_e.movedim(1, -1).reshape(-1, 5)
        n_k = torch.bincount(codes, minlength=24).float()
        s_k = torch.zeros(24, 5).index_add_(0, codes, flat)
        N = g * N0 + (1 - g) * n_k
        m = g * m0 + (1 - g) * s_k
        tot = N.sum()
        Nt = (N + eps) / (tot + 24 * eps) * tot
        assert torch.allclose(vq.cluster_size, N, atol=1e-6), "wrong count update"
        assert torch.allclose(vq.embed_sum, m, atol=1e-5), "wrong sum update"
        assert torch.allclose(vq.embedding, m / Nt[:, None], atol=1e-5), "wrong codebook from the moving averages"


PROPERTIES = [nearest_code_assignment, straight_through_is_identity, codebook_learns_only_from_codebook_loss,
              commitment_weight, ema_update_formula]


def failures(cls) -> list[str]:
    "Names of the properties that `cls` breaks."
    bad = []
    for prop in PROPERTIES:
        try: prop(cls)
        except AssertionError: bad.append(prop.__name__)
    return bad


# ---- the mutants ---------------------------------------------------------------------------------------------

def _mutated(owner, name: str, *edits: tuple[str, str]):
    "`owner.name` recompiled from its source with each (old, new) of `edits` applied (every `old` must occur in it)."
    fn = inspect.unwrap(inspect.getattr_static(owner, name))
    src = textwrap.dedent(inspect.getsource(fn))
    for old, new in edits:
        assert old in src, f"the mutation point {old!r} is no longer in {getattr(owner, '__name__', owner)}.{name}: update MUTANTS"
        src = src.replace(old, new)
    ns = dict(vars(Q))
    exec(compile(src, f'<mutant of {name}>', 'exec', flags=__future__.annotations.compiler_flag, dont_inherit=True), ns)
    return ns[name]


_P, _E, _B = VectorQuantizer, VectorQuantizerEMA, Q._VQBase
ST = 'z_q = z_e + (e_k.to(z_e.dtype) - z_e).detach()'
MUTANTS = {  # name: (classes to check, owner, function, (old text, new text), ...)
    'argmax instead of argmin': ((_P, _E), Q, 'nearest_code', ('argmin(1)', 'argmax(1)')),
    'assignment against a reordered codebook': (
        (_P, _E), _B, '_assign', ('nearest_code(flat.detach(), self.codebook,', 'nearest_code(flat.detach(), self.codebook.flip(0),')),
    'plain: code vectors put back in the wrong layout': (
        (_P,), _P, 'forward', ('.view(B, H, W, D).movedim(-1, 1)', '.view(B, D, H, W)')),
    'plain: straight-through without detach': ((_P,), _P, 'forward', (ST, 'z_q = z_e + (e_k.to(z_e.dtype) - z_e)')),
    'plain: z_q = e_k (no straight-through)': ((_P,), _P, 'forward', (ST, 'z_q = e_k.to(z_e.dtype)')),
    'EMA: straight-through without detach': ((_E,), _E, 'forward', (ST, 'z_q = z_e + (e_k.to(z_e.dtype) - z_e)')),
    'plain: codebook loss without detach': (
        (_P,), _P, 'forward', ('F.mse_loss(e_k, z_e.detach().to(dt))', 'F.mse_loss(e_k, z_e.to(dt))')),
    'plain: commitment loss without detach': (
        (_P,), _P, 'forward', ('F.mse_loss(z_e.to(dt), e_k.detach())', 'F.mse_loss(z_e.to(dt), e_k)')),
    'plain: beta ignored': ((_P,), _P, 'forward', ('codebook_loss + self.beta * commitment_loss', 'codebook_loss + commitment_loss')),
    'plain: beta on the wrong term': (
        (_P,), _P, 'forward', ('codebook_loss + self.beta * commitment_loss', 'self.beta * codebook_loss + commitment_loss')),
    'EMA: beta ignored': ((_E,), _E, 'forward', ('self.beta * commitment_loss, perplexity', 'commitment_loss, perplexity')),
    'EMA: decay misapplied to the counts': (
        (_E,), _E, 'ema_update', ('self.cluster_size.mul_(g).add_(n_k, alpha=1 - g)', 'self.cluster_size.mul_(1 - g).add_(n_k, alpha=g)')),
    'EMA: sums not scaled by 1 - decay': (
        (_E,), _E, 'ema_update', ('self.embed_sum.mul_(g).add_(s_k, alpha=1 - g)', 'self.embed_sum.mul_(g).add_(s_k)')),
    'EMA: no Laplace smoothing': (
        (_E,), _E, 'ema_update', ('(self.cluster_size + self.eps) / (n + K * self.eps) * n', 'self.cluster_size')),
    'EMA: codebook updated in eval mode too': (
        (_E,), _E, 'forward', ('    if self.training:\n        counts = self.ema_update(flat.detach(), codes)\n',
                               '    counts = self.ema_update(flat.detach(), codes)\n    if self.training:\n')),
    'EMA: codebook updated before its codes are used': (
        (_E,), _E, 'forward', ('    if self.training:\n        counts = self.ema_update(flat.detach(), codes)\n', '    if self.training:\n'),
        ('e_k = self.embedding[codes]', 'counts = self.training and self.ema_update(flat.detach(), codes); e_k = self.embedding[codes]')),
}


@pytest.mark.parametrize('cls', [VectorQuantizer, VectorQuantizerEMA])
def test_real_quantizers_have_every_property(cls):
    assert failures(cls) == []


@pytest.mark.parametrize('name', list(MUTANTS))
def test_every_mutant_breaks_a_property(name, monkeypatch):
    classes, owner, fn, *edits = MUTANTS[name]
    monkeypatch.setattr(owner, fn, _mutated(owner, fn, *edits))
    for cls in classes:
        assert failures(cls), f"mutant {name!r} of {cls.__name__} passes every property"


def test_the_mutation_machinery_changes_nothing_without_a_change(monkeypatch):
    "Recompiling a method unchanged keeps every property: the failures above come from the mutations."
    for owner, fn in [(Q, 'nearest_code'), (_P, 'forward'), (_E, 'forward'), (_E, 'ema_update'), (_B, '_assign')]:
        monkeypatch.setattr(owner, fn, _mutated(owner, fn, ('def ', 'def ')))
    assert failures(VectorQuantizer) == [] and failures(VectorQuantizerEMA) == []


def test_each_property_catches_several_mutants(monkeypatch):
    "No property is dead weight: each one fails on at least two of the mutants."
    caught = {p.__name__: 0 for p in PROPERTIES}
    for name, (classes, owner, fn, *edits) in MUTANTS.items():
        with monkeypatch.context() as m:
            m.setattr(owner, fn, _mutated(owner, fn, *edits))
            for prop in {p for cls in classes for p in failures(cls)}: caught[prop] += 1
    assert all(n >= 2 for n in caught.values()), caught
