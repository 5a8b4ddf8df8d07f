"The training loop and checkpoints: losses fall, checkpoints round-trip atomically, resuming is exact."
import math, os
import pytest, torch
from torch import nn
import vqlearn.train as T
from vqlearn.core import seed_everything
from vqlearn.data import get_dataset, DeviceLoader
from vqlearn.train import fit, save_checkpoint, load_checkpoint, History

def model_():
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

def noisy_step(m, b):
    x, y = b
    return {'loss': nn.functional.cross_entropy(m(x + 0.1 * torch.randn_like(x)), y), 'aux': torch.tensor(1.0)}

@pytest.fixture(scope='module')
def ds(): return get_dataset('shapes', n=192, size=16)

def run(ds, model, steps=24, **kw):
    return fit(model, DeviceLoader(ds, 32, flip=True, seed=2), noisy_step, steps=steps, lr=1e-2, sched='onecycle',
               warmup=3, log_every=4, progress=False, device='cpu', **kw)

def test_loss_falls_and_history(ds):
    seed_everything(0); m = model_()
    h = fit(m, DeviceLoader(ds, 32), lambda m, b: {'loss': nn.functional.mse_loss(m(b[0]), torch.zeros(len(b[0]), 5))},
            steps=40, lr=1e-2, log_every=10, progress=False)
    assert h.steps == [10, 20, 30, 40] and h['loss'][-1] < 0.5 * h['loss'][0]
    assert h.names == ['loss', 'lr']

def test_same_seed_same_losses(ds):
    seed_everything(0); h1 = run(ds, model_())
    seed_everything(0); h2 = run(ds, model_())
    assert h1['loss'] == h2['loss'] and h1['aux'] == [1.0] * 6

def test_resume_equals_uninterrupted(ds, tmp_path):
    seed_everything(0); full = model_(); run(ds, full, steps=24)
    seed_everything(0); part = model_()
    n = {'i': 0}
    def crash(m, b):
        n['i'] += 1
        if n['i'] > 10: raise KeyboardInterrupt
        return noisy_step(m, b)
    with pytest.raises(KeyboardInterrupt):
        fit(part, DeviceLoader(ds, 32, flip=True, seed=2), crash, steps=24, lr=1e-2, sched='onecycle', warmup=3,
            log_every=4, progress=False, device='cpu', ckpt=tmp_path / 'c.safetensors', ckpt_every=10)
    seed_everything(99); res = model_()
    h = run(ds, res, steps=24, ckpt=tmp_path / 'c.safetensors', ckpt_every=10, resume=True)
    for a, b in zip(full.state_dict().values(), res.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert h.steps[-1] == 24 and load_checkpoint(tmp_path / 'c.safetensors')['step'] == 24

def test_checkpoint_round_trip(tmp_path):
    m = model_(); opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.8, 0.9))
    m(torch.rand(4, 3, 16, 16)).sum().backward(); opt.step()
    save_checkpoint(tmp_path / 'a.safetensors', m, opt, step=7, config={'k': [1, 2]}, table=torch.eye(2))
    m2, o2 = model_(), None
    o2 = torch.optim.AdamW(m2.parameters(), lr=5.0)
    st = load_checkpoint(tmp_path / 'a.safetensors', m2, o2)
    assert st['step'] == 7 and st['config'] == {'k': [1, 2]} and torch.equal(st['table'], torch.eye(2))
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()): assert torch.equal(a, b)
    assert o2.param_groups[0]['lr'] == 1e-3 and tuple(o2.param_groups[0]['betas']) == (0.8, 0.9)
    s1, s2 = opt.state_dict()['state'], o2.state_dict()['state']
    assert all(torch.equal(s1[k]['exp_avg_sq'], s2[k]['exp_avg_sq']) for k in s1)
    # the file is plain safetensors: no pickle
    from safetensors.torch import load_file
    assert 'model.0.weight' in load_file(str(tmp_path / 'a.safetensors'))

def test_checkpoint_rejects_unserialisable_state(tmp_path):
    with pytest.raises(TypeError): save_checkpoint(tmp_path / 'x.safetensors', model_(), fn=lambda: 1)
    assert not list(tmp_path.iterdir())

def test_crash_while_saving_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / 'c.safetensors'
    m = model_(); save_checkpoint(p, m, step=1)
    good = p.read_bytes()
    def half_write(tensors, filename, metadata=None):
        with open(filename, 'wb') as f: f.write(b'garbage, half a file')
        raise OSError('disk full')
    monkeypatch.setattr(T, 'save_file', half_write)
    with pytest.raises(OSError): save_checkpoint(p, model_(), step=2)
    assert p.read_bytes() == good and load_checkpoint(p, model_())['step'] == 1
    assert [f.name for f in tmp_path.iterdir()] == ['c.safetensors']   # no temporary file left behind

def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError): load_checkpoint(tmp_path / 'none.safetensors', model_())
    from safetensors.torch import save_file
    save_file({'a': torch.zeros(1)}, str(tmp_path / 'plain.safetensors'))
    with pytest.raises(ValueError): load_checkpoint(tmp_path / 'plain.safetensors', model_())
    save_checkpoint(tmp_path / 'noopt.safetensors', model_())
    with pytest.raises(ValueError): load_checkpoint(tmp_path / 'noopt.safetensors', model_(), torch.optim.SGD(model_().parameters(), lr=1))

def test_fit_argument_errors(ds):
    dl = DeviceLoader(ds, 32)
    with pytest.raises(ValueError): fit(model_(), dl, noisy_step, progress=False)
    with pytest.raises(ValueError): fit(model_(), dl, noisy_step, steps=2, epochs=1, progress=False)
    with pytest.raises(KeyError): fit(model_(), dl, lambda m, b: {'mse': m(b[0]).sum()}, steps=1, progress=False)
    with pytest.raises(ValueError): fit(model_(), dl, noisy_step, steps=2, sched='linear-ish', progress=False)

def test_nan_loss_is_reported(ds):
    with pytest.raises(FloatingPointError):
        fit(model_(), DeviceLoader(ds, 32), lambda m, b: {'loss': m(b[0]).sum() * float('nan')}, steps=3, log_every=1, progress=False)

def test_epochs_and_eval_and_clip(ds):
    seen = []
    h = fit(model_(), DeviceLoader(ds, 64), noisy_step, epochs=2, clip=0.1, log_every=100, progress=False,
            eval_fn=lambda m: seen.append(m.training) or {'score': 3.0}, eval_every=2)
    assert h.steps == [6] and h.steps_of('val_score') == [2, 4, 6] and seen == [False] * 3
    assert h.last('val_score') == 3.0
    with pytest.raises(KeyError): h.last('nope')

def test_checkpoint_file_mode_follows_umask(tmp_path):
    "The temporary file of an atomic save is private (mkstemp); the final file gets the usual mode."
    umask = os.umask(0o022)
    try:
        p = save_checkpoint(tmp_path / 'm.safetensors', model_())
        assert p.stat().st_mode & 0o777 == 0o644
    finally: os.umask(umask)
