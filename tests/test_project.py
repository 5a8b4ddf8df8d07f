"The package as a whole: it imports, exposes its public names, and matches its notebooks."
import configparser, importlib, os, re, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]

def test_version_matches_settings():
    import vqlearn
    cfg = configparser.ConfigParser(); cfg.read(ROOT / 'settings.ini')
    assert vqlearn.__version__ == cfg['DEFAULT']['version']

@pytest.mark.parametrize('mod,names', [
    ('vqlearn.core', ['get_device', 'seed_everything', 'quick', 'pick', 'show_images', 'run_mode', 'settings', 'Settings',
                      'eval_mode', 'model_device', 'atomic_write', 'save_tensors', 'load_tensors', 'load_model_state',
                      'Checkpointable', 'cached', 'cache_dir']),
    ('vqlearn.data', ['get_dataset', 'ArrayDataset', 'DeviceLoader', 'epoch_generator', 'get_loader', 'split_dataset', 'make_shapes',
                      'load_npz', 'load_folder', 'KaoKore', 'download_kaokore', 'DATASETS']),
    ('vqlearn.train', ['fit', 'History', 'save_checkpoint', 'load_checkpoint', 'lr_multiplier']),
])
def test_public_names(mod, names):
    m = importlib.import_module(mod)
    missing = [n for n in names if not hasattr(m, n)]
    assert not missing, f"{mod} lacks {missing}"
    assert set(names) <= set(m.__all__)

def _copy_project(tmp_path):
    for p in ['settings.ini', 'setup.py', 'README.md']: shutil.copy(ROOT / p, tmp_path / p)
    shutil.copytree(ROOT / 'nbs', tmp_path / 'nbs', ignore=shutil.ignore_patterns('_*', '.ipynb_checkpoints'))
    shutil.copytree(ROOT / 'vqlearn', tmp_path / 'vqlearn', ignore=shutil.ignore_patterns('__pycache__'))
    return tmp_path

def _snapshot(folder: Path, pattern: str):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob(pattern))}

def test_nbdev_export_leaves_no_diff(tmp_path):
    "The committed library is exactly what the notebooks export (run in a copy, so the checkout is untouched)."
    proj = _copy_project(tmp_path)
    before = _snapshot(proj / 'vqlearn', '*.py')
    subprocess.run([sys.executable, '-c', 'from nbdev.doclinks import nbdev_export; nbdev_export()'], cwd=proj, check=True)
    after = _snapshot(proj / 'vqlearn', '*.py')
    changed = sorted(str(k) for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"nbdev_export changes {changed}: run nbdev_export and commit"

def test_notebooks_are_clean(tmp_path):
    proj = _copy_project(tmp_path)
    before = _snapshot(proj / 'nbs', '*.ipynb')
    subprocess.run([sys.executable, '-c', 'from nbdev.clean import nbdev_clean; nbdev_clean()'], cwd=proj, check=True)
    after = _snapshot(proj / 'nbs', '*.ipynb')
    changed = sorted(str(k) for k in before if before[k] != after[k])
    assert not changed, f"nbdev_clean changes {changed}: run nbdev_clean and commit"

def test_every_notebook_follows_the_template():
    "Title + description, default_exp (except index), Colab badge, final export cell."
    import json
    for nb_path in sorted((ROOT / 'nbs').glob('[0-9]*.ipynb')):
        cells = json.loads(nb_path.read_text())['cells']
        src = [''.join(c['source']) for c in cells]
        assert src[0].startswith('# ') and '\n> ' in src[0], f"{nb_path.name}: first cell must be '# Title' + '> description'"
        assert any(s.startswith('#| default_exp ') for s in src), f"{nb_path.name}: no #| default_exp"
        assert any(f'colab.research.google.com/github/vqlearn/vqlearn/blob/main/nbs/{nb_path.name}' in s for s in src), \
            f"{nb_path.name}: no Open-in-Colab badge pointing at itself"
        assert 'nbdev_export()' in src[-1], f"{nb_path.name}: last cell must call nbdev_export()"

JARGON = re.compile(r'seed 00\d|the issue\b|the bar set|our own test runs|\.\./shared', re.I)

def _png_height(b64: str) -> int:
    "Height in pixels of a base64-encoded PNG (from its IHDR chunk)."
    import base64
    head = base64.b64decode(b64[:64])
    assert head[:8] == b'\x89PNG\r\n\x1a\n', 'not a PNG'
    return int.from_bytes(head[20:24], 'big')

def page_problems(nb_path: Path) -> list[str]:
    "What a reader of the rendered page would trip over: stderr dumps, widget placeholders, thin strips, internal jargon."
    import json
    cells, out = json.loads(nb_path.read_text())['cells'], []
    src = [''.join(c['source']) for c in cells]
    for i, c in enumerate(cells):
        if JARGON.search(src[i]): out.append(f"cell {i}: internal jargon {JARGON.search(src[i]).group()!r}")
        for o in c.get('outputs', []):
            if o.get('name') == 'stderr': out.append(f"cell {i}: a stored stderr output")
            data = o.get('data', {})
            if 'application/vnd.jupyter.widget-view+json' in data: out.append(f"cell {i}: a widget placeholder")
            if 'image/png' in data and _png_height(data['image/png']) < 100:
                out.append(f"cell {i}: a PNG {_png_height(data['image/png'])} px high")
            text = ''.join(data.get('text/plain', '')) + ''.join(o.get('text', ''))
            if JARGON.search(text): out.append(f"cell {i}: internal jargon in an output")
        if c['cell_type'] == 'markdown' and src[i].startswith('**Exercise'):
            nxt = src[i + 1] if i + 1 < len(src) else ''
            if not nxt.startswith('#| code-fold: true'): out.append(f"cell {i}: an exercise without a folded solution after it")
    if nb_path.name[0].isdigit() and not any(c['cell_type'] == 'markdown' and s.startswith('**Runtime.**')
                                             for c, s in zip(cells[:12], src[:12])):
        out.append("no '**Runtime.**' note near the top")
    return out

def test_pages_have_no_reader_traps():
    "The stored pages pass the page check (see `page_problems`)."
    problems = {p.name: page_problems(p) for p in sorted((ROOT / 'nbs').glob('*.ipynb'))}
    assert not any(problems.values()), '\n'.join(f'{k}: {v}' for k, v in problems.items() if v)

def test_page_check_can_fail(tmp_path):
    "Each trap is caught on a made-up page."
    import base64, io, json
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(8, 0.5), dpi=100); buf = io.BytesIO(); fig.savefig(buf, format='png'); plt.close(fig)
    png = base64.b64encode(buf.getvalue()).decode()
    code = lambda src, outs: dict(cell_type='code', source=src, metadata={}, outputs=outs, execution_count=None)
    nb = dict(cells=[dict(cell_type='markdown', source='# T\n> d', metadata={}),
                     code('x = 1', [dict(output_type='stream', name='stderr', text='100%|###|')]),
                     code('w', [dict(output_type='display_data', metadata={},
                                     data={'application/vnd.jupyter.widget-view+json': {}, 'text/plain': 'VBox()'})]),
                     code('plt.show()', [dict(output_type='display_data', metadata={}, data={'image/png': png})]),
                     dict(cell_type='markdown', source='**Exercise 1 — x.** As the issue says, see ../shared.', metadata={}),
                     code('y = 2', [])], metadata={}, nbformat=4, nbformat_minor=5)
    p = tmp_path / '99_trap.ipynb'; p.write_text(json.dumps(nb))
    found = ' | '.join(page_problems(p))
    for trap in ['stderr', 'widget', 'PNG 50 px', 'jargon', 'folded solution', 'Runtime']: assert trap in found, (trap, found)

def test_readme_matches_index():
    "README.md is rendered from nbs/index.ipynb (tools/make_readme.py; nbdev_readme where Quarto exists)."
    sys.path.insert(0, str(ROOT / 'tools'))
    import make_readme
    assert (ROOT / 'README.md').read_text(encoding='utf-8') == make_readme.render(), "run python tools/make_readme.py"

def test_ci_runs_the_readme_commands():
    "The README's two set-up commands are the ones .ci/run uses."
    readme, ci = (ROOT / 'README.md').read_text(), (ROOT / '.ci' / 'run').read_text()
    block = readme.split('## Set-up on a fresh machine')[1].split('```sh')[1].split('```')[0].strip().splitlines()
    install, test = block
    inst, main_job = install.split(' && ')
    assert inst == 'pip install -e ".[dev]"' and 'pip install -q -e ".[dev]"' in ci
    assert main_job.startswith('vqlearn pegasus ') and any(l.startswith('vqlearn pegasus ') for l in ci.splitlines())
    assert test in ci.splitlines(), f"{test!r} is not a line of .ci/run"

def test_sidebar_lists_every_notebook():
    "The docs sidebar (custom_sidebar = True) names every notebook, and only notebooks that exist."
    listed = re.findall(r'([\w.-]+\.ipynb)', (ROOT / 'nbs' / 'sidebar.yml').read_text())
    present = sorted(p.name for p in (ROOT / 'nbs').glob('*.ipynb'))
    assert sorted(listed) == present

# --- the import graph: models on the lowest floor, data/train above them, lessons on top, no loops ---------------
FLOORS = {'core': 0, 'elbo': 1, 'metrics': 1, 'quantize': 1, 'pixelcnn': 1, 'data': 2, 'train': 2}   # others: lessons (3)

def _curriculum() -> list[str]:
    "Modules in notebook order (the `#| default_exp` of each numbered notebook)."
    import json
    mods = []
    for nb in sorted((ROOT / 'nbs').glob('[0-9]*.ipynb')):
        for c in json.loads(nb.read_text())['cells']:
            m = re.match(r'#\|\s*default_exp\s+(\S+)', ''.join(c['source']))
            if m: mods.append(m.group(1)); break
    return mods

def _package_imports(path: Path) -> set[str]:
    "vqlearn modules imported anywhere in a module (top level or inside functions)."
    import ast
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1: out |= {node.module.split('.')[0]} if node.module else {a.name for a in node.names}
            elif node.module and node.module.startswith('vqlearn.'): out.add(node.module.split('.')[1])
            elif node.module == 'vqlearn': out |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split('.')[1] for a in node.names if a.name.startswith('vqlearn.')}
    return out - {'_modidx', '__init__'}

def test_import_graph_has_floors_and_no_loops():
    order = _curriculum()
    assert order[:3] == ['core', 'data', 'train'], order
    floor = lambda m: FLOORS.get(m, 3)
    bad = []
    for m in order:
        for dep in _package_imports(ROOT / 'vqlearn' / f'{m}.py'):
            if dep not in order: bad.append(f'{m} imports unknown module {dep}'); continue
            ok = floor(dep) < floor(m) or (floor(dep) == floor(m) and floor(m) != 2 and order.index(dep) < order.index(m))
            if not ok: bad.append(f'{m} (floor {floor(m)}) imports {dep} (floor {floor(dep)})')
    assert not bad, 'layering violations: ' + '; '.join(bad)

def test_import_graph_check_can_fail(tmp_path):
    "The checker sees lazy imports inside functions, relative and absolute forms."
    p = tmp_path / 'm.py'
    p.write_text('from .core import x\ndef f():\n    from vqlearn.data import y\n    import vqlearn.train\n')
    assert _package_imports(p) == {'core', 'data', 'train'}

def test_readme_python_blocks_run_as_written(tmp_path):
    "Every ```python block of the README runs, in order, in a fresh interpreter (quick configuration, the test cache)."
    blocks = re.findall(r'```python\n(.*?)```', (ROOT / 'README.md').read_text(), flags=re.S)
    assert len(blocks) >= 2
    env = {**os.environ, 'VQLEARN_MODE': 'quick', 'MPLBACKEND': 'Agg'}   # $VQLEARN_CACHE: conftest's, or CI's (which the notebooks filled)
    r = subprocess.run([sys.executable, '-c', '\n'.join(blocks)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]

def test_gpu_check_runs_cuda_cells_only_with_cuda_and_reports_failures(tmp_path):
    "tools/gpu_check.py skips `slow` always and `cuda` without a GPU, and turns a failing assert into a FAIL row."
    import json
    sys.path.insert(0, str(ROOT / 'tools'))
    try: import gpu_check
    finally: sys.path.pop(0)
    cell = lambda i, src: {'cell_type': 'code', 'id': i, 'metadata': {}, 'source': src, 'outputs': [], 'execution_count': None}
    nb = {'cells': [cell('a', 'x = 1'), cell('b', '#| cuda\nassert False, "cuda cell ran"'),
                    cell('s', '#| slow\nassert False, "slow cell ran"'), cell('c', 'assert x == 1')],
          'metadata': {}, 'nbformat': 4, 'nbformat_minor': 5}
    path = tmp_path / 't.ipynb'; path.write_text(json.dumps(nb))
    assert gpu_check.flags('#| eval: false\nx = 1') == {'eval-false'} and gpu_check.flags('#| slow\n#| cuda\ny') == {'slow', 'cuda'}
    assert gpu_check.run_notebook(path, {'slow', 'cuda'}) == (True, '')
    assert gpu_check.run_notebook(path, {'slow'}) == (False, 'AssertionError: cuda cell ran')

def test_seed_shift_moves_every_global_seed_and_nothing_else():
    "tools/seed_shift (the audit for one-seed asserts): with a shift s, seeding with n draws what seeding with n + s does."
    code = ("import random, numpy as np, torch; from vqlearn.core import seed_everything; seed_everything({n}); "
            "print(random.random(), np.random.rand(), torch.rand(1).item(), "
            "torch.rand(1, generator=torch.Generator().manual_seed(5)).item(), np.random.default_rng(5).random())")
    def draw(n, shift):
        env = {**os.environ, 'VQLEARN_SEED_SHIFT': str(shift), 'PYTHONPATH': str(ROOT / 'tools' / 'seed_shift')}
        r = subprocess.run([sys.executable, '-c', code.format(n=n)], env=env, capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.split()
    base, shifted = draw(0, 0), draw(0, 3)
    assert shifted[:3] == draw(3, 0)[:3] and shifted[:3] != base[:3]   # the global seeds moved by 3 ...
    assert shifted[3:] == base[3:]                                      # ... explicit generators did not
