"""Refresh a notebook's saved outputs from a real run of its quick configuration (what the docs site shows).
Cells flagged slow/cuda or `eval: false` are skipped, as nbdev_test does. Run from the nbs folder, then nbdev_clean:

    cd nbs && VQLEARN_QUICK=1 OMP_NUM_THREADS=1 TQDM_DISABLE=1 python ../tools/exec_nbs.py 04_vae.ipynb 04_vae.ipynb && cd .. && nbdev_clean
"""
import sys, re
from execnb.shell import CaptureShell
from execnb.nbio import read_nb, write_nb

SKIP = {'slow', 'cuda'}
def skip(cell):
    if cell.cell_type != 'code': return False
    for line in cell.source.splitlines():
        m = re.match(r'^#\|\s*(.*)$', line.strip())
        if not m:
            if line.strip(): break
            continue
        words = m.group(1).replace(':', ' ').split()
        if words and words[0] in SKIP: return True
        if words[:2] == ['eval', 'false']: return True
    return False

src, dst = sys.argv[1], sys.argv[2]
nb = read_nb(src)
sh = CaptureShell(mpl_format='png')
sh.run_all(nb, exc_stop=True, preproc=skip)
write_nb(nb, dst)
