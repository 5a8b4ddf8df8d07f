"Tests of vqlearn.vqvae2: shapes, Algorithm 1's data flow, errors, checkpoints, evaluation, code files, the stage API and the benchmark."
import math
import numpy as np
import pytest, torch
import torch.nn.functional as F
import vqlearn.vqvae2 as V2
from vqlearn.vqvae2 import (VQVAE2, VQVAE2_SETTINGS, LEVELS, level_quantizer, vqvae2_step, evaluate_vqvae2, level_ablation,
                            train_vqvae2, vqvae2_stage, extract_codes2, codes2_stage)
from vqlearn.vqvae import VQVAE, VQVAE_SETTINGS, register_quantizer, QUANTIZER_CLASSES
from vqlearn.quantize import VectorQuantizer, VectorQuantizerEMA
from vqlearn.data import lesson_data, load_codes, save_codes
from vqlearn.core import Settings, settings


def small(**kw):
    torch.manual_seed(0)
    return VQVAE2(**{**dict(hidden=16, res_hidden=8, n_res=1, n_res_top=1, num_codes_top=16, num_codes_bottom=32, dim=8), **kw})


def latent_rows(z, k: int):
    "k random latent vectors (k, D) of the maps z (B, D, H, W): a codebook from the data, as a k-means start would draw."
    z = z.movedim(1, -1).flatten(0, 2)                                  # (B * H * W, D)
    return z[torch.randperm(len(z))[:k]]


def spread_codes(m, x):
    """Both codebooks drawn from the model's own latents of `x`, so the codes spread over the maps: a random codebook can
    send every position to one code, and then a level's mean latent is its latent."""
    with torch.no_grad():
        h = m.encoder_bottom(x - 0.5)
        z_top = m.encoder_top(h)
        m.quantizer_top.embedding.copy_(latent_rows(z_top, m.num_codes['top']))
        pred = m.upsample_top(m.quantizer_top.lookup(m.quantizer_top.quantize(z_top)))
        m.quantizer_bottom.embedding.copy_(latent_rows(h - pred, m.num_codes['bottom']))
    return m


def with_prediction(m):
    "The model with a non-zero top prediction (a fresh model's up-sampler ends in zeros)."
    torch.manual_seed(1)
    with torch.no_grad(): torch.nn.init.normal_(m.upsample_top[-1].weight, std=0.3)
    return m


# ---- shapes and the data flow of Algorithm 1 -----------------------------------------------------------------------

@pytest.mark.parametrize('size,top,bottom', [(32, (4, 4), (8, 8)), (64, (8, 8), (16, 16)), ((32, 64), (4, 8), (8, 16))])
def test_shapes(size, top, bottom):
    m = small()
    H, W = (size, size) if isinstance(size, int) else size
    x = torch.rand(3, 3, H, W)
    x_hat, qs = m(x)
    assert x_hat.shape == x.shape and 0 <= x_hat.min() and x_hat.max() <= 1
    assert set(qs) == set(LEVELS) and qs['top'].codes.shape == (3, *top) and qs['bottom'].codes.shape == (3, *bottom)
    assert m.code_shapes(size) == {'top': top, 'bottom': bottom} and m.downsample == {'top': 8, 'bottom': 4}
    codes = m.encode(x)
    assert {k: v.shape for k, v in codes.items()} == {'top': (3, *top), 'bottom': (3, *bottom)}
    assert all(v.dtype == torch.int64 for v in codes.values())
    assert m.decode(**codes).shape == x.shape


def test_defaults():
    m = VQVAE2()
    assert m.num_codes == {'top': 512, 'bottom': 512} and m.code_shapes(256) == {'top': (32, 32), 'bottom': (64, 64)}
    for q, after in ((m.quantizer_top, 80), (m.quantizer_bottom, 20)):  # the top sees 4x fewer vectors per batch
        assert isinstance(q, VectorQuantizerEMA) and q.kmeans_init and q.restart_after == after
    assert isinstance(VQVAE2(quantizer='plain').quantizer_top, VectorQuantizer)


def test_encode_decode_agree_with_forward():
    m = with_prediction(small()).eval()
    x = torch.rand(4, 3, 32, 32)
    x_hat, qs = m(x)
    codes = m.encode(x)
    assert all(torch.equal(codes[k], qs[k].codes) for k in LEVELS)
    assert torch.allclose(m.decode(**codes), x_hat, atol=1e-6)


def test_bottom_quantizes_what_the_top_did_not_predict():
    "h_bottom = E_bottom(x, e_top) = h - p(e_top); the decoder reads p + e_bottom."
    m = with_prediction(small()).eval()
    x = torch.rand(2, 3, 32, 32)
    seen = {}
    m.quantizer_bottom.register_forward_hook(lambda mod, inp, out: seen.update(z=inp[0]))
    m.decoder.register_forward_hook(lambda mod, inp, out: seen.update(d=inp[0]))
    _, qs = m(x)
    h = m.encoder_bottom(x - 0.5)
    p = m.upsample_top(m.quantizer_top.lookup(qs['top'].codes))
    assert p.abs().max() > 1e-3
    assert torch.allclose(seen['z'], h - p, atol=1e-5)
    assert torch.allclose(seen['d'], p + m.quantizer_bottom.lookup(qs['bottom'].codes), atol=1e-5)


def test_bottom_codes_depend_on_the_top_codes():
    m = with_prediction(small()).eval()
    x = torch.rand(8, 3, 32, 32)
    before = m.encode(x)
    with torch.no_grad():  # another top codebook: 16 of the top encoder's own outputs, so the codes spread over the map
        m.quantizer_top.embedding.copy_(latent_rows(m.encoder_top(m.encoder_bottom(x - 0.5)), 16))
    after = m.encode(x)
    assert after['top'].unique().numel() > 1 and not torch.equal(before['top'], after['top'])
    assert not torch.equal(before['bottom'], after['bottom'])
    with torch.no_grad(): m.upsample_top[-1].weight.zero_(); m.upsample_top[-1].bias.zero_()  # a top that predicts nothing:
    assert torch.equal(m.encode(x)['bottom'], m.quantizer_bottom.quantize(m.encoder_bottom(x - 0.5)))  # bottom = a VQ-VAE's


def test_a_fresh_model_is_a_one_level_vqvae():
    "The up-sampler's last layer starts at zero: the top predicts nothing, so the top codes do not change the image yet."
    m = small().eval()
    top = torch.randint(0, 16, (2, 4, 4)); bottom = torch.randint(0, 32, (2, 8, 8))
    assert torch.equal(m.decode(top, bottom), m.decode(torch.randint(0, 16, (2, 4, 4)), bottom))
    assert not torch.equal(with_prediction(m).decode(top, bottom), m.decode((top + 1) % 16, bottom))


def test_step_trains_every_part_and_adds_the_prediction_loss():
    m = small(quantizer='plain', predict_weight=0.5)
    with torch.no_grad(): torch.nn.init.normal_(m.upsample_top[-1].weight, std=0.3)
    x = torch.rand(4, 3, 32, 32)
    out = vqvae2_step(m, (x, torch.zeros(4, dtype=torch.long)))
    assert set(out) >= {'loss', 'mse', 'vq', 'top_perplexity', 'top_usage', 'bottom_perplexity', 'bottom_usage'}
    out['loss'].backward()
    for name, part in (('encoder_bottom', m.encoder_bottom), ('encoder_top', m.encoder_top), ('upsample_top', m.upsample_top),
                       ('decoder', m.decoder)):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in part.parameters()), name
        assert any(p.grad.abs().sum() > 0 for p in part.parameters()), name
    # the top level's loss = its quantizer's loss + predict_weight * ||p - sg(h)||^2
    m.eval()
    q_top, pred, _ = m.levels(x)
    h = m.encoder_bottom(x - 0.5)
    z = m.encoder_top(h); e = m.quantizer_top.lookup(q_top.codes)
    vq = F.mse_loss(e, z) + 0.25 * F.mse_loss(z, e)
    assert torch.allclose(q_top.loss, vq + 0.5 * F.mse_loss(pred, h), rtol=1e-4)


def _train_toy(m, steps: int = 300) -> float:
    "Train `m` on 16 images of 8x8 blocks of random colour; the last training MSE over the first."
    x = torch.rand(16, 3, 4, 4, generator=torch.Generator().manual_seed(0)).repeat_interleave(8, 2).repeat_interleave(8, 3)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    first = None
    for _ in range(steps):
        out = vqvae2_step(m, x); opt.zero_grad(); out['loss'].backward(); opt.step()
        first = first or out['mse'].item()
    return out['mse'].item() / first


def test_short_training_reduces_error():
    # Without the top's prediction loss the two levels fit the toy fast: 0.07-0.12 x the first error after 300 steps
    # (three data seeds, torch 2.14). Every path from the loss to the weights has to work for that.
    assert _train_toy(small(predict_weight=0.0)) < 0.3
    # With the default prediction loss the toy is learned slowly and unevenly (0.62-0.92 x over five data seeds; it can
    # rise between steps 200 and 300), so the default is only held to a clear fall. On real images the prediction loss is
    # needed: without it the top level collapses to one code (lesson 09, 5-minute comparison, run E).
    assert _train_toy(small()) < 0.85


# ---- errors ---------------------------------------------------------------------------------------------------------

def test_bad_inputs():
    m = small()
    top, bottom = torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 8, 8, dtype=torch.long)
    with pytest.raises(TypeError, match='floats'): m.encode((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8))
    with pytest.raises(TypeError, match='floats'): m(torch.zeros(2, 3, 32, 32, dtype=torch.long))
    with pytest.raises(TypeError): m.encode([[0.0]])
    with pytest.raises(ValueError, match='B, 3, H, W'): m.encode(torch.rand(2, 1, 32, 32))
    with pytest.raises(ValueError, match='B, 3, H, W'): m(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match='divisible by 8'): m.encode(torch.rand(2, 3, 36, 36))  # divisible by 4, not 8
    with pytest.raises(ValueError, match='empty'): m(torch.rand(0, 3, 32, 32))
    with pytest.raises(ValueError, match=r'bottom codes must lie in \[0, 31\]'): m.decode(top, torch.full((1, 8, 8), 32))
    with pytest.raises(ValueError, match=r'top codes must lie in \[0, 15\]'): m.decode(torch.full((1, 4, 4), -1), bottom)
    with pytest.raises(ValueError, match=r'\(B, 2h, 2w\)'): m.decode(top, bottom[:, :4])
    with pytest.raises(ValueError, match=r'\(B, 2h, 2w\)'): m.decode(top, torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match='B, h, w'): m.decode(top[0], bottom)
    with pytest.raises(TypeError, match='integers'): m.decode(top.float(), bottom)
    with pytest.raises(ValueError, match='empty'): m.decode(top[:0], bottom[:0])
    with pytest.raises(ValueError, match='NaN'): m(torch.full((1, 3, 32, 32), float('nan')))
    with pytest.raises(ValueError, match='QUANTIZERS|one of'): VQVAE2(quantizer='nope')
    with pytest.raises(ValueError, match="'top'"): VQVAE2(quantizer={'top': 'ema'})
    with pytest.raises(ValueError, match='dim'): VQVAE2(dim=16, quantizer={'top': VectorQuantizer(8, 8), 'bottom': 'ema'})
    with pytest.raises(ValueError, match='n_down'): VQVAE2(n_down=0)


# ---- checkpoints ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('quantizer', ['ema_restart', 'plain', 'custom'])
def test_checkpoint_round_trip(tmp_path, quantizer):
    q = {'top': VectorQuantizerEMA(16, 8, decay=0.9, restart_after=5), 'bottom': 'plain'} if quantizer == 'custom' else quantizer
    m = small(quantizer=q)
    m(torch.rand(4, 3, 32, 32))  # a training forward: k-means init / EMA update, so the state is not the initial one
    p = m.save(tmp_path / 'm.safetensors', note='x')
    again = VQVAE2.from_checkpoint(p)
    assert again.config == m.config and not again.training
    if quantizer == 'custom':
        assert again.config['quantizer']['top'] == {'class': 'VectorQuantizerEMA', **m.quantizer_top.config}
        assert again.quantizer_top.decay == 0.9 and isinstance(again.quantizer_bottom, VectorQuantizer)
    m.eval(); x = torch.rand(2, 3, 32, 32)
    assert all(torch.equal(a, b) for a, b in zip(again.encode(x).values(), m.encode(x).values()))
    assert torch.equal(again(x)[0], m(x)[0])
    with pytest.raises(ValueError, match='VQVAE2'): VQVAE.from_checkpoint(p)


def test_registered_quantizers_plug_in(tmp_path):
    class HalfDecayEMA(VectorQuantizerEMA):
        "A later lesson's quantizer."
    try:
        register_quantizer(HalfDecayEMA)
        m = small(quantizer={'top': HalfDecayEMA(16, 8, decay=0.5), 'bottom': {'class': 'HalfDecayEMA', 'num_codes': 32, 'dim': 8}})
        again = VQVAE2.from_checkpoint(m.save(tmp_path / 'm.safetensors'))
        assert type(again.quantizer_top) is HalfDecayEMA and type(again.quantizer_bottom) is HalfDecayEMA
        assert again.num_codes == {'top': 16, 'bottom': 32}
        assert isinstance(level_quantizer('ema', 7, 3), VectorQuantizerEMA) and level_quantizer('ema', 7, 3).num_codes == 7
    finally:
        QUANTIZER_CLASSES.pop('HalfDecayEMA', None)
    with pytest.raises(ValueError, match='HalfDecayEMA'): VQVAE2.from_checkpoint(tmp_path / 'm.safetensors')


# ---- evaluation -----------------------------------------------------------------------------------------------------

def test_evaluation_is_the_plain_mean_and_counts_every_code():
    m = with_prediction(small()).eval()
    imgs = (torch.rand(10, 3, 32, 32) * 255).to(torch.uint8)
    res = evaluate_vqvae2(m, imgs, batch_size=3)
    x = imgs.float() / 255
    x_hat, qs = m(x)
    direct = F.mse_loss(x_hat, x).item()
    assert abs(res['mse'] - direct) < 1e-6 * direct and abs(res['psnr'] - 10 * math.log10(1 / direct)) < 1e-4
    for k in LEVELS:
        used = qs[k].codes.unique().numel() / m.num_codes[k]
        assert res['levels'][k]['usage'] == pytest.approx(used) and res['levels'][k]['num_codes'] == m.num_codes[k]
        assert res['levels'][k]['commitment'] == pytest.approx(qs[k].commitment_loss.item(), rel=1e-4)
    assert res['commitment'] == pytest.approx(sum(res['levels'][k]['commitment'] for k in LEVELS))
    one = evaluate_vqvae2(VQVAE(hidden=16, res_hidden=8, n_res=1, num_codes=32, dim=8), imgs)  # a one-level model too
    assert set(one['levels']) == {'codes'} and one['levels']['codes']['num_codes'] == 32
    with pytest.raises(ValueError, match='empty'): evaluate_vqvae2(m, imgs[:0])


def test_level_ablation_replaces_one_level_by_its_mean():
    x = torch.rand(12, 3, 32, 32)
    m = spread_codes(with_prediction(small()).eval(), x)
    abl = level_ablation(m, x, batch_size=5)
    c = m.encode(x)
    assert c['top'].unique().numel() > 1 and c['bottom'].unique().numel() > 1
    zt, zb = m.quantizer_top.lookup(c['top']), m.quantizer_bottom.lookup(c['bottom'])
    mt, mb = zt.mean((0, 2, 3), keepdim=True).expand_as(zt), zb.mean((0, 2, 3), keepdim=True).expand_as(zb)
    assert abl['both'] == pytest.approx(F.mse_loss(m.decode_latents(zt, zb), x).item(), rel=1e-5)
    assert abl['top_only'] == pytest.approx(F.mse_loss(m.decode_latents(zt, mb), x).item(), rel=1e-5)
    assert abl['bottom_only'] == pytest.approx(F.mse_loss(m.decode_latents(mt, zb), x).item(), rel=1e-5)
    assert abl['top_only'] != abl['both'] and abl['bottom_only'] != abl['both']


# ---- code files and the stage API ------------------------------------------------------------------------------------

def test_code_files_round_trip(tmp_path):
    m = with_prediction(small()).eval()
    x = torch.rand(6, 3, 32, 32)
    maps, labels = extract_codes2(m, (x, torch.arange(6) % 2), batch_size=4)
    assert {k: v.shape for k, v in maps.items()} == {'top': (6, 4, 4), 'bottom': (6, 8, 8)} and labels.tolist() == [0, 1] * 3
    p = save_codes(tmp_path / 'c.safetensors', maps, labels, m.num_codes, classes=['a', 'b'])
    cm = load_codes(p)
    assert all(torch.equal(cm.maps[k], maps[k]) for k in LEVELS) and cm.num_codes == {'top': 16, 'bottom': 32}
    assert torch.equal(m.decode(**cm.maps), m.decode(**m.encode(x)))
    _, l2 = extract_codes2(m, x)
    assert (l2 == -1).all()
    with pytest.raises(ValueError, match='empty'): extract_codes2(m, x[:0])


def tiny_settings(**kw):
    C = settings(**VQVAE2_SETTINGS, mode='quick')
    C.update(n_train=40, n_test=16, steps=6, log_every=3, warmup=2,
             model=dict(hidden=16, res_hidden=8, n_res=1, n_res_top=1, num_codes_top=8, num_codes_bottom=16, dim=8))
    C.update(kw)
    return C


def test_settings_match_lesson_06():
    assert set(VQVAE2_SETTINGS) == {'quick', 'docs', 'full'}
    for mode in VQVAE2_SETTINGS:
        C, C6 = settings(**VQVAE2_SETTINGS, mode=mode), settings(**VQVAE_SETTINGS, mode=mode)
        same = ('data', 'classes', 'n_train', 'n_test', 'steps', 'batch_size', 'lr', 'warmup', 'flip', 'seed')
        assert {k: C[k] for k in same} == {k: C6[k] for k in same}, mode  # the same budget and data as lesson 06
        VQVAE2(**C.model, quantizer=C.quantizer)  # every mode's model can be built


def test_stages_are_cached_and_consistent(tmp_path, monkeypatch):
    C = tiny_settings()
    calls = []
    real = V2.train_vqvae2
    monkeypatch.setattr(V2, 'train_vqvae2', lambda C, device=None: calls.append(1) or real(C, device))
    ck = vqvae2_stage(C, device='cpu', folder=tmp_path)
    assert ck.is_file() and calls == [1] and vqvae2_stage(C, device='cpu', folder=tmp_path) == ck and calls == [1]
    from vqlearn.train import load_checkpoint
    assert load_checkpoint(ck)['history'].steps_of('mse')[-1] == C.steps
    model = VQVAE2.from_checkpoint(ck)
    train, test = lesson_data(C)
    for split, data in (('train', train), ('test', test)):
        p = codes2_stage(C, split, device='cpu', folder=tmp_path)
        cm = load_codes(p)
        maps, labels = extract_codes2(model, data)
        assert set(cm.maps) == {'top', 'bottom'} and all(torch.equal(cm.maps[k], maps[k]) for k in LEVELS)
        assert torch.equal(cm.labels, data.labels) and cm.num_codes == {'top': 8, 'bottom': 16}
        assert cm.meta['split'] == split and cm.meta['classes'] == data.classes
        assert cm.meta['code_shapes'] == {'top': [4, 4], 'bottom': [8, 8]}
    assert calls == [1]
    assert vqvae2_stage(tiny_settings(lr=1e-3), device='cpu', folder=tmp_path) != ck and calls == [1, 1]
    with torch.no_grad():  # a new checkpoint under the same name: its codes are made again
        m = VQVAE2.from_checkpoint(ck); m.quantizer_bottom.embedding.mul_(-1); m.save(ck)
    before = p.read_bytes()
    assert codes2_stage(C, 'test', device='cpu', folder=tmp_path) == p and p.read_bytes() != before
    with pytest.raises(ValueError, match='split'): codes2_stage(C, 'valid', folder=tmp_path)
    with pytest.raises(KeyError, match='VQVAE2_SETTINGS'): vqvae2_stage({'data': 'shapes'}, folder=tmp_path)


def test_train_vqvae2_returns_a_trained_model_and_history():
    C = tiny_settings()
    m, hist = train_vqvae2(C, device='cpu')
    assert isinstance(m, VQVAE2) and not m.training and m.num_codes == {'top': 8, 'bottom': 16}
    assert hist.steps_of('mse')[-1] == C.steps and hist['top_usage'] and hist['bottom_usage']


# ---- the benchmark --------------------------------------------------------------------------------------------------

def _bench(tmp_path, *args):
    import subprocess, sys
    from pathlib import Path
    bench = Path(__file__).resolve().parents[1] / 'bench' / 'vqvae_quality.py'
    if not (tmp_path / 'imgs.npz').exists():
        g = np.random.default_rng(0)
        np.savez(tmp_path / 'imgs.npz', images=g.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), labels=np.arange(40) % 2)
    libs = [p for p in sys.path if p.endswith('site-packages')]  # -I -S: the installed vqlearn is invisible
    argv = [str(bench), '--data', 'imgs.npz', '--threads', '1', '--holdout', '8', '--log-every', '5', *args]
    code = f"import sys, runpy; sys.path += {libs!r}; sys.argv = {argv!r}; runpy.run_path({str(bench)!r}, run_name='__main__')"
    return subprocess.run([sys.executable, '-I', '-S', '-c', code], cwd=tmp_path, capture_output=True, text=True,
                          env={'OMP_NUM_THREADS': '1', 'PATH': '/usr/bin:/bin'})


def test_benchmark_trains_vqvae2_and_saves_a_checkpoint_that_reloads(tmp_path):
    out = _bench(tmp_path, '--minutes', '0.02', '--model', 'vqvae2', '--ckpt', 'm_{model}_{q}.safetensors')
    assert out.returncode == 0, out.stderr[-2000:]
    row = [l for l in out.stdout.splitlines() if l.startswith('| ema_restart |')][0].split('|')
    assert row[9].strip() == 'vqvae2' and 'top' in row[5] and 'bottom' in row[5]
    m = VQVAE2.from_checkpoint(tmp_path / 'm_vqvae2_ema_restart.safetensors')
    assert m.config == VQVAE2().config
    valid = torch.from_numpy(np.load(tmp_path / 'imgs.npz')['images'][32:]).permute(0, 3, 1, 2)
    res = evaluate_vqvae2(m, valid)
    assert row[2].strip() == f"{res['mse']:.4f}"  # the reloaded model scores what the benchmark printed
    assert row[5].strip() == ', '.join(f"{k} {v['usage']:.1%}" for k, v in res['levels'].items())


def test_benchmark_runs_both_models_in_one_invocation(tmp_path):
    bad = _bench(tmp_path, '--minutes', '0.01', '--model', 'vqvae,vqvae2', '--ckpt', 'm.safetensors')
    assert bad.returncode != 0 and '{model}' in bad.stderr
    assert _bench(tmp_path, '--minutes', '0.01', '--model', 'vqvae3').returncode != 0
    out = _bench(tmp_path, '--minutes', '0.01', '--model', 'vqvae,vqvae2')
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [l.split('|') for l in out.stdout.splitlines() if l.startswith('| ema_restart |')]
    assert [r[9].strip() for r in rows] == ['vqvae', 'vqvae2'] and "held-out MSE / vqvae's: vqvae2" in out.stdout


def test_benchmark_model_options_reach_the_constructor(tmp_path):
    assert _bench(tmp_path, '--minutes', '0.01', '--model', 'vqvae2:num_codes_bottom').returncode != 0   # not key=value
    out = _bench(tmp_path, '--minutes', '0.01', '--model', 'vqvae2:num_codes_bottom=64:hidden=32', '--ckpt', 'm.safetensors')
    assert out.returncode == 0, out.stderr[-2000:]
    cfg = VQVAE2.from_checkpoint(tmp_path / 'm.safetensors').config
    assert (cfg['num_codes_bottom'], cfg['hidden'], cfg['num_codes_top']) == (64, 32, 512)


# ---- the two-level prior (Algorithm 2) ------------------------------------------------------------------------------

from vqlearn.vqvae2 import (HierarchicalPrior, prior2_step, evaluate_prior2, fit_prior2, train_prior2, prior2_stage,
                            sample_images2, PRIOR2_STAGE_KEYS)


def tiny_prior(**kw):
    torch.manual_seed(0)
    return HierarchicalPrior(**{**dict(num_codes_top=6, num_codes_bottom=12, n_classes=2, width=16, n_layers=2,
                                       cond_channels=8), **kw})


def copied_maps(n=256, seed=0):
    "Top maps (n, 2, 2) uniform over 6 codes; each bottom code is a fixed function of its parent top code and its place."
    g = torch.Generator().manual_seed(seed)
    top = torch.randint(6, (n, 2, 2), generator=g)
    up = top.repeat_interleave(2, 1).repeat_interleave(2, 2)                 # (n, 4, 4): the parent of each position
    place = (torch.arange(4)[:, None] % 2) * 2 + torch.arange(4)[None] % 2   # 0..3 within the parent
    return {'top': top, 'bottom': (up * 2 + place) % 12}, torch.randint(2, (n,), generator=g)


def test_prior_shapes_and_logits():
    hp = tiny_prior()
    maps, y = copied_maps(4)
    logits = hp(maps['top'], maps['bottom'], y)
    assert logits['top'].shape == (4, 6, 2, 2) and logits['bottom'].shape == (4, 12, 4, 4)
    nll = hp.nll(maps['top'], maps['bottom'], y)
    assert torch.allclose(nll['bottom'], F.cross_entropy(logits['bottom'], maps['bottom']))
    assert hp.condition(maps['top']).shape == (4, 8, 4, 4)


def test_bottom_prior_learns_the_top_condition():
    "Bottom codes are a function of the top: the conditional prior learns them; the wrong top codes make it wrong."
    maps, y = copied_maps()
    hp = tiny_prior()
    hist = fit_prior2(hp, maps, y, steps=150, batch_size=32, lr=1e-2, progress=False)
    test, yt = copied_maps(128, seed=1)
    ev = evaluate_prior2(hp, test, yt)
    assert ev['bottom'] < 0.2 and ev['top'] > math.log(6) - 0.05   # bottom: nearly known; top: drawn uniformly, nothing to learn
    assert hist['bottom_nll'][-1] < 0.3 * hist['bottom_nll'][0]
    wrong = evaluate_prior2(hp, {'top': test['top'].roll(1, 0), 'bottom': test['bottom']}, yt)
    assert wrong['bottom'] > 1.0
    n_top, n_bottom = test['top'].numel() / len(yt), test['bottom'].numel() / len(yt)   # codes per image
    assert math.isclose(ev['bits_per_dim'], (ev['top'] * n_top + ev['bottom'] * n_bottom) / (math.log(2) * 3 * 32 * 32), rel_tol=1e-9)


def test_prior_sampling_fast_equals_naive_and_respects_the_condition():
    maps, y = copied_maps()
    hp = tiny_prior()
    fit_prior2(hp, maps, y, steps=150, batch_size=32, lr=1e-2, progress=False)
    lab = torch.tensor([0, 1, 0, 1, 1, 0])
    fast = hp.sample(6, (2, 2), lab, generator=torch.Generator().manual_seed(3))
    naive = hp.sample(6, (2, 2), lab, generator=torch.Generator().manual_seed(3), method='naive')
    assert all(torch.equal(fast[k], naive[k]) for k in ('top', 'bottom'))
    assert fast['top'].shape == (6, 2, 2) and fast['bottom'].shape == (6, 4, 4)
    want = (fast['top'].repeat_interleave(2, 1).repeat_interleave(2, 2) * 2
                                 + (torch.arange(4)[:, None] % 2) * 2 + torch.arange(4)[None] % 2) % 12
    assert (fast['bottom'] == want).float().mean() > 0.9    # sampled bottoms follow their sampled tops
    cold = hp.sample(2, (2, 2), torch.tensor([0, 1]), temperature=(1.0, 0.0), generator=torch.Generator().manual_seed(0))
    assert cold['bottom'].shape == (2, 4, 4)


def test_prior_errors():
    hp = tiny_prior()
    maps, y = copied_maps(4)
    with pytest.raises(ValueError, match=r'\(4, 4, 4\)'): hp.nll(maps['top'], maps['bottom'][:, :2], y)
    with pytest.raises(TypeError, match='integer'): hp.nll(maps['top'].float(), maps['bottom'], y)
    with pytest.raises(ValueError, match=r'\[0, 5\]'): hp.nll(maps['top'] + 6, maps['bottom'], y)
    with pytest.raises(ValueError, match='class-conditional'): hp.nll(maps['top'], maps['bottom'])
    with pytest.raises(ValueError, match='class-conditional'): evaluate_prior2(hp, maps)
    with pytest.raises(ValueError, match='fewer than one batch'): fit_prior2(hp, maps, y, steps=1, batch_size=8)
    with pytest.raises(ValueError, match='cond_channels'): HierarchicalPrior(4, 4, cond_channels=0)
    with pytest.raises(ValueError, match='codebooks'): sample_images2(hp, small(), 2, torch.tensor([0, 1]))


def test_prior_checkpoint_roundtrip_and_decoding(tmp_path):
    hp = tiny_prior(attn_every=1)
    hp.save(tmp_path / 'p.safetensors')
    back = HierarchicalPrior.from_checkpoint(tmp_path / 'p.safetensors')
    maps, y = copied_maps(4)
    with torch.no_grad(): a, b = hp.eval()(maps['top'], maps['bottom'], y), back(maps['top'], maps['bottom'], y)
    assert all(torch.equal(a[k], b[k]) for k in a) and back.config == hp.config and back.top.attn_layers == [0, 1]
    m = small(num_codes_top=6, num_codes_bottom=12).eval()
    codes, imgs = sample_images2(hp, m, 3, torch.tensor([0, 1, 1]), image_size=16, generator=torch.Generator().manual_seed(0))
    assert codes['top'].shape == (3, 2, 2) and imgs.shape == (3, 3, 16, 16) and 0 <= imgs.min() and imgs.max() <= 1
    with torch.no_grad(): assert torch.allclose(imgs, m.decode(**codes).clamp(0, 1))


def test_prior2_stage_is_cached_and_keyed_by_the_prior_settings(tmp_path):
    C = settings(**VQVAE2_SETTINGS, mode='quick')
    C = Settings({**C, 'n_train': 64, 'n_test': 16, 'steps': 6, 'warmup': 0, 'log_every': 2,
                  'prior': dict(C.prior, steps=4, batch_size=16, width=8, n_layers=1)})
    p = prior2_stage(C, folder=tmp_path)
    assert prior2_stage(C, folder=tmp_path) == p and p.stat().st_mtime == prior2_stage(C, folder=tmp_path).stat().st_mtime
    prior = HierarchicalPrior.from_checkpoint(p)
    codes = load_codes(codes2_stage(C, 'train', folder=tmp_path))
    assert prior.num_codes == codes.num_codes and prior.n_classes == len(codes.meta['classes'])
    C2 = Settings({**C, 'prior': dict(C.prior, width=12)})
    assert prior2_stage(C2, folder=tmp_path) != p and HierarchicalPrior.from_checkpoint(prior2_stage(C2, folder=tmp_path)).config['width'] == 12
    assert set(PRIOR2_STAGE_KEYS) >= {'prior', 'model', 'steps'}


# ---- KaoKore: the full configuration's other dataset, on a fake copy --------------------------------------------------

def fake_kaokore(root, n=30, size=64):
    "A folder in the official KaoKore layout (labels.csv + images_256/), with n small coloured faces."
    from PIL import Image
    (root / 'images_256').mkdir(parents=True)
    g = np.random.default_rng(0)
    rows = ['image,gender,status,set']
    for i in range(n):
        img = np.full((size, size, 3), g.integers(0, 256, 3), np.uint8)
        img[size // 4: 3 * size // 4, size // 4: 3 * size // 4] = g.integers(0, 256, 3)
        Image.fromarray(img).save(root / 'images_256' / f'{i:08d}.jpg')
        rows.append(f'{i:08d}.jpg,{i % 2},{i % 4},{"test" if i % 5 == 0 else "train"}')
    (root / 'labels.csv').write_text('\n'.join(rows) + '\n')


def test_kaokore_comparison_path_on_a_fake_folder(tmp_path):
    "The lesson's KaoKore settings: official splits, 64-px images (8x8 top, 16x16 bottom maps), both models train and are measured."
    from vqlearn.vqvae import train_vqvae
    fake_kaokore(tmp_path / 'kk')
    base = settings(**VQVAE2_SETTINGS, mode='quick')
    C = Settings({**base, **V2.VQVAE2_KAOKORE, 'root': str(tmp_path / 'kk'), 'steps': 3, 'warmup': 0, 'log_every': 1})
    train, test = lesson_data(C)
    assert (len(train), len(test)) == (24, 6) and train.image_shape == (3, 64, 64) and train.classes == ['noble', 'warrior', 'incarnation', 'commoner']
    m2, hist = train_vqvae2(C)
    assert hist.n_steps == 3
    codes = m2.encode((test.images.float() / 255))
    assert codes['top'].shape == (6, 8, 8) and codes['bottom'].shape == (6, 16, 16)
    C1 = Settings({**settings(**VQVAE_SETTINGS, mode='quick'), **V2.VQVAE2_KAOKORE, 'root': str(tmp_path / 'kk'), 'steps': 3, 'warmup': 0, 'log_every': 1})
    m1, _ = train_vqvae(C1)
    r1, r2 = evaluate_vqvae2(m1, test), evaluate_vqvae2(m2, test)
    assert set(r2['levels']) == {'top', 'bottom'} and set(r1['levels']) == {'codes'} and r1['mse'] > 0 and r2['mse'] > 0
    assert stage_settings_has_root(C)


def stage_settings_has_root(C):
    from vqlearn.data import stage_settings
    from vqlearn.vqvae import VQVAE_STAGE_KEYS
    cfg = stage_settings(C, VQVAE_STAGE_KEYS)
    return cfg['root'] == C.root and cfg['size'] == 64 and cfg['label'] == 'status' and 'npz' not in cfg


def test_end_to_end_comparison_runs_from_a_checkout_without_installing(tmp_path):
    "bench/vqvae2_compare.py runs both models and a constructor option end to end, and its table is the mean of its runs."
    import json, subprocess, sys
    from pathlib import Path
    from vqlearn.judge import Judge
    bench = Path(__file__).resolve().parents[1] / 'bench' / 'vqvae2_compare.py'
    g = np.random.default_rng(0)
    np.savez(tmp_path / 'imgs.npz', images=g.integers(0, 256, (160, 32, 32, 3), dtype=np.uint8),
             labels=np.arange(160) % 2, classes=np.array(['horse', 'bird']))
    torch.manual_seed(0); Judge(2, widths=(8, 16), classes=['horse', 'bird']).save(tmp_path / 'judge.safetensors')  # untrained
    libs = [p for p in sys.path if p.endswith('site-packages')]
    argv = [str(bench), '--data', 'imgs.npz', '--judge', 'judge.safetensors', '--seeds', '0,1', '--ae-minutes', '0.005',
            '--prior-minutes', '0.005', '--per-class', '3', '--threads', '1', '--json', 'runs.jsonl',
            '--models', 'vqvae,vqvae2:num_codes_top=8']
    code = (f"import sys, runpy; sys.path += {libs!r}; sys.argv = {argv!r}; "   # -I -S: the installed vqlearn is invisible
            f"runpy.run_path({str(bench)!r}, run_name='__main__')")
    out = subprocess.run([sys.executable, '-I', '-S', '-c', code], cwd=tmp_path, capture_output=True, text=True,
                         env={'OMP_NUM_THREADS': '1', 'PATH': '/usr/bin:/bin'})
    assert out.returncode == 0, out.stderr[-2000:]
    runs = [json.loads(l) for l in (tmp_path / 'runs.jsonl').read_text().splitlines()]
    assert [(r['seed'], r['model']) for r in runs] == [(s, m) for s in (0, 1) for m in ('vqvae', 'vqvae2:num_codes_top=8')]
    for r in runs:
        assert 0 < r['mse'] < 1 and r['ae_steps'] > 0 and r['prior_steps'] > 0 and 0 <= r['judge_accuracy'] <= 1
        assert 0 < r['bits_per_dim'] < 8 and r['frechet'] >= 0   # bits per 8-bit colour value
    two = [r for r in runs if r['model'] != 'vqvae']
    assert all({'usage_top', 'usage_bottom'} <= set(r) for r in two)
    row = [l for l in out.stdout.splitlines() if l.startswith('| vqvae2:num_codes_top=8 |')][0]
    mean = sum(r['mse'] for r in two) / 2
    assert row.split('|')[2].strip().split(' ± ')[0] == f"{mean:.4f}"   # the table is the mean over the seeds
    bad = subprocess.run([sys.executable, str(bench), '--data', 'imgs.npz', '--models', 'vqvae3'], cwd=tmp_path,
                         capture_output=True, text=True)
    assert bad.returncode != 0 and 'unknown models' in bad.stderr
