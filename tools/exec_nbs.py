"""Refresh a notebook's saved outputs (what the docs site shows) from a real run, normally of its docs configuration.
Cells flagged slow/cuda or `eval: false` are skipped, as nbdev_test does. Run from the nbs folder, then nbdev_clean:

    cd nbs && VQLEARN_MODE=docs VQLEARN_NPZ=/path/to/cifar10-horse-bird-train.npz OMP_NUM_THREADS=2 TQDM_DISABLE=1 \
        python ../tools/exec_nbs.py 04_vae.ipynb 04_vae.ipynb && cd .. && nbdev_clean

Without `VQLEARN_NPZ` the docs configuration downloads CIFAR-10 through torchvision. Progress bars and other stderr
output are dropped from the saved notebook: they belong in the live notebook, not on the page.
"""
import sys
from execnb.shell import CaptureShell
from execnb.nbio import read_nb, write_nb

from gpu_check import flags    # the nbdev flags of a cell (this folder is on sys.path when the script runs)

SKIP = {'slow', 'cuda', 'eval-false'}
def skip(cell): return cell.cell_type == 'code' and bool(flags(cell.source) & SKIP)

src, dst = sys.argv[1], sys.argv[2]
nb = read_nb(src)
sh = CaptureShell(mpl_format='png')
sh.run_all(nb, exc_stop=True, preproc=skip)
for cell in nb.cells:   # no stderr dumps on the page
    if cell.cell_type == 'code': cell.outputs = [o for o in cell.get('outputs', []) if o.get('name') != 'stderr']
write_nb(nb, dst)
