#!/usr/bin/env python
"""VQ-VAE and VQ-VAE-2 reconstruction quality after a fixed CPU (or GPU) time budget.

Trains vqlearn's standard-size `VQVAE()` (32x32 -> 8x8 codes, K=512, D=64, 64 channels) or `VQVAE2()` (the same bottom
level plus a 4x4 top level with its own 512 codes) on an .npz of images (e.g. the 10,000 CIFAR-10 horses and birds),
holding out the last `--holdout` images (deterministic), for `--minutes` of wall-clock time with `--threads` torch
threads, and prints a table: held-out MSE (pixels in [0, 1]), PSNR, commitment loss, and per level the code usage
(fraction of the K codes used over the whole held-out set) and perplexity, steps done and training images/s.

    python bench/vqvae_quality.py --data cifar10-horse-bird-train.npz --minutes 10 --threads 2 \
        --model vqvae|vqvae2 \                   # or vqvae,vqvae2: both, one after the other, same budget;
                                                 # options as in vqvae2:num_codes_bottom=2048 go to the constructor
        --quantizer plain|ema|ema_restart        # or a comma-separated list, run one after the other

It is data + `vqlearn.train.fit` + `vqlearn.vqvae2.evaluate_vqvae2`, nothing else: `fit(budget_s=...)` stops at the time
budget and drives the learning-rate schedule (linear warm-up, then cosine to zero) by the elapsed fraction of it, so
each run ends at the bottom of its schedule whatever throughput the (shared) machine gives it. On the CPU the batches
are put in channels-last memory order (`fit(batch_tfm=...)`), which is faster for these convolutions.

Runs from a checkout without installing vqlearn (the checkout's root goes on sys.path).

Note: the CIFAR-10 horse-and-bird .npz is ordered by class (5,000 birds, then 5,000 horses), so the default held-out
part is 1,000 horses; horses are the harder class to reconstruct (more texture), so this is the conservative choice.
"""
from __future__ import annotations
import argparse, json, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import torch
from vqlearn.core import seed_everything
from vqlearn.data import DeviceLoader, get_dataset, save_codes
from vqlearn.train import fit, save_checkpoint
from vqlearn.vqvae import VQVAE, extract_codes, vqvae_step
from vqlearn.vqvae2 import VQVAE2, evaluate_vqvae2, extract_codes2, vqvae2_step

CPU_RECIPE = dict(batch_size=8, lr=2e-3, warmup=0.03)  # the 10-minute CPU recipe: Adam, batch 8, 3 % warm-up, cosine

# --model: name -> (build(quantizer) -> model, step function for fit, extract(model, data) -> (maps, labels)). Both are
# measured by `evaluate_vqvae2` (held-out MSE, PSNR, commitment, per-level usage and perplexity; a VQVAE has one level).
MODELS = {
    'vqvae': (lambda quantizer, **kw: VQVAE(quantizer=quantizer, **kw), vqvae_step,
              lambda m, d: (lambda c, l: ({'codes': c}, l))(*extract_codes(m, d))),
    'vqvae2': (lambda quantizer, **kw: VQVAE2(quantizer=quantizer, **kw), vqvae2_step, extract_codes2),
}


def evaluate(model, data) -> dict:
    "Held-out MSE, PSNR, commitment and per-level usage/perplexity; plus flat usage/perplexity (the lowest level's)."
    res = evaluate_vqvae2(model, data, batch_size=250)
    low = res['levels']['bottom' if 'bottom' in res['levels'] else 'codes']
    return dict(res, usage=low['usage'], perplexity=low['perplexity'])


def model_spec(name: str) -> tuple[str, dict]:
    "'vqvae2' -> ('vqvae2', {}); 'vqvae2:num_codes_bottom=2048:hidden=96' -> ('vqvae2', {'num_codes_bottom': 2048, 'hidden': 96})."
    base, *opts = name.split(':')
    kw = {}
    for o in opts:
        k, sep, v = o.partition('=')
        if not sep: raise SystemExit(f"model option {o!r} in {name!r} is not key=value")
        kw[k] = json.loads(v) if v[:1] in '-0123456789[{tf' else v
    return base, kw


def _names(arg: str, known) -> list[str]:
    "The comma-separated names in `arg`, checked against `known` (model names may carry ':key=value' options)."
    names = [q.strip() for q in arg.split(',') if q.strip()]
    bad = [n for n in names if known is not None and model_spec(n)[0] not in known]
    if bad or not names: raise SystemExit(f"unknown or missing names {bad or arg!r}; choose from {sorted(known)}")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', default='../shared/data/cifar10-horse-bird-train.npz', help='.npz with images (N,H,W,C) uint8 and labels')
    p.add_argument('--model', default='vqvae', help=f"{' or '.join(sorted(MODELS))}, or a comma-separated list")
    p.add_argument('--minutes', type=float, default=10.0, help='training time budget (wall clock)')
    p.add_argument('--threads', type=int, default=2, help='torch.set_num_threads')
    p.add_argument('--quantizer', default='ema_restart', help="plain, ema, ema_restart, or a comma-separated list")
    p.add_argument('--holdout', type=int, default=1000, help='the last N images are held out for evaluation')
    p.add_argument('--batch-size', type=int, default=None, help=f"default: {CPU_RECIPE['batch_size']} (CPU_RECIPE)")
    p.add_argument('--lr', type=float, default=None, help=f"default: {CPU_RECIPE['lr']} (CPU_RECIPE)")
    p.add_argument('--warmup', type=float, default=None, help=f"warm-up as a fraction of the budget; default {CPU_RECIPE['warmup']}")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='cpu')
    p.add_argument('--save-codes', default=None, help='save the code maps (train + held-out) to this .safetensors prefix')
    p.add_argument('--ckpt', default=None, help='save the trained model to this path ({model} and {q} are replaced by the '
                                                'model and quantizer names); VQVAE.from_checkpoint or VQVAE2.from_checkpoint '
                                                'reloads it')
    p.add_argument('--json', default=None, help='append the results as JSON lines to this file')
    p.add_argument('--log-every', type=int, default=500, help='steps between logged training records')
    return p.parse_args(argv)


def channels_last(batch):
    "fit's batch transform on the CPU: images (B, C, H, W) in channels-last memory order."
    x, y = batch
    return x.contiguous(memory_format=torch.channels_last), y


def run(args, model_name: str, quantizer: str) -> dict:
    base, kw = model_spec(model_name)
    build, step_fn, extract = MODELS[base]
    seed_everything(args.seed)
    ds = get_dataset('npz', root=args.data)
    n = len(ds)
    if not 0 < args.holdout < n: raise ValueError(f"--holdout must be in (0, {n}); got {args.holdout}")
    train, valid = ds.subset(torch.arange(n - args.holdout)), ds.subset(torch.arange(n - args.holdout, n))
    bs = args.batch_size or CPU_RECIPE['batch_size']
    lr = args.lr or CPU_RECIPE['lr']
    warmup = CPU_RECIPE['warmup'] if args.warmup is None else args.warmup
    device = torch.device(args.device)
    model = build(quantizer, **kw).to(device)
    cpu = device.type == 'cpu'
    if cpu: model = model.to(memory_format=torch.channels_last)
    dl = DeviceLoader(train, batch_size=bs, shuffle=True, flip=True, drop_last=True, device=device, seed=args.seed)
    budget = args.minutes * 60
    tag = f"{model_name}/{quantizer}"
    print(f"[{tag}] {len(train)} train / {len(valid)} held-out images, batch {bs}, lr {lr}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters, {torch.get_num_threads()} threads, "
          f"{budget:.0f}s budget", flush=True)
    hist = fit(model, dl, step_fn, budget_s=budget, lr=lr, sched='cosine', warmup=float(warmup), log_every=args.log_every,
               device=device, progress=sys.stderr.isatty(), batch_tfm=channels_last if cpu else None)
    last = {k: round(hist.last(k), 5) for k in ('mse', 'usage', 'top_usage', 'bottom_usage') if hist[k]}
    print(f"[{tag}] trained {hist.n_steps} steps in {hist.train_s:.0f}s; last logged training values {last}", flush=True)
    res = evaluate(model, valid)
    res.update(model=model_name, quantizer=quantizer, steps=hist.n_steps, images_per_s=hist.n_steps * bs / max(hist.train_s, 1e-9),
               train_s=hist.train_s, batch_size=bs, lr=lr, warmup=warmup, epochs=hist.n_steps * bs / len(train),
               threads=torch.get_num_threads(), minutes=args.minutes)
    print(f"[{tag}] done: " + json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in res.items()}), flush=True)
    if args.ckpt:
        p = save_checkpoint(args.ckpt.replace('{model}', model_name).replace('{q}', quantizer),
                            model.to(memory_format=torch.contiguous_format), result=res, history=hist)
        print(f"[{tag}] saved the model to {p}", flush=True)
    if args.save_codes:
        num_codes = model.num_codes if isinstance(model.num_codes, dict) else {'codes': model.num_codes}
        for part, d in (('train', train), ('test', valid)):
            maps, l = extract(model, d)
            p = save_codes(f"{args.save_codes}_{model_name}_{quantizer}_{part}.safetensors", maps, l, num_codes, split=part,
                           code_shapes={k: list(v.shape[1:]) for k, v in maps.items()}, classes=ds.classes,
                           model=model.config, result=res)
            print(f"[{tag}] saved codes {{{', '.join(f'{k}: {tuple(v.shape)}' for k, v in maps.items())}}} to {p}", flush=True)
    if args.json:
        with open(args.json, 'a') as f: f.write(json.dumps(res) + '\n')
    return res


def table(results: list[dict]) -> str:
    "A markdown table of the runs (quantizer first, then held-out MSE: the layout earlier versions printed)."
    rows = ["| quantizer | held-out MSE | PSNR (dB) | commitment | codes used | perplexity | steps | images/s | model |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lv = r['levels']
        rows.append(f"| {r['quantizer']} | {r['mse']:.4f} | {r['psnr']:.2f} | {r['commitment']:.5f} | "
                    + ', '.join(f"{k} {v['usage']:.1%}" for k, v in lv.items()) + " | "
                    + ', '.join(f"{k} {v['perplexity']:.0f}" for k, v in lv.items())
                    + f" | {r['steps']} | {r['images_per_s']:.0f} | {r['model']} |")
    return '\n'.join(rows)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal floats can slow CPU training many times over
    if not Path(args.data).is_file(): sys.exit(f"no such file: {args.data}")
    models, qs = _names(args.model, MODELS), _names(args.quantizer, None)
    if args.ckpt and ((len(models) > 1 and '{model}' not in args.ckpt) or (len(qs) > 1 and '{q}' not in args.ckpt)):
        sys.exit(f"--ckpt {args.ckpt}: with several models or quantizers, put {{model}} and {{q}} in the path")
    results = [run(args, m, q) for m in models for q in qs]
    print(f"\n{', '.join(models)}, {args.minutes:g} min per run, {args.threads} threads, device {args.device}, "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    print(table(results))
    for q in qs:
        runs = [r for r in results if r['quantizer'] == q]
        if len(runs) > 1:
            print(f"[{q}] held-out MSE / {runs[0]['model']}'s: " + ', '.join(f"{r['model']} {r['mse'] / runs[0]['mse']:.3f}" for r in runs[1:]))
    return results


if __name__ == '__main__':
    main()
