"""Colab, simulated: a fresh Python environment holding only what a lesson's install cell installs, and one lesson run
end to end in it (quick configuration) through a notebook client, as on Colab.

The environment is a virtualenv without the system site-packages. It gets, one distribution at a time (what the
distribution's RECORD lists, symlinked into the venv's site-packages; nothing else of the host is importable there):

* the dependency closure of the install cell's requirements other than vqlearn (nbdev, fastcore, execnb, scikit-image,
  torchmetrics, ...) and of vqlearn's own requirements (read from a wheel built from this checkout), computed from the
  host's installed distributions (importlib.metadata, markers and extras evaluated with `packaging`);
* what every Colab runtime has before any cell runs: the IPython kernel that runs the notebook, and pip (COLAB_RUNTIME);
* a stub `google.colab` module, so the install cell takes its Colab branch.

vqlearn itself is installed by the install cell: its `pip install` runs as written, except that the requirement
`vqlearn @ git+https://...` points at the wheel built from this checkout and pip is offline (PIP_NO_INDEX), so it can
only find the other requirements already installed. Then the lesson runs in an ipykernel started from the venv's
Python, driven by nbclient from the test process (Colab's front end is not in the runtime either), in a folder outside
the checkout, with a fresh HOME and matplotlib's inline backend. A lesson that imports a package which neither vqlearn's
requirements nor the install cell provide fails here; `test_every_lesson_imports_only_what_the_install_cell_provides`
checks the imports of all lessons statically. About 40 s on 2 busy CPU cores; no network, nothing downloaded.
"""
import ast, json, os, re, shutil, subprocess, sys, tempfile, time, zipfile
from email.parser import Parser
from functools import lru_cache
from importlib import metadata as md
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))
from gpu_check import flags    # the nbdev flags of a cell, as tools/exec_nbs.py reads them

LESSON = '03b_metrics.ipynb'   # ~15 s in the quick configuration; it imports scikit-image and torchmetrics, which only the install cell provides
GIT_REQ = 'vqlearn @ git+https://github.com/vqlearn/vqlearn.git'   # the install cell's vqlearn requirement
COLAB_RUNTIME = ('ipykernel', 'pip')   # preinstalled on every Colab runtime: the kernel that runs the notebook, and the pip the install cell calls
ANSI = re.compile(r'\x1b\[[0-9;]*m')   # colours in tracebacks and pip's messages
SKIP = {'slow', 'cuda', 'eval-false'}  # cells nbdev_test leaves out of the quick configuration
pytestmark = pytest.mark.skipif(sys.platform == 'win32' or sys.version_info < (3, 10), reason='a POSIX venv; Python >= 3.10 (importlib.metadata)')

def _code_cells(nb_path: Path) -> list[str]:
    return [''.join(c['source']) for c in json.loads(nb_path.read_text(encoding='utf-8'))['cells'] if c['cell_type'] == 'code']

def _lessons(): return sorted((ROOT / 'nbs').glob('[0-9]*.ipynb'))

def install_cell(cells: list[str]) -> tuple[int, list[str]]:
    "Index of the Colab install cell among the code cells and its pip requirements; it must be the first code cell after `#| default_exp`."
    assert cells and cells[0].strip().startswith('#| default_exp '), "the first code cell must be `#| default_exp ...` alone"
    assert len(cells) > 1 and 'google.colab' in cells[1], "the install cell must be the first code cell after `#| default_exp`"
    calls = [n for n in ast.walk(ast.parse(cells[1])) if isinstance(n, ast.Call) and ast.unparse(n.func) == 'subprocess.run']
    assert len(calls) == 1 and isinstance(calls[0].args[0], ast.List), "the install cell must make one subprocess.run([...]) call"
    argv = calls[0].args[0].elts
    assert ast.unparse(argv[0]) == 'sys.executable' and [ast.literal_eval(a) for a in argv[1:4]] == ['-m', 'pip', 'install'], \
        "the install cell must run `sys.executable -m pip install` (the kernel's own Python)"
    args = [ast.literal_eval(a) for a in argv[4:]]
    assert any(kw.arg == 'check' and ast.literal_eval(kw.value) is True for kw in calls[0].keywords), "pip must run with check=True"
    return 1, [a for a in args if not a.startswith('-')]

def imports_of(source: str) -> set[str]:
    "Top-level names of the modules a cell imports (also inside functions), leaving out optional ones (`try: ... except ImportError`)."
    src = '\n'.join('' if l.lstrip().startswith(('!', '%')) else l for l in source.splitlines())   # IPython magics are not Python
    out = set()
    def visit(node, optional=False):
        if isinstance(node, ast.Try) and any(h.type is not None and {'ImportError', 'ModuleNotFoundError'} & {ast.unparse(t) for t in
                                             (h.type.elts if isinstance(h.type, ast.Tuple) else [h.type])} for h in node.handlers):
            for n in node.body: visit(n, True)
            for n in node.handlers + node.orelse + node.finalbody: visit(n, optional)
            return
        if not optional:
            if isinstance(node, ast.Import): out.update(a.name.split('.')[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0: out.add(node.module.split('.')[0])
        for n in ast.iter_child_nodes(node): visit(n, optional)
    visit(ast.parse(src))
    return out - set(sys.stdlib_module_names) - {'__future__'}

@lru_cache(maxsize=None)
def closure(reqs: tuple[str, ...]) -> dict[str, md.Distribution]:
    "The host's distributions that `reqs` resolve to, with all they require (markers and extras evaluated), by canonical name."
    dists, seen, todo = {}, set(), [Requirement(r) for r in reqs]
    while todo:
        r = todo.pop()
        name = canonicalize_name(r.name)
        if name in dists: d = dists[name]
        else:
            try: d = dists[name] = md.distribution(r.name)
            except md.PackageNotFoundError: pytest.fail(f"{r} (needed on the simulated Colab) is not installed here: pip install -e '.[dev]'")
        assert not r.specifier or r.specifier.contains(d.version, prereleases=True), f"{r} is needed; {d.version} is installed here"
        for extra in {''} | set(r.extras):
            if (name, extra) in seen: continue
            seen.add((name, extra))
            for s in d.requires or []:
                q = Requirement(s)
                if q.marker is None or q.marker.evaluate({'extra': extra}): q.marker = None; todo.append(q)
    return dists

def expose(dists: dict[str, md.Distribution], site: Path) -> int:
    """Symlink the files of `dists` that live in their site-packages folders into `site`; returns the number of links.
    A top-level folder all of whose owners (among every distribution installed here) are in `dists` is linked whole
    (one link for `torch/`, not 20,000); one shared with others (`__pycache__`, a namespace package) file by file."""
    owners = {}
    for d in md.distributions():
        base, name = Path(d.locate_file('')), canonicalize_name(d.metadata['Name'])
        for top in {f.parts[0] for f in d.files or [] if '..' not in f.parts}: owners.setdefault((base, top), set()).add(name)
    n, mine, whole = 0, set(dists), set()
    for name, d in dists.items():
        if d.files is None: pytest.fail(f"{name} has no RECORD: cannot tell its files apart from others'")
        base = Path(d.locate_file(''))
        for f in d.files:
            if '..' in f.parts: continue                   # scripts and data outside site-packages (bin/, share/): not needed
            if f.parts[0] in whole: continue
            top = site / f.parts[0]
            if owners[base, f.parts[0]] <= mine and not top.exists() and not top.is_symlink():
                os.symlink(base / f.parts[0], top); whole.add(f.parts[0]); n += 1
                continue
            src, dst = base / f, site / f
            if not src.exists() or dst.exists() or dst.is_symlink(): continue   # a .pyc never written; a file listed twice
            dst.parent.mkdir(parents=True, exist_ok=True)  # real folders: nothing written under them reaches the host
            os.symlink(src, dst); n += 1
    return n

def wheel_requirements(whl: Path) -> list[str]:
    "vqlearn's requirements from the wheel's METADATA, without the extras (pip installs `vqlearn` without [dev])."
    with zipfile.ZipFile(whl) as z:
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith('.dist-info/METADATA'))).decode())
    reqs = [Requirement(r) for r in meta.get_all('Requires-Dist') or []]
    return [str(r) for r in reqs if r.marker is None or r.marker.evaluate({'extra': ''})]

@pytest.fixture(scope='module')
def tmp():
    d = Path(tempfile.mkdtemp(prefix='vqlearn-colab-'))
    yield d
    shutil.rmtree(d, ignore_errors=True)

@pytest.fixture(scope='module')
def wheel(tmp) -> Path:
    "vqlearn built from (a copy of) this checkout's working tree, as pip would build it from the git URL."
    src = tmp / 'src'; src.mkdir()
    for p in ['setup.py', 'pyproject.toml', 'settings.ini', 'README.md', 'LICENSE', 'MANIFEST.in', 'CONTRIBUTING.md']:
        if (ROOT / p).is_file(): shutil.copy(ROOT / p, src / p)
    shutil.copytree(ROOT / 'vqlearn', src / 'vqlearn', ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    r = subprocess.run([sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-index', '--no-build-isolation',
                        '-w', str(tmp / 'wheels'), str(src)], capture_output=True, text=True, env={**os.environ, 'PIP_CONFIG_FILE': os.devnull})
    assert r.returncode == 0, r.stdout + r.stderr
    (whl,) = (tmp / 'wheels').glob('vqlearn-*.whl')
    return whl

def _venv_python(venv: Path, code: str) -> str:
    r = subprocess.run([str(venv / 'bin' / 'python'), '-I', '-B', '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout

@pytest.fixture(scope='module')
def colab(tmp, wheel):
    "The simulated Colab runtime before the install cell runs: (venv folder, its site-packages, the distributions exposed)."
    _, reqs = install_cell(_code_cells(ROOT / 'nbs' / LESSON))
    assert GIT_REQ in reqs, f"the install cell of {LESSON} must install {GIT_REQ!r}"
    others = [r for r in reqs if r != GIT_REQ]
    dists = closure(tuple(wheel_requirements(wheel) + others + list(COLAB_RUNTIME)))
    assert 'vqlearn' not in dists
    venv = tmp / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', '--without-pip', str(venv)], check=True)   # no system site-packages
    site = Path(_venv_python(venv, "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    assert site.is_dir() and site.is_relative_to(venv)
    (site / 'google' / 'colab').mkdir(parents=True)       # a namespace package `google`, as Colab's google-colab has
    (site / 'google' / 'colab' / '__init__.py').write_text('"A stub of Colab\'s google.colab: the lessons only import it."\n')
    expose(dists, site)
    return venv, site, dists

def test_install_cell_comes_first_in_every_lesson():
    "Every lesson installs before it imports: the install cell is the first code cell after `#| default_exp`, nothing imports earlier."
    for nb in _lessons():
        cells = _code_cells(nb)
        i, reqs = install_cell(cells)
        assert not any(imports_of(c) for c in cells[:i]), f"{nb.name}: a cell before the install cell imports something"
        assert GIT_REQ in reqs, f"{nb.name}: the install cell does not install {GIT_REQ!r}"

def test_every_lesson_imports_only_what_the_install_cell_provides(wheel):
    "Each third-party module a lesson imports comes from vqlearn's requirements, its install cell's, or the Colab runtime."
    provides = md.packages_distributions()
    base = wheel_requirements(wheel) + list(COLAB_RUNTIME)
    problems = []
    for nb in _lessons():
        cells = _code_cells(nb)
        i, reqs = install_cell(cells)
        have = set(closure(tuple(base + [r for r in reqs if r != GIT_REQ])))
        for mod in sorted(set().union(*(imports_of(c) for j, c in enumerate(cells) if j != i)) - {'vqlearn'}):
            if not {canonicalize_name(d) for d in provides.get(mod, [])} & have:
                problems.append(f"{nb.name} imports {mod} (from {provides.get(mod, 'no installed distribution')})")
    assert not problems, "not installed on Colab by vqlearn or the install cell:\n" + '\n'.join(problems)

def test_simulated_colab_has_nothing_else(colab):
    "Modules the host has but the closure lacks are not importable in the venv (else the run below would prove little)."
    venv, site, dists = colab
    provides = md.packages_distributions()
    absent = sorted(m for m, ds in provides.items() if m.isidentifier() and m not in sys.stdlib_module_names
                    and not {canonicalize_name(d) for d in ds} & set(dists) and m not in ('google', 'vqlearn'))
    assert 'pytest' in absent and len(absent) > 20, absent        # the host has more than the simulated Colab: the check is not empty
    leaked = _venv_python(venv, f"import importlib.util as u; print([m for m in {absent!r} if u.find_spec(m)])")
    assert leaked.strip() == '[]', f"importable in the venv, though outside the closure: {leaked}"
    missing = _venv_python(venv, "import importlib.util as u; print([m for m in ['torch', 'skimage', 'torchmetrics', 'nbdev', "
                                 "'execnb', 'ipykernel', 'pip', 'google.colab'] if u.find_spec(m) is None])")
    assert missing.strip() == '[]', f"missing from the venv: {missing}"

def test_lesson_runs_on_simulated_colab(tmp, wheel, colab):
    "The install cell installs vqlearn offline from this checkout; then the whole lesson runs in an ipykernel (quick configuration)."
    nbformat = pytest.importorskip('nbformat'); pytest.importorskip('nbclient')
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager
    venv, site, dists = colab
    assert _venv_python(venv, "import importlib.util as u; print(u.find_spec('vqlearn'))").strip() == 'None'   # until the install cell runs

    nb = nbformat.read(ROOT / 'nbs' / LESSON, as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    inst = code[install_cell([c.source for c in code])[0]]
    assert inst.source.count(repr(GIT_REQ)) == 1
    inst.source = inst.source.replace(repr(GIT_REQ), repr(f'vqlearn @ {wheel.as_uri()}'))   # the checkout, not GitHub
    nb.cells = [c for c in nb.cells if not (c.cell_type == 'code' and flags(c.source) & SKIP)]
    nb.cells.append(nbformat.v4.new_code_cell("import sys, vqlearn; print('VQLEARN_FROM', vqlearn.__file__); print('PREFIX', sys.prefix)"))
    (tmp / 'home').mkdir()
    content = tmp / 'content'; content.mkdir()             # Colab's working folder; no ../settings.ini there
    assert not (content.parent / 'settings.ini').exists()

    (tmp / 'kernels' / 'colab').mkdir(parents=True)
    (tmp / 'kernels' / 'colab' / 'kernel.json').write_text(json.dumps(dict(
        argv=[str(venv / 'bin' / 'python'), '-m', 'ipykernel_launcher', '-f', '{connection_file}'], display_name='Colab (simulated)', language='python')))
    keep = ('LANG', 'LC_ALL', 'TMPDIR', 'USER', 'OMP_NUM_THREADS', 'MKL_NUM_THREADS')
    env = {k: os.environ[k] for k in keep if k in os.environ}   # not PYTHONPATH, MPLBACKEND (the kernel's inline backend, as on Colab), IN_TEST
    env.update(HOME=str(tmp / 'home'), IPYTHONDIR=str(tmp / 'home' / '.ipython'),   # a fresh home, as a new Colab runtime has
               PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(venv),
               VQLEARN_MODE='quick', VQLEARN_CACHE=str(tmp / 'cache'), VQLEARN_DEVICE=os.environ.get('VQLEARN_DEVICE', 'cpu'),
               PIP_NO_INDEX='1', PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK='1', PIP_ROOT_USER_ACTION='ignore',
               PIP_NO_CACHE_DIR='1', PYTHONNOUSERSITE='1',
               PYTHONDONTWRITEBYTECODE='1')            # no .pyc written through the links into the host's site-packages
    km = KernelManager(kernel_name='colab', kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp / 'kernels')]))
    client = NotebookClient(nb, km=km, kernel_name='colab', timeout=600, startup_timeout=180,
                            resources={'metadata': {'path': str(content)}})
    t = time.time()
    try: client.execute(env=env)
    except CellExecutionError as e: pytest.fail(f"{LESSON} failed on the simulated Colab:\n" + ANSI.sub('', str(e)), pytrace=False)
    finally:
        if km.has_kernel: km.shutdown_kernel()             # the client does not stop a kernel whose manager it was given
    print(f"{LESSON} on the simulated Colab: {time.time() - t:.0f} s")

    code = [c for c in nb.cells if c.cell_type == 'code']
    assert all(c.execution_count for c in code), "every cell ran"
    assert not [o for c in code for o in c.outputs if o.output_type == 'error']
    assert 'nbdev_export()' in code[-2].source             # the lesson's last cell ran (a no-op outside a checkout) without error
    assert not (content / 'vqlearn').exists() and not list(tmp.glob('settings.ini'))
    text = '\n'.join(o.get('text', '') for c in code for o in c.outputs if o.output_type == 'stream')
    assert 'MSE of each distortion: ' in text                    # the lesson's numbers were printed ...
    assert '|ours-skimage|' in text                              # ... and its cross-checks against scikit-image and torchmetrics ran
    assert any(o.output_type == 'display_data' and 'image/png' in o.data for c in code for o in c.outputs), "its figures were drawn"
    from_, prefix = [l.split(' ', 1)[1] for l in text.splitlines() if l.startswith(('VQLEARN_FROM ', 'PREFIX '))]
    assert Path(prefix) == venv and Path(from_).is_relative_to(site), (from_, prefix)   # the installed copy, not the checkout
    installed = [p for p in site.glob('*.dist-info') if not p.is_symlink()]   # what the install cell's pip added
    assert [p.name.split('-')[0] for p in installed] == ['vqlearn'], "the install cell found everything else installed"
    assert wheel.name in json.loads((installed[0] / 'direct_url.json').read_text())['url']
