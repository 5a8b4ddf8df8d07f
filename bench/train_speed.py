#!/usr/bin/env python
"""Training throughput and quality of the default VQ-VAE under `fit`'s speed options, in one run (ratios to the first).

Variants (each trains a fresh `VQVAE()` for `--seconds` of wall time, then reports training images/s, the images/s
of its last half (after compilation and warm-up), and held-out MSE at that equal wall time):

    fp32        fit(amp=False), batch 128                         (the baseline)
    bf16        fit(amp=True): bf16 autocast (CUDA only), batch 128
    bf16-cl-big bf16 + channels_last, batch `--big` (2048), learning rate scaled by sqrt(big / 128)
    compiled    the same + torch.compile of the training step

On a CPU the bf16 rows run in fp32 (autocast is CUDA-only in `fit`). Runs from a checkout without installing vqlearn.

    python bench/train_speed.py --data cifar10-horse-bird-train.npz --seconds 100 [--device cuda] [--variants fp32,compiled]
"""
from __future__ import annotations
import argparse, math, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch
from vqlearn.core import get_device, seed_everything
from vqlearn.data import ArrayDataset, DeviceLoader, get_dataset
from vqlearn.train import fit
from vqlearn.vqvae import VQVAE, evaluate_vqvae, vqvae_step

VARIANTS = {  # name: (fit options, batch size or 'big', learning-rate scaling)
    'fp32': (dict(amp=False), 128),
    'bf16': (dict(amp=True), 128),
    'bf16-cl-big': (dict(amp=True, channels_last=True), 'big'),
    'compiled': (dict(amp=True, channels_last=True, compile=True), 'big'),
}

class Clock:
    "A `fit` batch transform that records when each step starts (to measure the steady state)."
    def __init__(self, device): self.t, self.device = [], device
    def __call__(self, batch):
        if self.device.type == 'cuda': torch.cuda.synchronize(self.device)
        self.t.append(time.perf_counter()); return batch

def run(name: str, train, held, seconds: float, big: int, lr: float, device) -> dict:
    opts, bs = VARIANTS[name]
    bs = big if bs == 'big' else bs
    seed_everything(0)
    model = VQVAE()
    dl = DeviceLoader(train, batch_size=bs, shuffle=True, flip=True, drop_last=True, device=device, seed=0)
    clock = Clock(device)
    hist = fit(model, dl, vqvae_step, budget_s=seconds, lr=lr * math.sqrt(bs / 128), sched='cosine', warmup=0.03,
               log_every=10**9, device=device, progress=False, batch_tfm=clock, **opts)
    t = clock.t
    half = [x for x in t if x >= t[0] + (t[-1] - t[0]) / 2]
    steady = (len(half) - 1) * bs / (half[-1] - half[0]) if len(half) > 2 else float('nan')
    res = evaluate_vqvae(model, held, device=device)
    return dict(variant=name, batch=bs, steps=hist.n_steps, images_s=hist.n_steps * bs / hist.train_s, steady_images_s=steady,
                mse=res['mse'], psnr=res['psnr'])

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--data', default=None, help='an .npz of images (default: 10,000 synthetic shapes)')
    ap.add_argument('--seconds', type=float, default=100)
    ap.add_argument('--big', type=int, default=2048, help='the large batch size')
    ap.add_argument('--lr', type=float, default=1e-3, help='learning rate at batch 128')
    ap.add_argument('--holdout', type=int, default=1000)
    ap.add_argument('--device', default=None)
    ap.add_argument('--threads', type=int, default=None)
    ap.add_argument('--variants', default=','.join(VARIANTS))
    a = ap.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    names = a.variants.split(',')
    bad = [n for n in names if n not in VARIANTS]
    if bad: sys.exit(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    device = get_device(a.device)
    ds = get_dataset('npz', root=a.data) if a.data else get_dataset('shapes', n=10_000, seed=0)
    n = len(ds.images)
    if n <= a.holdout + max(a.big, 128): sys.exit(f"{n} images: too few for a hold-out of {a.holdout} and batches of {a.big}")
    train = ArrayDataset(ds.images[:n - a.holdout], ds.labels[:n - a.holdout])
    held = ArrayDataset(ds.images[n - a.holdout:], ds.labels[n - a.holdout:])
    dev_name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    rows = [run(nm, train, held, a.seconds, a.big, a.lr, device) for nm in names]
    base = rows[0]
    print(f"\n{dev_name}; torch {torch.__version__}; {a.seconds:.0f} s per variant; data {a.data or 'synthetic shapes'}\n")
    print('| variant | batch | steps | images/s | steady images/s | × first | held-out MSE | PSNR dB |\n|---|---|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['variant']} | {r['batch']} | {r['steps']} | {r['images_s']:,.0f} | {r['steady_images_s']:,.0f} | "
              f"{r['steady_images_s'] / base['steady_images_s']:.2f} | {r['mse']:.5f} | {r['psnr']:.2f} |")
    return rows

if __name__ == '__main__': main()
