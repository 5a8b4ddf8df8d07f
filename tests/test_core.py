"vqlearn.core: settings, crash-safe files, validated loading, rebuilding models, and the stage cache."
import os, signal, subprocess, sys, textwrap, threading, time
from pathlib import Path
import pytest, torch
from torch import nn
from vqlearn.core import (settings, run_mode, pick, eval_mode, model_device, atomic_write, save_tensors, load_tensors,
                          load_model_state, Checkpointable, cached, artifact_key, cache_dir)

ROOT = Path(__file__).resolve().parents[1]

class Net(Checkpointable, nn.Module):
    def __init__(self, n: int = 3, hidden: int = 4):
        super().__init__()
        self.config = dict(n=n, hidden=hidden)
        self.a, self.b = nn.Linear(n, hidden), nn.Linear(hidden, n)

def test_settings_pick_the_running_mode(monkeypatch):
    for k in ('VQLEARN_MODE', 'VQLEARN_QUICK', 'IN_TEST'): monkeypatch.delenv(k, raising=False)
    block = dict(quick=dict(steps=1), docs=dict(steps=2), full=dict(steps=3))
    assert run_mode() == 'full' and settings(**block).steps == 3
    monkeypatch.setenv('IN_TEST', '1'); assert run_mode() == 'quick' and settings(**block).steps == 1 and pick(1, 3) == 1
    monkeypatch.setenv('VQLEARN_MODE', 'docs'); assert settings(**block).steps == 2 and pick(1, 3, 2) == 2
    monkeypatch.setenv('VQLEARN_MODE', 'fast')
    with pytest.raises(ValueError, match='VQLEARN_MODE'): run_mode()

def test_settings_refuse_mismatched_keys():
    with pytest.raises(KeyError, match='only in quick'): settings(quick=dict(steps=1, lr=1), full=dict(steps=2), mode='full')
    with pytest.raises(KeyError, match='both'): settings(quick=dict(steps=1), full=dict(steps=2), steps=3, mode='quick')
    C = settings(quick=dict(steps=1), full=dict(steps=2), seed=7, mode='quick')
    with pytest.raises(AttributeError, match='steps'): C.step

def test_eval_mode_restores_on_error():
    m = nn.Sequential(nn.Dropout())
    with pytest.raises(ZeroDivisionError):
        with eval_mode(m): assert not m.training; 1 / 0
    assert m.training and model_device(m) == torch.device('cpu')

def test_atomic_write_keeps_old_file_on_error(tmp_path):
    p = tmp_path / 'x.bin'
    atomic_write(p, lambda t: t.write_bytes(b'good'))
    def fail(t): t.write_bytes(b'partial'); raise RuntimeError('crash')
    with pytest.raises(RuntimeError): atomic_write(p, fail)
    assert p.read_bytes() == b'good' and [q.name for q in tmp_path.iterdir()] == ['x.bin']

def test_killed_writer_leaves_no_temp_after_next_save(tmp_path):
    "A process killed mid-write cannot clean up; the next save of the same target removes its temporary file."
    target = tmp_path / 'ck.safetensors'
    save_tensors(target, {'w': torch.zeros(3)}, {'v': 1})
    code = textwrap.dedent(f"""
        import time, torch
        from vqlearn.core import atomic_write
        def slow(tmp): tmp.write_bytes(b'x' * 1000); print('writing', flush=True); time.sleep(60)
        atomic_write({str(target)!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == 'writing'
    os.kill(proc.pid, signal.SIGKILL); proc.wait()
    leftovers = [q for q in tmp_path.iterdir() if q.name.endswith('.tmp')]
    assert len(leftovers) == 1                                    # the killed writer's temporary file
    save_tensors(target, {'w': torch.ones(3)}, {'v': 2})
    assert sorted(q.name for q in tmp_path.iterdir()) == ['ck.safetensors']
    t, m = load_tensors(target)
    assert torch.equal(t['w'], torch.ones(3)) and m == {'v': 2}

def test_live_writers_temp_is_not_removed(tmp_path):
    target = tmp_path / 'a.bin'
    live = tmp_path / f'.a.bin.{os.getppid()}.zz.tmp'            # a running process (our parent) owns it
    live.write_bytes(b'busy')
    atomic_write(target, lambda t: t.write_bytes(b'1'))
    assert live.exists()

@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'empty', 'bad_header'])
def test_corrupt_files_raise_value_error_naming_the_path(tmp_path, damage):
    p = save_tensors(tmp_path / 'f.safetensors', {'w': torch.randn(4, 4)}, {'a': 1})
    raw = p.read_bytes()
    if damage == 'truncate': p.write_bytes(raw[:len(raw) // 2])
    elif damage == 'garbage': p.write_bytes(os.urandom(200))
    elif damage == 'empty': p.write_bytes(b'')
    else:
        bad = raw.replace(b'{\\"a\\": 1}', b'{\\"a\\"  1}')            # same length: valid safetensors, broken JSON
        assert bad != raw and len(bad) == len(raw); p.write_bytes(bad)
    with pytest.raises(ValueError, match='f.safetensors'): load_tensors(p)

def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope'): load_tensors(tmp_path / 'nope.safetensors')

def test_save_tensors_keeps_names_and_refuses_bad_input(tmp_path):
    p = save_tensors(tmp_path / 'n.safetensors', {'a.b.c': torch.ones(1), '0': torch.zeros(1)}, {'k.x': [1, 2]})
    t, m = load_tensors(p)
    assert set(t) == {'a.b.c', '0'} and m == {'k.x': [1, 2]}
    with pytest.raises(TypeError): save_tensors(tmp_path / 'b.safetensors', {1: torch.ones(1)})
    with pytest.raises(TypeError, match='JSON'): save_tensors(tmp_path / 'b.safetensors', {}, {'f': object()})
    assert not (tmp_path / 'b.safetensors').exists()

def test_failed_load_changes_nothing():
    src, dst = Net(), Net()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    for bad in ({**src.state_dict(), 'b.bias': torch.zeros(7)},                      # shape
                {k: v for k, v in src.state_dict().items() if k != 'b.bias'},        # missing
                {**src.state_dict(), 'c.weight': torch.zeros(1)}):                   # unexpected
        with pytest.raises(ValueError, match='does not fit Net'): load_model_state(dst, bad, 'x')
        assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())
    load_model_state(dst, src.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))

def test_from_checkpoint_rebuilds_from_config(tmp_path):
    m = Net(5, 7)
    p = m.save(tmp_path / 'm.safetensors', trained_on='nothing')
    r = Net.from_checkpoint(p, device='cpu')
    assert r.config == {'n': 5, 'hidden': 7} and not r.training and r.a.weight.shape == (7, 5)
    x = torch.randn(2, 5)
    assert torch.equal(m(x) if False else m.b(m.a(x)), r.b(r.a(x)))
    class Other(Net): pass
    with pytest.raises(ValueError, match='holds a Net'): Other.from_checkpoint(p)
    _, meta = load_tensors(p); assert meta['trained_on'] == 'nothing' and meta['class'] == 'Net'

def test_cached_makes_once_and_keys_on_config(tmp_path):
    calls = []
    def make(p): calls.append(p); Net(3).save(p)
    a = cached('net', make, config={'n': 3}, folder=tmp_path)
    assert cached('net', make, config={'n': 3}, folder=tmp_path) == a and len(calls) == 1
    assert cached('net', make, config={'n': 4}, folder=tmp_path) != a and len(calls) == 2
    assert artifact_key('net', {'n': 3}) == a.name and a.parent == tmp_path

def test_cached_remakes_a_damaged_artifact(tmp_path):
    def make(p): Net(3).save(p)
    p = cached('net', make, config={}, folder=tmp_path)
    p.write_bytes(b'garbage')
    assert cached('net', make, config={}, check=Net.from_checkpoint, folder=tmp_path) == p
    assert Net.from_checkpoint(p).config['n'] == 3

def test_cached_make_must_write(tmp_path):
    with pytest.raises(FileNotFoundError, match='did not write'): cached('x', lambda p: None, folder=tmp_path)

def test_cached_concurrent_callers_make_once(tmp_path):
    calls = []
    def make(p): calls.append(1); time.sleep(0.3); Net(3).save(p)
    ts = [threading.Thread(target=cached, args=('net', make), kwargs=dict(config={}, folder=tmp_path)) for _ in range(3)]
    for t in ts: t.start()
    for t in ts: t.join()
    assert len(calls) == 1

def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv('VQLEARN_CACHE', str(tmp_path / 'c'))
    assert cache_dir() == tmp_path / 'c' and cache_dir(tmp_path) == tmp_path
