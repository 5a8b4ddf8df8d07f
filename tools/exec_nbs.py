"""Refresh a notebook's saved outputs from a real run of its quick configuration (what the docs site shows).
Cells flagged slow/cuda or `eval: false` are skipped, as nbdev_test does. Run from the nbs folder, then nbdev_clean:

    cd nbs && VQLEARN_QUICK=1 OMP_NUM_THREADS=1 TQDM_DISABLE=1 python ../tools/exec_nbs.py 04_vae.ipynb 04_vae.ipynb && cd .. && nbdev_clean
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
write_nb(nb, dst)
