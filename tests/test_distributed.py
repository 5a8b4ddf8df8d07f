"""`fit` under `torchrun` (gloo, 2 CPU processes) trains exactly what one process trains on the whole batch, keeps the
codebooks identical in every process after every step, and resumes from process 0's checkpoint."""
import os, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = textwrap.dedent('''
    import sys, torch
    from vqlearn.core import init_distributed, seed_everything
    from vqlearn.data import DeviceLoader
    from vqlearn.train import fit
    from vqlearn.vqvae import VQVAE, vqvae_step
    out, steps, ckpt, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] or None, sys.argv[4] == '1'
    torch.set_num_threads(1)
    rank, world = init_distributed()
    seed_everything(0)
    # float64: in float32, sums over a batch split in two round differently from sums over the whole batch, and after a
    # few steps a latent almost equidistant from two codes can pick the other one; float64 keeps that out of the test
    m = VQVAE(hidden=16, res_hidden=8, num_codes=64, dim=8, quantizer='ema_restart', restart_after=2).double()
    q, restarted, books = m.quantizer, [], []
    set_codes = q._set_codes
    def counting(mask, new): restarted.append(int(mask.sum())); return set_codes(mask, new)
    q._set_codes = counting                                   # count k-means inits and restarts
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if rank == 1: torch.rand(7)          # process 1's random stream differs: process 0's k-means and restart draws decide
    dl = DeviceLoader((x,), batch_size=16, shuffle=True, flip=True, seed=0, device='cpu')
    def step(model, batch):
        out = vqvae_step(model, batch)
        books.append(torch.cat([q.embedding, q.cluster_size[:, None], q.embed_sum], 1).clone())   # after this step's update
        return out
    h = fit(m, dl, step, steps=steps, lr=3e-3, log_every=1, device='cpu', progress=False, ckpt=ckpt, resume=resume)
    assert dl.world_size == world and DeviceLoader((x,), batch_size=16).world_size == 1   # fit sharded its loader only
    torch.save(dict(state=m.state_dict(), books=books, loss=h['loss'], restarted=restarted, world=world), f"{out}.{rank}.pt")
''')

def run(tmp_path, name, steps, ckpt='', resume=False, procs=1):
    script = tmp_path / 'train.py'; script.write_text(SCRIPT)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]), 'OMP_NUM_THREADS': '1',
           'VQLEARN_DEVICE': 'cpu'}
    args = [str(script), str(tmp_path / name), str(steps), str(ckpt), '1' if resume else '0']
    cmd = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={procs}', *args] if procs > 1
           else [sys.executable, *args])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return [torch.load(tmp_path / f'{name}.{k}.pt') for k in range(procs)]

@pytest.mark.skipif(not torch.distributed.is_available(), reason='this torch has no torch.distributed')
def test_torchrun_matches_one_process_and_resumes(tmp_path):
    (one,) = run(tmp_path, 'one', 6)
    assert one['world'] == 1 and sum(one['restarted'][1:]) > 0          # k-means init, then dead codes were re-seeded
    ckpt = tmp_path / 'ddp.ckpt'
    first = run(tmp_path, 'a', 3, ckpt, procs=2)                        # 3 steps, checkpoint by process 0 ...
    assert ckpt.is_file() and all(r['world'] == 2 for r in first)
    second = run(tmp_path, 'b', 6, ckpt, resume=True, procs=2)          # ... resumed to 6 steps
    for a_run in (first, second):                                       # identical codebooks in both processes, every step
        assert len(a_run[0]['books']) == len(a_run[1]['books']) > 0
        for b0, b1 in zip(a_run[0]['books'], a_run[1]['books']): torch.testing.assert_close(b0, b1, rtol=0, atol=0)
    books = first[0]['books'] + second[0]['books']                      # the group's codebooks = one process's, step by step
    assert len(books) == len(one['books']) == 6
    for b2, b1 in zip(books, one['books']): torch.testing.assert_close(b2, b1, rtol=1e-5, atol=1e-5)
    for k, v in one['state'].items():                                   # and the same weights at the end
        for r in second: torch.testing.assert_close(r['state'][k].float(), v.float(), rtol=1e-5, atol=1e-5, msg=k)
    assert second[0]['loss'] == pytest.approx(one['loss'], rel=1e-4)    # logged losses: group means = one process's

@pytest.mark.skipif(not torch.distributed.is_available(), reason='this torch has no torch.distributed')
def test_vqlearn_train_under_torchrun(tmp_path):
    "`torchrun -m vqlearn.cli train vqvae` and `train prior`: two processes train one model; process 0 alone writes and reports it."
    import numpy as np
    from vqlearn.vqvae import VQVAE
    g = np.random.default_rng(0)
    classes = np.array(['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck'])
    np.savez(tmp_path / 'hb.npz', images=g.integers(0, 256, (80, 32, 32, 3), dtype=np.uint8), labels=np.array([2, 7] * 40),
             classes=classes)
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]), 'OMP_NUM_THREADS': '1'}
    out = tmp_path / 'vq.safetensors'
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'vqlearn.cli',
                        'train', 'vqvae', '--data', str(tmp_path / 'hb.npz'), '--out', str(out), '--steps', '3', '--device', 'cpu',
                        '--threads', '1'], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count('wrote ') == 1 and 'after 3 steps' in r.stdout
    assert VQVAE.from_checkpoint(out).num_codes == 512
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', '-m', 'vqlearn.cli',
                        'train', 'prior', '--data', str(tmp_path / 'hb.npz'), '--vqvae', str(out), '--out', str(tmp_path / 'p.safetensors'),
                        '--steps', '2', '--device', 'cpu', '--threads', '1'], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]                        # the prior's step goes through DDP's forward
    assert r.stdout.count('wrote ') == 1 and 'held-out NLL' in r.stdout
