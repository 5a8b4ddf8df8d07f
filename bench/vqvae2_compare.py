#!/usr/bin/env python
"""VQ-VAE against VQ-VAE-2 end to end, over several seeds: autoencoder, prior, samples, judge.

For each seed and each model, at the same wall-clock budgets:
1. train the autoencoder (`VQVAE()` or `VQVAE2()`, the CPU recipe of `vqvae_quality.py`) for `--ae-minutes`;
2. measure it on the held-out images (MSE, PSNR, commitment loss, code usage per level);
3. train its class-conditional prior for `--prior-minutes` (lesson 08's Gated PixelCNN over the 8x8 codes, or lesson 09's
   `HierarchicalPrior` over the 4x4 top and 8x8 bottom codes, same width and depth) and measure its held-out NLL in bits
   per image dimension;
4. draw `--per-class` samples per class, and score them with lesson 08b's judge: accuracy (a sample of class c is
   classified as c) and the Fréchet distance of the judge's features of the samples to those of the held-out images.
It prints one table of mean ± std over the seeds.

    python bench/vqvae2_compare.py --data cifar10-horse-bird-train.npz --seeds 0,1,2 --ae-minutes 3 --prior-minutes 2 \
        --models vqvae,vqvae2,vqvae2:num_codes_bottom=2048   # options after a name go to its constructor

The held-out images are a seeded tenth of the .npz (both classes), as in the lessons' docs configuration; the judge is
the docs configuration's (`judge_stage`, cached) unless `--judge` names a checkpoint. Runs from a checkout without
installing vqlearn.
"""
from __future__ import annotations
import argparse, json, math, os, statistics, sys, time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # the checkout, and
# this folder (for vqvae_quality), so it runs without installing vqlearn, also through runpy.run_path
import torch
from vqlearn.core import seed_everything, settings
from vqlearn.data import DeviceLoader, get_dataset, split_dataset
from vqlearn.train import fit
from vqlearn.pixelcnn import GatedPixelCNN
from vqlearn.prior import codes_bits_per_dim, evaluate_nll, fit_prior, sample_images
from vqlearn.vqvae import VQVAE, extract_codes, vqvae_step
from vqlearn.vqvae2 import (VQVAE2, HierarchicalPrior, evaluate_prior2, evaluate_vqvae2, extract_codes2, fit_prior2,
                            sample_images2, vqvae2_step)
from vqlearn.judge import JUDGE_SETTINGS, Judge, judge_outputs, judge_samples, judge_stage
from vqvae_quality import model_spec  # 'vqvae2:num_codes_bottom=2048' -> ('vqvae2', {'num_codes_bottom': 2048})

CPU_RECIPE = dict(batch_size=8, lr=2e-3, warmup=0.03)          # the autoencoders' recipe (as in vqvae_quality.py)
PRIOR_RECIPE = dict(width=32, n_layers=6, batch_size=64, lr=2e-3)  # both priors: small enough to train on a CPU in minutes


def channels_last(batch):
    x, y = batch
    return x.contiguous(memory_format=torch.channels_last), y


def run(args, seed: int, name: str, train, valid, judge, real) -> dict:
    base, kw = model_spec(name)
    seed_everything(seed)
    model = (VQVAE if base == 'vqvae' else VQVAE2)(**kw).to(memory_format=torch.channels_last)
    dl = DeviceLoader(train, batch_size=CPU_RECIPE['batch_size'], shuffle=True, flip=True, drop_last=True, seed=seed)
    h = fit(model, dl, vqvae_step if base == 'vqvae' else vqvae2_step, budget_s=args.ae_minutes * 60, lr=CPU_RECIPE['lr'],
            sched='cosine', warmup=CPU_RECIPE['warmup'], log_every=500, progress=False, batch_tfm=channels_last)
    model = model.to(memory_format=torch.contiguous_format).eval()
    ae = evaluate_vqvae2(model, valid)
    res = dict(model=name, seed=seed, ae_steps=h.n_steps, mse=ae['mse'], psnr=ae['psnr'], commitment=ae['commitment'],
               **{f"usage_{k}": v['usage'] for k, v in ae['levels'].items()})
    n_classes, P = len(train.classes), PRIOR_RECIPE
    seed_everything(seed)
    if base == 'vqvae':
        (ctr, ltr), (cte, lte) = extract_codes(model, train), extract_codes(model, valid)
        prior = GatedPixelCNN(model.num_codes, P['width'], P['n_layers'], n_classes)
        hp = fit_prior(prior, ctr, ltr, steps=None, budget_s=args.prior_minutes * 60, batch_size=P['batch_size'], lr=P['lr'],
                       sched='cosine', log_every=500, progress=False)
        res['bits_per_dim'] = codes_bits_per_dim(evaluate_nll(prior, cte, lte), tuple(cte.shape[1:]), valid.image_shape)
        sample = lambda lab, g: sample_images(prior, model, len(lab), tuple(cte.shape[1:]), labels=lab, generator=g)[1]
    else:
        (mtr, ltr), (mte, lte) = extract_codes2(model, train), extract_codes2(model, valid)
        prior = HierarchicalPrior(model.num_codes['top'], model.num_codes['bottom'], n_classes, P['width'], P['n_layers'])
        hp = fit_prior2(prior, mtr, ltr, steps=None, budget_s=args.prior_minutes * 60, batch_size=P['batch_size'], lr=P['lr'],
                        sched='cosine', log_every=500, progress=False)
        res['bits_per_dim'] = evaluate_prior2(prior, mte, lte, image_shape=valid.image_shape)['bits_per_dim']
        sample = lambda lab, g: sample_images2(prior, model, len(lab), lab, generator=g)[1]
    res['prior_steps'] = hp.n_steps
    lab = torch.arange(n_classes).repeat_interleave(args.per_class)
    t0 = time.time()
    imgs = torch.cat([sample(l, torch.Generator().manual_seed(seed * 1000 + i)) for i, l in enumerate(lab.split(250))])
    res['sample_s'] = time.time() - t0
    j = judge_samples(judge, imgs, lab, real=real)
    res.update(judge_accuracy=j['accuracy'], frechet=j['frechet'])
    with torch.no_grad(): rec = torch.cat([model(x.float().div(255))[0] for x in valid.images.split(250)])
    res['frechet_recon'] = judge_samples(judge, rec, valid.labels, real=real)['frechet']
    print(f"[seed {seed} {name}] " + json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in res.items()}), flush=True)
    return res


COLUMNS = [('mse', 'held-out MSE', '.4f'), ('psnr', 'PSNR (dB)', '.2f'), ('commitment', 'commitment', '.5f'),
           ('usage', 'codes used', '.1%'), ('bits_per_dim', 'prior bits/dim', '.4f'), ('judge_accuracy', 'judge accuracy', '.1%'),
           ('frechet', 'Fréchet (samples)', '.1f'), ('frechet_recon', 'Fréchet (reconstructions)', '.1f'),
           ('ae_steps', 'AE steps', '.0f'), ('prior_steps', 'prior steps', '.0f')]


def table(results: list[dict]) -> str:
    "Mean ± std over seeds, one row per model."
    rows = ['| model | ' + ' | '.join(c[1] for c in COLUMNS) + ' |', '|---' * (len(COLUMNS) + 1) + '|']
    for name in dict.fromkeys(r['model'] for r in results):
        rs = [r for r in results if r['model'] == name]
        cells = []
        for key, _, fmt in COLUMNS:
            keys = [key] if key != 'usage' else sorted(k for k in rs[0] if k.startswith('usage_'))
            parts = []
            for k in keys:
                v = [r[k] for r in rs]
                sd = statistics.stdev(v) if len(v) > 1 else 0.0
                parts.append((f"{k[6:]} " if key == 'usage' else '') + f"{statistics.mean(v):{fmt}} ± {sd:{fmt}}")
            cells.append(', '.join(parts))
        rows.append(f"| {name} | " + ' | '.join(cells) + ' |')
    return '\n'.join(rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default='../shared/data/cifar10-horse-bird-train.npz')
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--models', default='vqvae,vqvae2', help="comma-separated; options as in vqvae2:num_codes_bottom=2048 "
                                                                 "go to the constructor (as in vqvae_quality.py)")
    p.add_argument('--ae-minutes', type=float, default=3.0)
    p.add_argument('--prior-minutes', type=float, default=2.0)
    p.add_argument('--per-class', type=int, default=250, help='samples per class for the judge')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--json', default=None, help='append each run as a JSON line to this file')
    p.add_argument('--judge', default=None, help="a Judge checkpoint (.safetensors); default: lesson 08b's docs judge, "
                                                 "trained on the --data images and cached on first use")
    args = p.parse_args(argv)
    if not Path(args.data).is_file(): sys.exit(f"no such file: {args.data}")
    if args.judge and not Path(args.judge).is_file(): sys.exit(f"no such judge checkpoint: {args.judge}")
    bad = [m for m in args.models.split(',') if model_spec(m)[0] not in ('vqvae', 'vqvae2')]
    if bad: sys.exit(f"unknown models {bad}: choose vqvae or vqvae2, with optional :key=value constructor options")
    torch.set_num_threads(args.threads); torch.set_flush_denormal(True)
    os.environ['VQLEARN_NPZ'] = str(Path(args.data).resolve())             # the judge's images: the same .npz
    classes = ['horse', 'bird']
    train, valid = split_dataset(get_dataset('npz', root=args.data, classes=classes), valid_frac=0.1, seed=0)
    t0 = time.time()
    judge = Judge.from_checkpoint(args.judge or judge_stage(settings(**JUDGE_SETTINGS, mode='docs')))
    if judge.config.get('classes') not in (None, classes):
        sys.exit(f"the judge was trained on the classes {judge.config['classes']}, not on {classes}")
    real = judge_outputs(judge, valid)
    print(f"{len(train)} train / {len(valid)} held-out images; judge ready in {time.time() - t0:.0f}s", flush=True)
    results = []
    for seed in [int(s) for s in args.seeds.split(',')]:
        for name in args.models.split(','):
            results.append(run(args, seed, name, train, valid, judge, real))
            if args.json:
                with open(args.json, 'a') as f: f.write(json.dumps(results[-1]) + '\n')
    print(f"\n{len(results) // len(args.models.split(','))} seeds, autoencoders {args.ae_minutes:g} min, priors "
          f"{args.prior_minutes:g} min, {args.threads} threads, {time.strftime('%Y-%m-%d %H:%M')}")
    print(table(results))
    return results


if __name__ == '__main__':
    main()
