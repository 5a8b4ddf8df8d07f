#!/usr/bin/env python
"""VQ-VAE reconstruction quality after a fixed CPU (or GPU) time budget.

Trains vqlearn's default `VQVAE` (32x32 -> 8x8 codes, K=512) on an .npz of images (e.g. the CIFAR-10 horses and birds
in ../shared/data), holding out the last `--holdout` images (deterministic), for `--minutes` of wall-clock time with
`--threads` torch threads, and prints a table: held-out MSE (pixels in [0, 1]), PSNR, code perplexity, code usage
(fraction of the K codes used over the whole held-out set), steps done and training images/s.

    python bench/vqvae_quality.py --data ../shared/data/cifar10-horse-bird-train.npz --minutes 10 --threads 2 \
        --quantizer plain|ema|ema_restart        # or a comma-separated list, run one after the other

Note: the shared .npz is ordered by class (5,000 birds, then 5,000 horses), so the default held-out part is 1,000
horses; horses are the harder class to reconstruct (more texture), so this is the conservative choice.

The learning-rate schedule (linear warm-up, then cosine to zero) runs on elapsed time, so each run ends at the bottom of
its schedule whatever throughput the (shared) machine gives it.
"""
from __future__ import annotations
import argparse, json, math, os, sys, time
from pathlib import Path

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default='../shared/data/cifar10-horse-bird-train.npz', help='.npz with images (N,H,W,C) uint8 and labels')
    p.add_argument('--minutes', type=float, default=10.0, help='training time budget (wall clock)')
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
    p.add_argument('--quantizer', default='ema_restart', help="plain, ema, ema_restart, or a comma-separated list")
    p.add_argument('--holdout', type=int, default=1000, help='the last N images are held out for evaluation')
    p.add_argument('--batch-size', type=int, default=None, help='default: the recipe of vqlearn.vqvae.CPU_RECIPE')
    p.add_argument('--lr', type=float, default=None, help='default: the recipe of vqlearn.vqvae.CPU_RECIPE')
    p.add_argument('--warmup', type=float, default=None, help='warm-up as a fraction of the budget')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cpu')
    p.add_argument('--save-codes', default=None, help='save the code maps (train + held-out) to this .safetensors prefix')
    p.add_argument('--ckpt', default=None, help='save the trained model (safetensors) to this path (a {q} in it is replaced)')
    p.add_argument('--json', default=None, help='append the results as JSON lines to this file')
    p.add_argument('--log-every', type=float, default=60.0, help='seconds between progress lines')
    return p.parse_args(argv)


def run(args, quantizer: str) -> dict:
    from vqlearn.core import seed_everything
    from vqlearn.data import get_dataset, DeviceLoader
    from vqlearn.vqvae import VQVAE, vqvae_step, evaluate_vqvae, CPU_RECIPE, lr_schedule
    seed_everything(args.seed)
    ds = get_dataset('npz', root=args.data)
    n = len(ds)
    if not 0 < args.holdout < n: raise ValueError(f"--holdout must be in (0, {n}); got {args.holdout}")
    train, valid = ds.subset(torch.arange(n - args.holdout)), ds.subset(torch.arange(n - args.holdout, n))
    bs = args.batch_size or CPU_RECIPE['batch_size']
    lr = args.lr or CPU_RECIPE['lr']
    warm = CPU_RECIPE['warmup'] if args.warmup is None else args.warmup
    device = torch.device(args.device)
    model = VQVAE(quantizer=quantizer).to(device)
    if device.type == 'cpu': model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    dl = DeviceLoader(train, batch_size=bs, shuffle=True, flip=True, drop_last=True, device=device, seed=args.seed)
    budget = args.minutes * 60
    print(f"[{quantizer}] {len(train)} train / {len(valid)} held-out images, batch {bs}, lr {lr}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {torch.get_num_threads()} threads, "
          f"{budget:.0f}s budget", flush=True)
    model.train()
    step, epoch, t0, next_log = 0, 0, time.perf_counter(), args.log_every
    done = False
    while not done:
        for x, y in dl.iter_epoch(epoch):
            el = time.perf_counter() - t0
            if el >= budget: done = True; break
            for g in opt.param_groups: g['lr'] = lr * lr_schedule(el / budget, warm)
            if device.type == 'cpu': x = x.contiguous(memory_format=torch.channels_last)
            out = vqvae_step(model, (x, y))
            opt.zero_grad(set_to_none=True); out['loss'].backward(); opt.step(); step += 1
            if el >= next_log:
                next_log += args.log_every
                print(f"[{quantizer}] {el:6.0f}s step {step:6d} " +
                      ' '.join(f"{k} {float(v):.4g}" for k, v in out.items() if k != 'loss'), flush=True)
        epoch += 1
    train_s = time.perf_counter() - t0
    res = evaluate_vqvae(model, valid, batch_size=250)
    res.update(quantizer=quantizer, steps=step, images_per_s=step * bs / train_s, train_s=train_s, batch_size=bs, lr=lr,
               epochs=step * bs / len(train), threads=torch.get_num_threads(), minutes=args.minutes)
    print(f"[{quantizer}] done: " + json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in res.items()}), flush=True)
    if args.ckpt:
        from vqlearn.train import save_checkpoint
        save_checkpoint(args.ckpt.replace('{q}', quantizer), model, config=model.config, result=res)
    if args.save_codes:
        from vqlearn.vqvae import extract_codes, save_codes
        for part, d in (('train', train), ('test', valid)):
            c, l = extract_codes(model, d)
            p = save_codes(f"{args.save_codes}_{quantizer}_{part}.safetensors", c, l, num_codes=model.num_codes,
                           code_shape=list(c.shape[1:]), classes=ds.classes, model=model.config, result=res)
            print(f"[{quantizer}] saved {tuple(c.shape)} codes to {p}", flush=True)
    if args.json:
        with open(args.json, 'a') as f: f.write(json.dumps(res) + '\n')
    return res


def table(results: list[dict]) -> str:
    rows = ["| quantizer | held-out MSE | PSNR (dB) | perplexity | codes used | steps | images/s |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['quantizer']} | {r['mse']:.4f} | {r['psnr']:.2f} | {r['perplexity']:.0f} | "
                    f"{r['usage']:.1%} | {r['steps']} | {r['images_per_s']:.0f} |")
    return '\n'.join(rows)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal floats can slow CPU training many times over
    if not Path(args.data).is_file(): sys.exit(f"no such file: {args.data}")
    qs = [q.strip() for q in args.quantizer.split(',') if q.strip()]
    results = [run(args, q) for q in qs]
    print(f"\n{args.minutes:g} min per run, {args.threads} threads, device {args.device}, {time.strftime('%Y-%m-%d %H:%M')}")
    print(table(results))
    return results


if __name__ == '__main__':
    main()
