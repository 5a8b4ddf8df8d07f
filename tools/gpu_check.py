"""Run every lesson (quick configuration, as `nbdev_test` does) and the test suite on this machine, and print a table.

Meant for a GPU machine, from a bare copy of the repository with a preinstalled torch: the package is imported from
the checkout (no `pip install` needed). Cells flagged `slow` are skipped; cells flagged `cuda` run when CUDA is there.

    python tools/gpu_check.py [--nbs 06_vqvae 08_prior] [--no-tests] [--timeout 600]
"""
import argparse, os, re, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

def flags(source: str) -> set:
    "The nbdev flags of a cell (`#| slow`, `#| cuda`, `#| eval: false` -> 'eval-false')."
    out = set()
    for line in source.splitlines():
        m = re.match(r'^#\|\s*(.*)$', line.strip())
        if not m:
            if line.strip(): break
            continue
        words = m.group(1).replace(':', ' ').split()
        if words[:2] == ['eval', 'false']: out.add('eval-false')
        elif words: out.add(words[0])
    return out

def run_notebook(path: Path, skip: set) -> tuple[bool, str]:
    "Execute one notebook in a fresh shell from the nbs folder; (passed, message)."
    from execnb.shell import CaptureShell
    from execnb.nbio import read_nb
    nb = read_nb(path)
    sh = CaptureShell()
    cwd = os.getcwd(); os.chdir(path.parent)
    try:
        sh.run_all(nb, exc_stop=True, preproc=lambda c: c.cell_type == 'code' and bool(flags(c.source) & skip))
        return True, ''
    except Exception as e:
        return False, f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:200]
    finally: os.chdir(cwd)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--nbs', nargs='*', help='notebook names (default: all in nbs/)')
    ap.add_argument('--no-tests', action='store_true', help='skip the pytest suite')
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT)); os.environ['PYTHONPATH'] = os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')])
    os.environ.setdefault('IN_TEST', '1')                              # the quick configuration, as under nbdev_test
    import torch
    cuda = torch.cuda.is_available()
    missing = [m for m in ('execnb', 'nbdev') if __import__('importlib.util').util.find_spec(m) is None]
    if missing: sys.exit(f"gpu_check needs {', '.join(missing)} to run notebooks: pip install 'nbdev>=2.3,<3' 'execnb<0.2' "
                         f"'fastcore>=1.12.3,<2' (or from wheels, with --no-index --find-links DIR)")
    device = torch.cuda.get_device_name(0) if cuda else 'CPU (no CUDA)'
    skip = {'slow', 'eval-false'} | (set() if cuda else {'cuda'})
    names = args.nbs or sorted(p.stem for p in (ROOT / 'nbs').glob('[0-9]*.ipynb'))
    rows = []
    for name in names:
        path = ROOT / 'nbs' / (name if name.endswith('.ipynb') else name + '.ipynb')
        if not path.is_file(): sys.exit(f"no notebook {path}")
        t = time.time(); ok, msg = run_notebook(path, skip)
        rows.append((path.stem, ok, time.time() - t, msg)); print(f"{path.stem}: {'pass' if ok else 'FAIL'} ({rows[-1][2]:.0f}s) {msg}", flush=True)
    if not args.no_tests:
        t = time.time()
        r = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', str(ROOT / 'tests')], cwd=ROOT, capture_output=True, text=True)
        last = (r.stdout.strip().splitlines() or [''])[-1]
        rows.append(('tests/ (pytest)', r.returncode == 0, time.time() - t, last))
    print(f"\n{device}; torch {torch.__version__}; skipped flags: {sorted(skip)}\n")
    print('| lesson | result | seconds | message |\n|---|---|---|---|')
    for name, ok, s, msg in rows: print(f"| {name} | {'pass' if ok else '**FAIL**'} | {s:.0f} | {msg.replace('|', '/')} |")
    sys.exit(0 if all(r[1] for r in rows) else 1)

if __name__ == '__main__': main()
