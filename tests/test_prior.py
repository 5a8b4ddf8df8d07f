"Tests for vqlearn.prior: units, baselines, training helper, classification by the prior and decoding samples."
import math
import pytest
import torch
from vqlearn.metrics import entropy
from vqlearn.pixelcnn import GatedPixelCNN, draw_uniforms
from test_pixelcnn import _separating_prior, _reference_sample   # a prior whose label dominates; sampling by definition
from vqlearn.prior import (codes_bits_per_dim, unigram_entropy, prior_step, evaluate_nll, fit_prior, classify_codes,
                           sample_images)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_bits_per_dim():
    assert math.isclose(codes_bits_per_dim(math.log(2), (1, 1), (1, 1, 1)), 1.0)          # one bit, one dimension
    assert math.isclose(codes_bits_per_dim(math.log(512), (8, 8), (3, 32, 32)), 0.1875)    # 64 codes x 9 bits / 3072
    assert math.isclose(codes_bits_per_dim(1.0, (4, 4), (3, 16, 16)), 16 / math.log(2) / 768)


def test_unigram_entropy():
    assert unigram_entropy(torch.zeros(5, 3, 3, dtype=torch.long), 4) == 0.0
    assert math.isclose(unigram_entropy(torch.tensor([[[0, 1], [2, 3]]]), 10), math.log(4))
    c = torch.tensor([0, 0, 0, 1])
    assert math.isclose(unigram_entropy(c, 2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))


def test_fit_prior_learns_class_dependent_maps():
    "Maps that are constant with value = label: the conditional prior must learn them; labels then classify perfectly."
    torch.manual_seed(0)
    labels = torch.arange(3).repeat(40)
    codes = labels[:, None, None].expand(-1, 4, 4).clone()
    prior = GatedPixelCNN(3, width=8, n_layers=2, n_classes=3)
    before = evaluate_nll(prior, codes, labels)
    hist = fit_prior(prior, codes, labels, codes, labels, steps=60, batch_size=24, lr=2e-2, device='cpu',
                     progress=False, log_every=10)
    after = evaluate_nll(prior, codes, labels)
    assert after < 0.2 * before and hist['val_nll'][-1] == pytest.approx(after, rel=1e-4)
    ll = classify_codes(prior, codes, batch_size=7)
    assert ll.shape == (120, 3) and (ll.argmax(1) == labels).all()
    s = prior.sample((6, 4, 4), labels=torch.tensor([0, 1, 2, 0, 1, 2]), generator=torch.Generator().manual_seed(0))
    assert (s == torch.tensor([0, 1, 2, 0, 1, 2])[:, None, None]).float().mean() > 0.9


def test_fit_prior_and_classify_bad_input():
    prior = GatedPixelCNN(3, width=8, n_layers=1, n_classes=2)
    codes = torch.zeros(4, 2, 2, dtype=torch.long)
    with pytest.raises(ValueError): fit_prior(prior, codes, None, steps=1)
    with pytest.raises(ValueError): classify_codes(GatedPixelCNN(3, width=8, n_layers=1), codes)


class _ToyDecoder(torch.nn.Module):
    "Stands in for a VQ-VAE: codes (B, h, w) -> images (B, 3, 4h, 4w)."
    def __init__(self, K): super().__init__(); self.colours = torch.nn.Embedding(K, 3)
    def decode(self, codes):
        x = self.colours(codes).permute(0, 3, 1, 2)
        return torch.nn.functional.interpolate(x, scale_factor=4)


def test_sample_images_shapes_and_seed():
    torch.manual_seed(0)
    prior, dec = GatedPixelCNN(5, width=8, n_layers=2, n_classes=2), _ToyDecoder(5)
    lab = torch.tensor([0, 1, 1])
    c1, x1 = sample_images(prior, dec, 3, (3, 2), labels=lab, generator=torch.Generator().manual_seed(1))
    c2, x2 = sample_images(prior, dec, 3, (3, 2), labels=lab, generator=torch.Generator().manual_seed(1))
    assert c1.shape == (3, 3, 2) and x1.shape == (3, 3, 12, 8) and 0 <= x1.min() and x1.max() <= 1
    assert torch.equal(c1, c2) and torch.equal(x1, x2)
    c3, _ = sample_images(prior, dec, 3, (3, 2), labels=lab, top_k=1, generator=torch.Generator().manual_seed(2))
    c4, _ = sample_images(prior, dec, 3, (3, 2), labels=lab, top_k=1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(c3, c4)                                  # top-1 is deterministic


def test_unigram_entropy_is_the_metrics_entropy():
    codes = torch.randint(0, 7, (20, 3, 3), generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(codes.flatten(), minlength=9).double()
    assert unigram_entropy(codes, 9) == float(entropy(counts))
    with pytest.raises(ValueError, match=r"\[0, 5\)"): unigram_entropy(codes, 5)   # codes 5, 6 are out of range
    with pytest.raises(ValueError): unigram_entropy(torch.zeros(0, 2, 2, dtype=torch.long), 4)


def test_prior_step_and_evaluate_nll():
    torch.manual_seed(0)
    codes, labels = torch.randint(0, 5, (10, 3, 3)), torch.arange(10) % 2
    net = GatedPixelCNN(5, width=8, n_layers=2).train()
    assert math.isclose(evaluate_nll(net, codes, batch_size=3), float(net.eval().nll(codes).detach()), rel_tol=1e-5)
    net.train()
    evaluate_nll(net, codes); assert net.training                          # the mode comes back
    cnet = GatedPixelCNN(5, width=8, n_layers=2, n_classes=2).eval()
    with torch.no_grad():
        assert math.isclose(float(prior_step(net, (codes, labels))['loss']), float(net.nll(codes)), rel_tol=1e-6)
        assert math.isclose(float(prior_step(net, (codes, None))['loss']), float(net.nll(codes)), rel_tol=1e-6)
        assert math.isclose(float(prior_step(cnet, (codes, labels))['loss']), float(cnet.nll(codes, labels)), rel_tol=1e-6)
        assert math.isclose(evaluate_nll(cnet, codes, labels, batch_size=4), float(cnet.nll(codes, labels)), rel_tol=1e-5)


def test_empty_and_wrong_dtypes_get_clear_messages():
    "Empty sets used to divide by zero (ZeroDivisionError) or fail deep inside; float codes/labels now say what is expected."
    net, cnet = GatedPixelCNN(5, width=8, n_layers=1), GatedPixelCNN(5, width=8, n_layers=1, n_classes=2)
    empty, codes = torch.zeros(0, 3, 3, dtype=torch.long), torch.zeros(8, 3, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="empty"): evaluate_nll(net, empty)
    with pytest.raises(ValueError, match="empty"): classify_codes(cnet, empty)
    with pytest.raises(ValueError, match="empty"): fit_prior(net, empty, steps=1)
    with pytest.raises(TypeError, match="integer"): evaluate_nll(net, codes.float())
    with pytest.raises(TypeError, match="integer"): fit_prior(net, codes.float(), steps=1)
    with pytest.raises(TypeError, match="integer"): fit_prior(cnet, codes, torch.zeros(8), steps=1)
    with pytest.raises(TypeError, match=r"\(8,\)"): fit_prior(cnet, codes, torch.zeros(7, dtype=torch.long), steps=1)
    with pytest.raises(ValueError, match=r"\[0, 5\)"): evaluate_nll(net, codes + 5)
    with pytest.raises(ValueError, match="fewer than one batch"): fit_prior(net, codes, steps=1, batch_size=16)
    with pytest.raises(ValueError, match="labels"): evaluate_nll(cnet, codes)


def test_sample_images_follows_the_labels():
    "Catches 'sample labels forced to class 0': codes for label 1 differ from label 0 and match a per-class reference."
    prior, dec = _separating_prior(), _ToyDecoder(6).double()
    lab = torch.tensor([0, 1, 1, 2, 0, 1])
    codes, imgs = sample_images(prior, dec, 6, (3, 4), labels=lab, generator=torch.Generator().manual_seed(5))
    u = draw_uniforms((6, 3, 4), torch.Generator().manual_seed(5))
    assert torch.equal(codes, _reference_sample(prior, u, lab))
    assert torch.allclose(imgs, dec.decode(codes).clamp(0, 1))
    zeros, _ = sample_images(prior, dec, 6, (3, 4), labels=torch.zeros(6, dtype=torch.long),
                             generator=torch.Generator().manual_seed(5))
    assert torch.equal(zeros[lab == 0], codes[lab == 0])                 # the same uniforms, the same label
    assert (zeros[lab == 1] != codes[lab == 1]).float().mean() > 0.5    # label 1 is not label 0
    assert (codes == lab[:, None, None]).float().mean() > 0.5            # class y mostly draws code y (chance: 1/6)


def test_shipped_prior_is_class_conditional_over_the_shipped_codes():
    "The packaged prior loads, matches the packaged VQ-VAE and the manifest, and its label changes what it expects."
    import json
    from vqlearn.prior import shipped_prior
    from vqlearn.vqvae import VQVAE, shipped_vqvae
    vq, pr = VQVAE.from_checkpoint(shipped_vqvae()), GatedPixelCNN.from_checkpoint(shipped_prior()).eval()
    manifest = json.loads((shipped_prior().parent / 'manifest.json').read_text())
    assert pr.config == manifest['config']['prior'] and pr.num_codes == vq.num_codes and pr.n_classes == 3
    lab = torch.arange(2).repeat_interleave(8)
    codes, imgs = sample_images(pr, vq, len(lab), vq.code_shape(32), labels=lab, generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (16, 3, 32, 32) and codes.shape == (16, 8, 8)
    assert evaluate_nll(pr, codes, lab) < evaluate_nll(pr, codes, 1 - lab) - 0.02     # the label matters
