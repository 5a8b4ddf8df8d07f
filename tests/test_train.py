"The training loop and checkpoints: losses fall, checkpoints round-trip atomically and safely, resuming is exact."
import json, math, os, signal, subprocess, sys, textwrap, time
from pathlib import Path
import pytest, torch
from torch import nn
from safetensors.torch import save_file as plain_save_file
import vqlearn.core
from vqlearn.core import seed_everything, Checkpointable, load_tensors
from vqlearn.data import get_dataset, DeviceLoader
from vqlearn.train import fit, save_checkpoint, load_checkpoint, History, lr_multiplier

ROOT = Path(__file__).resolve().parents[1]

def model_():
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

def noisy_step(m, b):
    x, y = b
    return {'loss': nn.functional.cross_entropy(m(x + 0.1 * torch.randn_like(x)), y), 'aux': torch.tensor(1.0)}

def states_equal(a: nn.Module, b: nn.Module, atol: float = 0.0) -> bool:
    return all(torch.allclose(x.float(), y.float(), rtol=0, atol=atol) for x, y in zip(a.state_dict().values(), b.state_dict().values()))

class Crash(Exception): pass

def crashing(step_fn, after: int):
    "`step_fn`, raising Crash on call number `after + 1`."
    n = {'i': 0}
    def f(m, b):
        n['i'] += 1
        if n['i'] > after: raise Crash()
        return step_fn(m, b)
    return f

@pytest.fixture(scope='module')
def ds(): return get_dataset('shapes', n=192, size=16)

def run(ds, model, steps=24, step_fn=noisy_step, **kw):
    kw = {'sched': 'onecycle', 'warmup': 3, 'log_every': 4, **kw}
    return fit(model, DeviceLoader(ds, 32, flip=True, seed=2), step_fn, steps=steps, lr=1e-2, progress=False, device='cpu', **kw)

# --- the loop ---------------------------------------------------------------------------------------------------
def test_loss_falls_and_history(ds):
    seed_everything(0); m = model_()
    h = fit(m, DeviceLoader(ds, 32), lambda m, b: {'loss': nn.functional.mse_loss(m(b[0]), torch.zeros(len(b[0]), 5))},
            steps=40, lr=1e-2, log_every=10, progress=False)
    assert h.steps == [10, 20, 30, 40] and h['loss'][-1] < 0.5 * h['loss'][0]
    assert h.names == ['loss', 'lr'] and h.n_steps == 40 and h.train_s > 0

def test_same_seed_same_losses(ds):
    seed_everything(0); h1 = run(ds, model_())
    seed_everything(0); h2 = run(ds, model_())
    assert h1['loss'] == h2['loss'] and h1['aux'] == [1.0] * 6

def test_epochs_and_eval_and_clip(ds):
    seen = []
    h = fit(model_(), DeviceLoader(ds, 64), noisy_step, epochs=2, clip=0.1, log_every=100, progress=False,
            eval_fn=lambda m: seen.append(m.training) or {'score': 3.0}, eval_every=2)
    assert h.steps == [6] and h.steps_of('val_score') == [2, 4, 6] and seen == [False] * 3
    assert h.last('val_score') == 3.0
    with pytest.raises(KeyError): h.last('nope')

def test_batch_tfm_runs_on_every_batch_after_the_move(ds):
    seen = []
    def step(m, b):
        seen.append((b[0].is_contiguous(memory_format=torch.channels_last), float(b[0].max())))
        return noisy_step(m, b)
    tfm = lambda b: (b[0].contiguous(memory_format=torch.channels_last) * 0 + 2.0, b[1])
    h = fit(model_(), DeviceLoader(ds, 32), step, steps=7, batch_tfm=tfm, log_every=7, progress=False, device='cpu')
    assert seen == [(True, 2.0)] * 7 and h.n_steps == 7

# --- the schedule -----------------------------------------------------------------------------------------------
def reference_schedule(frac: float, warmup: float) -> float:
    "The warm-up + cosine curve the VQ-VAE benchmark was tuned with."
    frac = min(max(frac, 0.0), 1.0)
    if frac < warmup: return frac / warmup
    return 0.5 * (1 + math.cos(math.pi * (frac - warmup) / max(1 - warmup, 1e-8)))

def test_lr_multiplier_is_warmup_then_cosine():
    for w in (0.0, 0.03, 0.25):
        for f in [i / 200 for i in range(201)] + [-0.1, 1.2]:
            assert lr_multiplier(f, 'cosine', w) == pytest.approx(reference_schedule(f, w), abs=1e-12), (f, w)
    assert lr_multiplier(0.3, 'constant', 0.1) == 1.0 and lr_multiplier(0.05, None, 0.1) == pytest.approx(0.5)
    assert lr_multiplier(0.55, lambda t: 1 - t, 0.1) == pytest.approx(0.5)       # callables see the post-warm-up fraction
    assert lr_multiplier(0.0, 'onecycle') == pytest.approx(0.04) and lr_multiplier(0.3, 'onecycle') == pytest.approx(1.0)
    with pytest.raises(ValueError): lr_multiplier(0.5, 'cosine', 1.0)
    with pytest.raises(ValueError): lr_multiplier(0.5, 'linear-ish')

def test_fit_turns_steps_into_fractions(ds):
    h = fit(model_(), DeviceLoader(ds, 32), noisy_step, steps=20, lr=0.5, sched='cosine', warmup=4, log_every=1,
            progress=False, device='cpu', opt=None, clip=0.0)
    want = [0.5 * lr_multiplier((i + 0.5) / 20, 'cosine', 4 / 20) for i in range(20)]
    assert h['lr'] == pytest.approx(want, abs=1e-12)
    h2 = fit(model_(), DeviceLoader(ds, 32), noisy_step, steps=20, lr=0.5, sched='cosine', warmup=0.2, log_every=1,
             progress=False, device='cpu', clip=0.0)
    assert h2['lr'] == pytest.approx(want, abs=1e-12)                         # 4 steps of 20 == a fraction of 0.2

# --- the time budget --------------------------------------------------------------------------------------------
def slow(seconds):
    def f(m, b): time.sleep(seconds); return noisy_step(m, b)
    return f

def test_budget_stops_on_time_and_the_schedule_follows_the_clock(ds):
    h = fit(model_(), DeviceLoader(ds, 32), slow(0.02), budget_s=0.6, lr=1.0, sched='cosine', log_every=1,
            progress=False, device='cpu')
    assert 5 <= h.n_steps < 31 and 0.6 <= h.train_s < 1.2 and h.steps[-1] == h.n_steps
    lrs = h['lr']
    assert lrs[0] > 0.95 and lrs[-1] < 0.25 and all(a >= b for a, b in zip(lrs, lrs[1:]))   # one cosine, 1 -> ~0
    assert abs(lrs[len(lrs) // 2] - 0.5) < 0.3                                                  # half-way: ~0.5

def test_budget_with_a_step_cap(ds):
    h = fit(model_(), DeviceLoader(ds, 32), noisy_step, steps=5, budget_s=60, log_every=2, progress=False, device='cpu')
    assert h.n_steps == 5 and h.steps == [2, 4, 5] and h.train_s < 30
    h = fit(model_(), DeviceLoader(ds, 32), slow(0.02), steps=10_000, budget_s=0.3, lr=1.0, sched='cosine', log_every=1,
            progress=False, device='cpu')
    assert 2 <= h.n_steps < 10_000 and h['lr'][-1] < 0.5

def test_budget_does_not_count_evaluation(ds):
    h = fit(model_(), DeviceLoader(ds, 32), slow(0.01), budget_s=0.3, eval_fn=lambda m: time.sleep(0.2) or {'x': 1.0},
            eval_every=1, log_every=1, progress=False, device='cpu')
    assert h.n_steps >= 5 and h.train_s < 0.6         # 0.2 s of evaluation per step would end the run after 2 steps

def test_budget_resume_continues_the_clock(ds, tmp_path):
    ck = tmp_path / 'b.safetensors'
    h1 = fit(model_(), DeviceLoader(ds, 32), slow(0.01), budget_s=0.3, ckpt=ck, ckpt_every=1, log_every=1, progress=False, device='cpu')
    st = load_checkpoint(ck)
    assert st['elapsed_s'] >= 0.3 and st['history'].records == h1.records
    h2 = fit(model_(), DeviceLoader(ds, 32), slow(0.01), budget_s=0.3, ckpt=ck, resume=True, progress=False, device='cpu')
    assert h2.n_steps == h1.n_steps and h2.records == h1.records              # the budget was spent: nothing to do

def test_budget_needs_a_fractional_warmup(ds):
    with pytest.raises(ValueError, match='fraction'):
        fit(model_(), DeviceLoader(ds, 32), noisy_step, budget_s=1, warmup=10, progress=False)

# --- resuming ---------------------------------------------------------------------------------------------------
def test_resume_equals_uninterrupted(ds, tmp_path):
    seed_everything(0); full = model_(); h_full = run(ds, full, steps=24)
    seed_everything(0); part = model_()
    with pytest.raises(Crash):
        run(ds, part, steps=24, step_fn=crashing(noisy_step, 10), ckpt=tmp_path / 'c.safetensors', ckpt_every=10)
    assert load_checkpoint(tmp_path / 'c.safetensors')['step'] == 10
    seed_everything(99); res = model_()
    h = run(ds, res, steps=24, ckpt=tmp_path / 'c.safetensors', ckpt_every=10, resume=True)
    assert states_equal(full, res, atol=1e-6)
    assert h.steps[-1] == 24 and load_checkpoint(tmp_path / 'c.safetensors')['step'] == 24
    # the history, record by record: the logs before the crash, and the interval the checkpoint cut in two (8 < 10 < 12)
    assert h.records == h_full.records and h.n_steps == h_full.n_steps == 24
    assert h.steps == [4, 8, 12, 16, 20, 24]

class Counter:
    "A stateful step function: its loss is scaled by the number of steps it has seen (like a KL warm-up)."
    def __init__(self, crash_after: int | None = None): self.n, self.crash_after = 0, crash_after
    def __call__(self, m, b):
        if self.crash_after is not None and self.n >= self.crash_after: raise Crash()
        self.n += 1
        out = noisy_step(m, b)
        return {**out, 'loss': out['loss'] * min(1.0, self.n / 15), 'n': float(self.n)}
    def state_dict(self): return {'n': torch.tensor(self.n)}
    def load_state_dict(self, st): self.n = int(st['n'])

class Holder:
    "The same state behind a bound method, as `VAELoss.step_fn`."
    def __init__(self, crash_after: int | None = None): self.c = Counter(crash_after)
    def step_fn(self, m, b): return self.c(m, b)
    def state_dict(self): return {'seen.steps': self.c.n}                  # a dotted key, kept as it is
    def load_state_dict(self, st): self.c.n = st['seen.steps']

@pytest.mark.parametrize('make', [Counter, lambda **kw: Holder(**kw).step_fn], ids=['callable', 'bound-method'])
def test_resume_restores_step_function_state(ds, tmp_path, make):
    seed_everything(0); full = model_(); h_full = run(ds, full, step_fn=make())
    seed_everything(0); part = model_()
    with pytest.raises(Crash): run(ds, part, step_fn=make(crash_after=10), ckpt=tmp_path / 's.safetensors', ckpt_every=10)
    seed_everything(5); res = model_()
    h = run(ds, res, step_fn=make(), ckpt=tmp_path / 's.safetensors', ckpt_every=10, resume=True)
    assert h['n'] == h_full['n'] and h.records == h_full.records
    assert states_equal(full, res, atol=1e-6)

def test_fit_checkpoint_rebuilds_a_checkpointable_model(ds, tmp_path):
    class Tiny(Checkpointable, nn.Module):
        def __init__(self, width: int = 4):
            super().__init__(); self.config = dict(width=width)
            self.net = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 5))
        def forward(self, x): return self.net(x)
    m = Tiny(6)
    fit(m, DeviceLoader(ds, 32), noisy_step, steps=3, ckpt=tmp_path / 't.safetensors', progress=False, device='cpu')
    again = Tiny.from_checkpoint(tmp_path / 't.safetensors', device='cpu')
    assert again.config == {'width': 6} and states_equal(m, again)
    with pytest.raises(ValueError, match='Tiny'):                             # the class name is stored too
        type('Other', (Tiny,), {}).from_checkpoint(tmp_path / 't.safetensors')

# --- checkpoints ------------------------------------------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path):
    m = model_(); opt = torch.optim.AdamW(m.parameters(), lr=1e-3, betas=(0.8, 0.9))
    m(torch.rand(4, 3, 16, 16)).sum().backward(); opt.step()
    save_checkpoint(tmp_path / 'a.safetensors', m, opt, step=7, config={'k': [1, 2]}, table=torch.eye(2))
    m2 = model_(); o2 = torch.optim.AdamW(m2.parameters(), lr=5.0)
    st = load_checkpoint(tmp_path / 'a.safetensors', m2, o2)
    assert st['step'] == 7 and st['config'] == {'k': [1, 2]} and torch.equal(st['table'], torch.eye(2))
    assert states_equal(m, m2)
    assert o2.param_groups[0]['lr'] == 1e-3 and tuple(o2.param_groups[0]['betas']) == (0.8, 0.9)
    s1, s2 = opt.state_dict()['state'], o2.state_dict()['state']
    assert all(torch.equal(s1[k]['exp_avg_sq'], s2[k]['exp_avg_sq']) for k in s1)
    from safetensors.torch import load_file                                 # plain safetensors: no pickle
    assert 'model.0.weight' in load_file(str(tmp_path / 'a.safetensors'))

def test_state_keys_come_back_exactly(tmp_path):
    state = {'kl.warmup': 0.5, 'ema': {'enc.0.weight': torch.ones(2, 3), 'enc.0': {'bias': torch.zeros(1)}},
             '$tensor': 'not a tensor', 'odd': {'$tensor': 'state.0'}, 'nan': float('nan'), 'xs': [1, (2, torch.ones(1))]}
    save_checkpoint(tmp_path / 'k.safetensors', model_(), **state)
    st = load_checkpoint(tmp_path / 'k.safetensors')
    assert list(st) == list(state) and st['kl.warmup'] == 0.5
    assert list(st['ema']) == ['enc.0.weight', 'enc.0'] and torch.equal(st['ema']['enc.0.weight'], torch.ones(2, 3))
    assert torch.equal(st['ema']['enc.0']['bias'], torch.zeros(1))
    assert st['$tensor'] == 'not a tensor' and st['odd'] == {'$tensor': 'state.0'} and math.isnan(st['nan'])
    assert st['xs'][0] == 1 and st['xs'][1][0] == 2 and torch.equal(st['xs'][1][1], torch.ones(1))

def test_non_string_keys_are_refused(tmp_path):
    with pytest.raises(TypeError, match='keys must be strings'): save_checkpoint(tmp_path / 'i.safetensors', model_(), table={1: 2.0})
    with pytest.raises(TypeError, match='keys must be strings'): save_checkpoint(tmp_path / 'i.safetensors', model_(), a={'b': {(1, 2): 3}})
    assert not list(tmp_path.iterdir())

def test_checkpoint_rejects_unserialisable_state(tmp_path):
    with pytest.raises(TypeError): save_checkpoint(tmp_path / 'x.safetensors', model_(), fn=lambda: 1)
    assert not list(tmp_path.iterdir())

def test_history_is_stored_as_columns(tmp_path):
    n = 300_000
    h = History(n_steps=7 * n, train_s=12.5)
    for i in range(n): h.add(7 * i, loss=1 / (i + 1), lr=0.1)
    h.add(7 * n, val_acc=0.25); h.records[5]['odd'] = -0.0
    p = save_checkpoint(tmp_path / 'h.safetensors', model_(), history=h)
    with open(p, 'rb') as f: header_len = int.from_bytes(f.read(8), 'little')
    assert header_len < 4000, header_len                                  # no record in the JSON header
    back = load_checkpoint(p)['history']
    assert isinstance(back, History) and back.records == h.records and back.n_steps == 7 * n and back.train_s == 12.5
    assert back.records[-1] == {'step': 7 * n, 'val_acc': 0.25} and set(back.records[5]) == {'step', 'loss', 'lr', 'odd'}
    assert load_checkpoint(save_checkpoint(tmp_path / 'e.safetensors', model_(), history=History()))['history'].records == []

def test_fit_checkpoint_header_does_not_grow(ds, tmp_path):
    sizes = []
    for steps in (4, 40):
        p = tmp_path / f'{steps}.safetensors'
        fit(model_(), DeviceLoader(ds, 32), noisy_step, steps=steps, log_every=1, ckpt=p, progress=False, device='cpu')
        with open(p, 'rb') as f: sizes.append(int.from_bytes(f.read(8), 'little'))
        assert len(load_checkpoint(p)['history']) == steps
    assert abs(sizes[1] - sizes[0]) < 64, sizes

def test_crash_while_saving_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / 'c.safetensors'
    save_checkpoint(p, model_(), step=1)
    good = p.read_bytes()
    def half_write(tensors, filename, metadata=None):
        with open(filename, 'wb') as f: f.write(b'garbage, half a file')
        raise OSError('disk full')
    monkeypatch.setattr(vqlearn.core, 'save_file', half_write)
    with pytest.raises(OSError): save_checkpoint(p, model_(), step=2)
    assert p.read_bytes() == good and load_checkpoint(p, model_())['step'] == 1
    assert [f.name for f in tmp_path.iterdir()] == ['c.safetensors']   # no temporary file left behind

def test_killed_save_leaves_no_temp_after_the_next_save(tmp_path):
    "A process killed (SIGKILL) while writing a checkpoint cannot clean up; the next save of that checkpoint does."
    p = tmp_path / 'ck.safetensors'
    m = model_(); save_checkpoint(p, m, step=1)
    code = textwrap.dedent(f"""
        import sys, time, torch
        from torch import nn
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import vqlearn.core, vqlearn.train as T
        from test_train import model_
        def stuck(tensors, filename, metadata=None):
            with open(filename, 'wb') as f: f.write(b'x' * 4096)          # half a file...
            print('writing', flush=True); time.sleep(120)                 # ...and then the power goes
        for mod in (vqlearn.core, T):
            if hasattr(mod, 'save_file'): mod.save_file = stuck
        T.save_checkpoint({str(p)!r}, model_(), step=2)
    """)
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try: assert proc.stdout.readline().strip() == 'writing'
    finally: os.kill(proc.pid, signal.SIGKILL); proc.wait()
    assert len([q for q in tmp_path.iterdir() if q.name != 'ck.safetensors']) == 1   # the killed writer's temporary file
    assert load_checkpoint(p)['step'] == 1                                           # the old checkpoint is intact
    save_checkpoint(p, m, step=3)
    assert [q.name for q in tmp_path.iterdir()] == ['ck.safetensors'] and load_checkpoint(p)['step'] == 3

def test_checkpoint_file_mode_follows_umask(tmp_path):
    "The temporary file of an atomic save is private (mkstemp); the final file gets the usual mode."
    umask = os.umask(0o022)
    try:
        p = save_checkpoint(tmp_path / 'm.safetensors', model_())
        assert p.stat().st_mode & 0o777 == 0o644
    finally: os.umask(umask)

# --- failed loads change nothing --------------------------------------------------------------------------------
def trained():
    m = model_(); opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m(torch.rand(4, 3, 16, 16)).sum().backward(); opt.step()
    return m, opt

def snapshot(m, opt):
    return [t.clone() for t in m.state_dict().values()], json.dumps(opt.state_dict()['param_groups']), \
           {k: {n: v.clone() for n, v in s.items()} for k, s in opt.state_dict()['state'].items()}

def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1] and a[2].keys() == b[2].keys() and \
        all(torch.equal(a[2][k][n], b[2][k][n]) for k in a[2] for n in a[2][k])

def test_failed_load_leaves_model_untouched(tmp_path):
    src, opt = trained(); p = save_checkpoint(tmp_path / 'a.safetensors', src, opt, step=1)
    wider = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6))
    renamed = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                            nn.Sequential(nn.Linear(8, 5)))
    for target in (wider, renamed):
        before = [t.clone() for t in target.state_dict().values()]
        with pytest.raises(Exception) as e: load_checkpoint(p, target)
        assert all(torch.equal(a, b) for a, b in zip(before, target.state_dict().values())), target   # not half loaded
        assert isinstance(e.value, ValueError) and str(p) in str(e.value)

def test_failed_optimizer_load_changes_nothing(tmp_path):
    src, opt = trained(); p = save_checkpoint(tmp_path / 'a.safetensors', src, opt, step=1)
    m, _ = trained()
    sgd = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
    before = snapshot(m, sgd)
    with pytest.raises(ValueError, match='Adam'): load_checkpoint(p, m, sgd)         # another optimizer class
    assert same(before, snapshot(m, sgd))
    m2, _ = trained()
    split = torch.optim.Adam([{'params': list(m2.parameters())[:2]}, {'params': list(m2.parameters())[2:]}], lr=0.5)
    before = snapshot(m2, split)
    with pytest.raises(ValueError, match='groups'): load_checkpoint(p, m2, split)     # other parameter groups
    assert same(before, snapshot(m2, split))

def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError): load_checkpoint(tmp_path / 'none.safetensors', model_())
    plain_save_file({'a': torch.zeros(1)}, str(tmp_path / 'plain.safetensors'))
    with pytest.raises(ValueError): load_checkpoint(tmp_path / 'plain.safetensors', model_())
    save_checkpoint(tmp_path / 'noopt.safetensors', model_())
    with pytest.raises(ValueError): load_checkpoint(tmp_path / 'noopt.safetensors', model_(), torch.optim.SGD(model_().parameters(), lr=1))

@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'empty', 'header'])
def test_corrupt_checkpoint_raises_value_error_naming_the_path(tmp_path, damage):
    p = save_checkpoint(tmp_path / 'c.safetensors', model_(), step=3, history=History([{'step': 1, 'loss': 2.0}]))
    raw = p.read_bytes()
    if damage == 'truncate': p.write_bytes(raw[:len(raw) // 2])
    elif damage == 'garbage': p.write_bytes(os.urandom(300))
    elif damage == 'empty': p.write_bytes(b'')
    else: p.write_bytes(raw.replace(b'"step\\": 3', b'"step\\"  3'))     # same length, broken JSON
    with pytest.raises(ValueError, match=str(p)): load_checkpoint(p, model_())

# --- clear errors -----------------------------------------------------------------------------------------------
def test_fit_argument_errors(ds):
    dl = DeviceLoader(ds, 32)
    with pytest.raises(ValueError): fit(model_(), dl, noisy_step, progress=False)
    with pytest.raises(ValueError): fit(model_(), dl, noisy_step, steps=2, epochs=1, progress=False)
    with pytest.raises(KeyError): fit(model_(), dl, lambda m, b: {'mse': m(b[0]).sum()}, steps=1, progress=False)
    with pytest.raises(ValueError): fit(model_(), dl, noisy_step, steps=2, sched='linear-ish', progress=False)
    for bad in (0, -5, 2.5):
        with pytest.raises(ValueError, match='log_every'): fit(model_(), dl, noisy_step, steps=2, log_every=bad, progress=False)
    with pytest.raises(ValueError, match='ckpt_every'): fit(model_(), dl, noisy_step, steps=2, ckpt_every=0, progress=False)
    with pytest.raises(ValueError, match='budget_s'): fit(model_(), dl, noisy_step, budget_s=0, progress=False)
    with pytest.raises(ValueError, match='resume'): fit(model_(), dl, noisy_step, steps=2, resume=True, progress=False)

def test_bad_losses_have_clear_messages(ds):
    dl = DeviceLoader(ds, 32)
    with pytest.raises(TypeError, match='floating-point'):
        fit(model_(), dl, lambda m, b: {'loss': (m(b[0]).sum() * 0).long()}, steps=1, progress=False)
    with pytest.raises(TypeError, match='floating-point'): fit(model_(), dl, lambda m, b: {'loss': 1.5}, steps=1, progress=False)
    with pytest.raises(ValueError, match='single number'): fit(model_(), dl, lambda m, b: {'loss': m(b[0]).sum(1)}, steps=1, progress=False)
    with pytest.raises(ValueError, match='no gradient'): fit(model_(), dl, lambda m, b: {'loss': torch.tensor(1.0)}, steps=1, progress=False)
    with pytest.raises(TypeError, match="'acc'"):
        fit(model_(), dl, lambda m, b: {'loss': m(b[0]).sum(), 'acc': 'high'}, steps=1, progress=False)

def test_dtype_mismatch_names_the_batch(ds):
    u8 = [(ds.images[:8], ds.labels[:8])]                                  # uint8 images, a float model
    step = lambda m, b: {'loss': nn.functional.cross_entropy(m(b[0]), b[1])}
    with pytest.raises(RuntimeError) as e: fit(model_(), u8, step, steps=1, progress=False, device='cpu')
    notes = ' '.join(getattr(e.value, '__notes__', []))
    if sys.version_info >= (3, 11): assert 'uint8' in notes and 'float32' in notes

def test_empty_batches_are_refused(ds):
    empty = [(torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long))]
    with pytest.raises(ValueError, match='empty'): fit(model_(), empty, noisy_step, steps=2, progress=False)
    with pytest.raises(ValueError, match='no batches'): fit(model_(), [], noisy_step, steps=2, progress=False)

# --- nan and inf --------------------------------------------------------------------------------------------------
def test_nan_loss_is_reported(ds):
    with pytest.raises(FloatingPointError):
        fit(model_(), DeviceLoader(ds, 32), lambda m, b: {'loss': m(b[0]).sum() * float('nan')}, steps=3, log_every=1, progress=False)

def nan_from(n):
    k = {'i': 0}
    def f(m, b):
        k['i'] += 1
        out = noisy_step(m, b)
        return {**out, 'loss': out['loss'] * (float('nan') if k['i'] >= n else 1.0)}
    return f

def finite(m): return all(v.isfinite().all() for v in m.state_dict().values() if v.is_floating_point())

def test_nan_never_replaces_a_good_checkpoint(ds, tmp_path):
    p = tmp_path / 'n.safetensors'
    with pytest.raises(FloatingPointError):
        fit(model_(), DeviceLoader(ds, 32), nan_from(4), steps=20, log_every=10, ckpt=p, ckpt_every=1, progress=False, device='cpu')
    m = model_(); st = load_checkpoint(p, m)
    assert st['step'] == 3 and finite(m) and all(math.isfinite(v) for v in st['history']['loss'])

def test_nan_weights_with_a_finite_loss_are_caught(ds, tmp_path):
    "sqrt at 0 has an infinite gradient: the loss is finite, the weights become nan after the step."
    k = {'i': 0}
    def step(m, b):
        k['i'] += 1
        out = noisy_step(m, b)
        if k['i'] >= 3:
            w = m[0].weight
            out['loss'] = out['loss'] + torch.sqrt(w - w.detach()).sum()   # adds 0, gradient inf
        return out
    p = tmp_path / 'w.safetensors'
    with pytest.raises(FloatingPointError, match='weights'):
        fit(model_(), DeviceLoader(ds, 32), step, steps=10, log_every=5, ckpt=p, ckpt_every=1, progress=False, device='cpu')
    m = model_()
    assert load_checkpoint(p, m)['step'] == 2 and finite(m)
