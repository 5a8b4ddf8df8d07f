"""Shift every global seed by $VQLEARN_SEED_SHIFT, to find asserts that hold for one seed only.

A quick configuration trains a tiny model for a few hundred steps; an assert with a fixed margin on its result can hold
for the seed it was written with and fail for the next, which is also what a new torch release (other kernels, other
rounding) does to it. Run the suite with shifted seeds before trusting a margin:

    VQLEARN_SEED_SHIFT=1 PYTHONPATH=tools/seed_shift VQLEARN_CACHE=$(mktemp -d) nbdev_test --n_workers 2
    VQLEARN_SEED_SHIFT=1 PYTHONPATH=tools/seed_shift python -m pytest -q tests

Python imports `sitecustomize` at start-up, in every process (nbdev_test's workers, subprocesses). Once `torch`, `numpy`
or `random` has been imported, their global seeding functions (`torch.manual_seed`, `numpy.random.seed`,
`random.seed`) add the shift to the seed they are given. Explicit generators (`torch.Generator().manual_seed(s)`,
`numpy.random.default_rng(s)`) are left alone: they mostly fix data, not training. Use a fresh `$VQLEARN_CACHE`, or the
stage cache hands the shifted run artifacts trained with the old seeds (and keeps the shifted ones).
"""
import builtins, os, sys

_SHIFT = int(os.environ.get('VQLEARN_SEED_SHIFT') or 0)


def _patch(root: str):
    "Make the global seeding function of `root` add the shift."
    if root == 'torch':
        import torch, torch.random
        seed = torch.random.manual_seed
        def manual_seed(s): return seed(int(s) + _SHIFT)
        torch.manual_seed = torch.random.manual_seed = manual_seed
    elif root == 'numpy':
        import numpy.random as npr
        seed = npr.seed
        npr.seed = lambda s=None: seed(None if s is None else (int(s) + _SHIFT) % 2**32)
    elif root == 'random':
        import random
        seed = random.seed
        random.seed = lambda a=None, *args, **kw: seed(a + _SHIFT if isinstance(a, int) else a, *args, **kw)


if _SHIFT:
    _import, _done, _depth = builtins.__import__, set(), [0]

    def _shifting_import(name, *args, **kw):
        "Import as usual; after an outermost import, patch the libraries that are now loaded (once each)."
        _depth[0] += 1
        try: module = _import(name, *args, **kw)
        finally: _depth[0] -= 1
        if _depth[0] == 0:  # not inside torch's own __init__, which would overwrite the patch
            for root in ('torch', 'numpy', 'random'):
                if root in sys.modules and root not in _done:
                    _done.add(root)
                    _depth[0] += 1
                    try: _patch(root)
                    finally: _depth[0] -= 1
        return module

    builtins.__import__ = _shifting_import
