#!/usr/bin/env python
"""Sampling speed of the Gated PixelCNN: naive (one full forward pass per position) vs fast (cached, incremental).

Run from the project folder:

    python bench/sampling_speed.py            # batch 64, 8x8 and 32x32 maps, default model, CPU (+ CUDA if available)
    python bench/sampling_speed.py --quick    # a short run: batch 8, small model, 8x8 and 16x16
    python bench/sampling_speed.py --quick --attention 2   # the same with a causal self-attention block after every 2nd layer

Prints a markdown table of samples per second (medians over --repeats; naive and fast timed in the same run, so the
speed-up column compares like with like). A naive pass costs the same at every position, so when a map has more
positions than --naive-steps the naive loop is stopped after that many passes and its time scaled up to all positions
(column "naive passes timed"). Before timing, the two samplers are checked to give identical codes (on the positions the
naive run reaches) for the same generator seed.
"""
from __future__ import annotations
import argparse, statistics, sys, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
import torch
from vqlearn.pixelcnn import GatedPixelCNN, draw_uniforms, sample_fast, sample_naive


def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)


def time_it(fn, dev):
    sync(dev); t = time.perf_counter(); out = fn(); sync(dev)
    return time.perf_counter() - t, out


def bench_one(model, dev, B, S, repeats, naive_steps, check):
    "Median seconds per batch for (naive extrapolated to all positions, fast), passes timed, and whether codes agree."
    u = draw_uniforms((B, S, S), torch.Generator().manual_seed(0), dev)
    n_pos = S * S
    steps = n_pos if naive_steps is None else min(naive_steps, n_pos)
    sample_fast(model, u[:1, :2, :2])                       # warm-up (allocator, kernels)
    sample_naive(model, u[:1, :2, :2])
    t_fast, t_naive, same = [], [], None
    for r in range(repeats):
        dt, fast_codes = time_it(lambda: sample_fast(model, u), dev)
        t_fast.append(dt)
        dt, naive_codes = time_it(lambda: sample_naive(model, u, max_steps=steps), dev)
        t_naive.append(dt * n_pos / steps)
        if check and r == 0:
            same = torch.equal(fast_codes.flatten(1)[:, :steps], naive_codes.flatten(1)[:, :steps])
    return statistics.median(t_naive), statistics.median(t_fast), steps, same


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--sizes', type=int, nargs='+', default=[8, 32], help='map sizes S (S x S maps)')
    p.add_argument('--batch', type=int, default=64)
    p.add_argument('--codes', type=int, default=512, help='num_codes K')
    p.add_argument('--width', type=int, default=64, help='channels of every gated layer')
    p.add_argument('--layers', type=int, default=15)
    p.add_argument('--repeats', type=int, default=3, help='timed repeats; medians are reported')
    p.add_argument('--naive-steps', type=int, default=64,
                   help='time at most this many naive passes per repeat and scale up (0: all positions)')
    p.add_argument('--devices', nargs='+', default=None, help="devices to run on (default: cpu, and cuda if available)")
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: leave as is)')
    p.add_argument('--attention', type=int, default=0, metavar='K',
                   help='a causal self-attention block after every K-th gated layer (default 0: none)')
    p.add_argument('--heads', type=int, default=4, help='attention heads (with --attention)')
    p.add_argument('--dtype', choices=['float32', 'float64'], default='float32')
    p.add_argument('--no-check', action='store_true', help='skip the fast == naive check')
    p.add_argument('--quick', action='store_true', help='short run: batch 8, width 32, 5 layers, K 64, sizes 8 16, 1 repeat')
    a = p.parse_args(argv)
    if a.quick: a.batch, a.width, a.layers, a.codes, a.sizes, a.repeats = 8, 32, 5, 64, [8, 16], 1
    if a.threads: torch.set_num_threads(a.threads)
    devices = a.devices or (['cpu'] + (['cuda'] if torch.cuda.is_available() else []))
    naive_steps = a.naive_steps or None
    attn = f", attention after every {a.attention} layers ({a.heads} heads)" if a.attention else ""
    print(f"# Gated PixelCNN sampling speed: K={a.codes}, width={a.width}, layers={a.layers}{attn}, batch={a.batch}, "
          f"{a.dtype}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, median of {a.repeats}")
    rows = []
    for d in devices:
        dev = torch.device(d)
        torch.manual_seed(0)
        model = GatedPixelCNN(a.codes, width=a.width, n_layers=a.layers, attn_every=a.attention,
                              attn_heads=a.heads).to(dev, getattr(torch, a.dtype)).eval()
        name = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'
        for S in a.sizes:
            tn, tf, steps, same = bench_one(model, dev, a.batch, S, a.repeats, naive_steps, not a.no_check)
            rows.append((name, f"{S}x{S}", a.batch, a.batch / tn, a.batch / tf, tn / tf, f"{steps}/{S * S}",
                         '-' if same is None else ('yes' if same else 'NO')))
            print(f"  done {name} {S}x{S}: naive {tn:.2f}s, fast {tf:.3f}s per batch", file=sys.stderr, flush=True)
    print("| device | map | batch | naive samples/s | fast samples/s | speed-up | naive passes timed | identical codes |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.3g} | {r[4]:.3g} | {r[5]:.0f}x | {r[6]} | {r[7]} |")
    return rows


if __name__ == '__main__':
    main()
