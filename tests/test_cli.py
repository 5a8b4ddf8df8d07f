"Tests of the `vqlearn` command: help text, a tiny run on a bundle made here, error exits, the shipped weights."
import json, subprocess, sys
from pathlib import Path
import numpy as np
import pytest, torch
from vqlearn.cli import main, make_parser, write_bundle, load_bundle, WEIGHTS_DIR, BUNDLE_FILES
from vqlearn.vqvae import VQVAE
from vqlearn.pixelcnn import GatedPixelCNN
from vqlearn.judge import Judge


def run(*argv):
    return subprocess.run([sys.executable, '-c', 'from vqlearn.cli import entry; entry()', *argv], capture_output=True, text=True)


@pytest.fixture(scope='module')
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp('bundle')
    judge = Judge(2, widths=(4, 8, 8))
    write_bundle(folder, VQVAE(hidden=16, res_hidden=8, n_res=1, num_codes=16, dim=8), GatedPixelCNN(16, 8, 1, n_classes=3),
                 judge, torch.randn(30, judge.head.in_features), 1e9, note='test')
    return folder


def test_help_lists_the_commands():
    r = run('-h')
    assert r.returncode == 0 and all(w in r.stdout for w in ('pegasus', 'sample', 'train'))
    r = run('pegasus', '-h')
    assert r.returncode == 0 and all(w in r.stdout for w in ('--npz', '--method', '--seed', '--device'))
    assert 'vqvae2' in run('train', '-h').stdout


def test_tiny_run_writes_png_and_npz(bundle, tmp_path):
    r = run('pegasus', '-n', '5', '--seed', '3', '-o', str(tmp_path / 'p.png'), '--npz', str(tmp_path / 'p.npz'),
            '--weights', str(bundle), '--method', 'soft')
    assert r.returncode == 0, r.stderr
    d = np.load(tmp_path / 'p.npz')
    assert d['images'].shape == (5, 32, 32, 3) and d['images'].dtype == np.uint8
    assert set(d.files) >= {'images', 'labels', 'p_horse', 'p_bird', 'balance', 'distance', 'passed'}
    assert (tmp_path / 'p.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert main(['sample', '--class', 'horse', '-n', '2', '-o', str(tmp_path / 's.png'), '--weights', str(bundle)]) == 0


@pytest.mark.parametrize('argv', [['pegasus', '-n', '-1'], ['sample', '--class', 'zebra'], ['pegasus', '--pool', '0'],
                                  ['pegasus', '-o', '/nonexistent/x.png'], ['pegasus', '-o', 'x.jpg'],
                                  ['pegasus', '--temperature', '-1'], ['train', 'vqvae', '--data', 'nope.npz', '--out', 'm.safetensors']])
def test_bad_input_is_one_line_and_status_2(argv, bundle, tmp_path):
    r = subprocess.run([sys.executable, '-c', 'from vqlearn.cli import entry; entry()', *argv, *(['--weights', str(bundle)] if argv[0] != 'train' else [])],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and 'Traceback' not in r.stderr, r.stderr


def test_missing_or_damaged_weights(bundle, tmp_path):
    r = run('pegasus', '-o', str(tmp_path / 'p.png'), '--weights', str(tmp_path / 'none'))
    assert r.returncode == 2 and 'vqlearn train all' in r.stderr
    import shutil
    bad = tmp_path / 'bad'; shutil.copytree(bundle, bad)
    p = bad / BUNDLE_FILES['judge']; p.write_bytes(p.read_bytes()[:-2] + b'\0\0')
    r = run('pegasus', '-o', str(tmp_path / 'p.png'), '--weights', str(bad))
    assert r.returncode == 2 and 'SHA-256' in r.stderr


@pytest.mark.skipif(not (WEIGHTS_DIR / 'manifest.json').is_file(), reason='no shipped weights in this checkout')
def test_shipped_weights_are_small_complete_and_documented():
    man = json.loads((WEIGHTS_DIR / 'manifest.json').read_text())
    total = sum(f.stat().st_size for f in WEIGHTS_DIR.iterdir())
    assert total <= 8 * 2 ** 20
    assert set(man['files']) == set(BUNDLE_FILES.values())
    assert {'metrics', 'data', 'recipe', 'config'} <= set(man) and man['metrics']['judge_accuracy'] > 0.8
    b = load_bundle()
    assert b.prior.n_classes == 3 and b.vqvae.num_codes == man['config']['vqvae']['num_codes']


def test_train_vqvae_then_prior_tiny(tmp_path):
    "vqlearn train vqvae / prior on a tiny .npz of horses and birds: checkpoints that reload, and a mixed third class."
    g = np.random.default_rng(0)
    classes = np.array(['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'])
    np.savez(tmp_path / 'hb.npz', images=g.integers(0, 256, (80, 32, 32, 3), dtype=np.uint8),
             labels=np.array([2, 7] * 40), classes=classes)
    r = run('train', 'vqvae', '--data', str(tmp_path / 'hb.npz'), '--out', str(tmp_path / 'vq.safetensors'), '--steps', '3',
            '--device', 'cpu', '--threads', '1')
    assert r.returncode == 0, r.stderr[-2000:]
    assert VQVAE.from_checkpoint(tmp_path / 'vq.safetensors').num_codes == 512
    r = run('train', 'prior', '--data', str(tmp_path / 'hb.npz'), '--vqvae', str(tmp_path / 'vq.safetensors'),
            '--out', str(tmp_path / 'p.safetensors'), '--steps', '2', '--device', 'cpu', '--threads', '1')
    assert r.returncode == 0, r.stderr[-2000:]
    assert GatedPixelCNN.from_checkpoint(tmp_path / 'p.safetensors').n_classes == 3 and 'held-out NLL' in r.stdout
