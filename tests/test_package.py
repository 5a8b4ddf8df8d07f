"""The package as it ships: the wheel built from this checkout (size, contents, metadata against settings.ini), installed
into a fresh virtual environment and run there, imported from the wheel and not from the checkout."""
import configparser, json, os, re, shlex, shutil, subprocess, sys, textwrap, zipfile
from email.parser import Parser
from pathlib import Path
import numpy as np
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
MAX_WHEEL_BYTES = 8 * 1024 * 1024  # PyPI's limit is far higher; this keeps `pip install vqlearn` small
# The wheel is built from a copy holding only these files, what MANIFEST.in includes and vqlearn/ (no build/ in the
# checkout, and a build that needs some other file of the checkout fails here, as it would from the sdist).
BUILD_FILES = ['setup.py', 'settings.ini', 'pyproject.toml', 'README.md', 'LICENSE', 'MANIFEST.in']
STATUSES = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable', '6 - Mature', '7 - Inactive']
LICENSES = {'apache2': 'OSI Approved :: Apache Software License', 'mit': 'OSI Approved :: MIT License'}


def settings() -> configparser.SectionProxy:
    cfg = configparser.ConfigParser(delimiters=['=']); cfg.read(ROOT / 'settings.ini', encoding='utf-8')
    return cfg['DEFAULT']


def run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-3000:]}"
    return r


def manifest_includes() -> list[str]:
    "The files MANIFEST.in names with `include` (not the recursive patterns)."
    lines = (ROOT / 'MANIFEST.in').read_text().splitlines()
    return [f for l in lines if l.split()[:1] == ['include'] for f in l.split()[1:]]


def checkout_modules() -> set[str]:
    return {p.name for p in (ROOT / 'vqlearn').glob('*.py')}


def checkout_weights() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((ROOT / 'vqlearn' / 'weights').iterdir()) if p.suffix in ('.safetensors', '.json')}


@pytest.fixture(scope='module')
def wheel(tmp_path_factory) -> Path:
    "Build the wheel from a copy of the checkout (pip wheel, no build isolation, no index: offline; the checkout gets no build/)."
    src, out = tmp_path_factory.mktemp('src'), tmp_path_factory.mktemp('wheel')
    for f in dict.fromkeys(BUILD_FILES + manifest_includes()):
        if (ROOT / f).exists(): shutil.copy(ROOT / f, src / f)
    shutil.copytree(ROOT / 'vqlearn', src / 'vqlearn', ignore=shutil.ignore_patterns('__pycache__', '*.pyc'))
    run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-q', '-w', out, src])
    wheels = sorted(out.glob('*.whl'))
    assert [w.name for w in wheels] == [f"vqlearn-{settings()['version']}-py3-none-any.whl"], wheels
    return wheels[0]


def wheel_text(whl: Path, name: str) -> str:
    with zipfile.ZipFile(whl) as z: return z.read(f"vqlearn-{settings()['version']}.dist-info/{name}").decode()


def test_manifest_names_only_existing_files():
    missing = [f for f in manifest_includes() if not (ROOT / f).is_file()]
    assert not missing, f"MANIFEST.in includes files that do not exist: {missing}"
    assert (ROOT / 'vqlearn' / 'weights' / 'manifest.json').is_file()
    assert 'recursive-include vqlearn/weights *.safetensors *.json' in (ROOT / 'MANIFEST.in').read_text()


def test_wheel_size_and_contents(wheel):
    size = wheel.stat().st_size
    assert size <= MAX_WHEEL_BYTES, f"the wheel is {size / 2**20:.1f} MB, over {MAX_WHEEL_BYTES / 2**20:.0f} MB"
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        modules = {n.split('/', 1)[1] for n in names if re.fullmatch(r'vqlearn/[^/]+\.py', n)}
        assert modules == checkout_modules(), f"wheel modules differ from vqlearn/*.py: missing {checkout_modules() - modules}, extra {modules - checkout_modules()}"
        weights = checkout_weights()
        assert {'manifest.json', 'vqvae.safetensors', 'pegasus_prior.safetensors', 'judge.safetensors'} <= set(weights)
        for name, data in weights.items():
            assert f'vqlearn/weights/{name}' in names, f"the wheel lacks vqlearn/weights/{name}"
            assert z.read(f'vqlearn/weights/{name}') == data, f"vqlearn/weights/{name} in the wheel differs from the checkout's"
        assert not [n for n in names if '__pycache__' in n or n.endswith('.pyc')]
        assert not [n for n in names if n.split('/')[0] not in ('vqlearn', f"vqlearn-{settings()['version']}.dist-info")], names
    eps = configparser.ConfigParser(); eps.read_string(wheel_text(wheel, 'entry_points.txt'))
    want = dict(s.split('=', 1) for s in settings()['console_scripts'].split())
    assert dict(eps['console_scripts']) == want == {'vqlearn': 'vqlearn.cli:entry'}


def test_wheel_metadata_matches_settings(wheel):
    cfg, md = settings(), Parser().parsestr(wheel_text(wheel, 'METADATA'))
    assert (md['Name'], md['Version'], md['Summary']) == ('vqlearn', cfg['version'], cfg['description'])
    assert md['Requires-Python'] == '>=' + cfg['min_python']
    # dependencies: settings.ini's requirements, and dev_requirements as the `dev` extra
    reqs = [Requirement(r) for r in md.get_all('Requires-Dist')]
    norm = lambda rs: sorted(f'{canonicalize_name(r.name)}{r.specifier}' for r in rs)
    assert norm(r for r in reqs if r.marker is None) == norm(map(Requirement, shlex.split(cfg['requirements'])))
    assert norm(r for r in reqs if r.marker is not None and r.marker.evaluate({'extra': 'dev'})) == \
           norm(map(Requirement, shlex.split(cfg['dev_requirements'])))
    assert md.get_all('Provides-Extra') == ['dev']
    # classifiers: setup.py's list of statuses is indexed from 0 (settings.ini says so)
    cls = md.get_all('Classifier')
    assert {c for c in cls if not c.startswith('Programming Language')} == {
        'Development Status :: ' + STATUSES[int(cfg['status'])], 'Intended Audience :: ' + cfg['audience'].title(),
        'Natural Language :: ' + cfg['language'].title(), 'License :: ' + LICENSES[cfg['license']]}
    assert cfg['license'] == 'apache2' and md['License'] == 'Apache Software License 2.0'
    assert 'LICENSE' in md.get_all('License-File')
    pys = [c.rsplit(' :: ', 1)[1] for c in cls if c.startswith('Programming Language :: Python :: ')]
    minor = [int(v.split('.')[1]) for v in pys]
    assert pys[0] == cfg['min_python'] and minor == list(range(minor[0], minor[0] + len(minor))), pys
    here = f'{sys.version_info.major}.{sys.version_info.minor}'
    assert here in pys, f"tested on Python {here}, which the classifiers {pys} leave out (setup.py's py_versions)"
    assert md['Description-Content-Type'] == 'text/markdown'
    assert md.get_payload().strip() == (ROOT / 'README.md').read_text(encoding='utf-8').strip()


def dependency_paths() -> list[str]:
    """Where this interpreter finds torch, numpy and the rest: its sys.path minus the checkout (and the current folder).
    Listed in a .pth file of the test environment they come after its own site-packages, so its `vqlearn` (the wheel's)
    wins; and their own .pth files are not run, so an editable install of the checkout (a finder hook) stays out."""
    keep = []
    for p in sys.path:
        if not p or not Path(p).is_dir(): continue
        rp = Path(p).resolve()
        if rp == ROOT or ROOT in rp.parents: continue
        keep.append(str(rp))
    return list(dict.fromkeys(keep))


@pytest.fixture(scope='module')
def env(wheel, tmp_path_factory) -> dict:
    "A fresh venv (no system site-packages) with the wheel installed by pip; the dependencies via a .pth file."
    venv = tmp_path_factory.mktemp('env') / 'venv'
    run([sys.executable, '-m', 'venv', '--without-pip', venv])
    bin_dir = venv / ('Scripts' if os.name == 'nt' else 'bin')
    py = bin_dir / ('python.exe' if os.name == 'nt' else 'python')
    # installed before the .pth exists, so pip sees an empty environment (no vqlearn anywhere) and installs the wheel
    run([sys.executable, '-m', 'pip', '--python', py, 'install', '--no-deps', '--no-index', '-q', wheel])
    site = Path(run([py, '-c', 'import sysconfig; print(sysconfig.get_path("purelib"))']).stdout.strip())
    assert (site / 'vqlearn' / '__init__.py').is_file()
    (site / '_vqlearn_test_dependencies.pth').write_text('\n'.join(dependency_paths()) + '\n')
    environ = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONHOME', 'PYTHONSTARTUP')}
    # one thread: tiny models, and on a busy 2-core machine two threads per process wait on each other (100 steps: 4 s vs 60 s)
    environ.update(OMP_NUM_THREADS='1', VQLEARN_DEVICE='cpu', MPLBACKEND='Agg', TQDM_DISABLE='1',
                   VQLEARN_CACHE=str(tmp_path_factory.mktemp('cache')), PYTHONDONTWRITEBYTECODE='1')
    work = tmp_path_factory.mktemp('work')   # the current folder: neither the checkout nor the venv
    return dict(venv=venv.resolve(), py=py, bin=bin_dir, site=site, environ=environ, cwd=work)


def test_every_module_imports_from_the_wheel_and_a_short_pipeline_trains(env, wheel):
    with zipfile.ZipFile(wheel) as z:
        mods = sorted('vqlearn.' + n[len('vqlearn/'):-3] for n in z.namelist() if re.fullmatch(r'vqlearn/[^/]+\.py', n))
    assert 'vqlearn.__init__' in mods and len(mods) == len(checkout_modules())
    mods = ['vqlearn' if m == 'vqlearn.__init__' else m for m in mods]
    script = textwrap.dedent(f"""
        import importlib, importlib.metadata as md, json, sys
        from pathlib import Path
        mods = {mods!r}
        files = {{m: str(Path(importlib.import_module(m).__file__).resolve()) for m in mods}}
        import vqlearn, vqlearn.cli
        import torch
        from vqlearn.core import seed_everything
        from vqlearn.data import DeviceLoader, make_shapes
        from vqlearn.train import fit
        from vqlearn.vqvae import VQVAE, evaluate_vqvae, vqvae_step
        seed_everything(0)
        x, y = make_shapes(64, size=16, seed=0)   # the synthetic shapes of the quick configurations, small
        dl = DeviceLoader((x.float() / 255, y), batch_size=16, shuffle=True, seed=0, device='cpu')
        m = VQVAE(hidden=16, res_hidden=8, n_res=1, num_codes=32, dim=8, quantizer='plain')
        before = evaluate_vqvae(m, x)['mse']
        h = fit(m, dl, vqvae_step, steps=100, lr=1e-2, log_every=20, device='cpu', progress=False)
        after = evaluate_vqvae(m, x)['mse']
        print(json.dumps(dict(files=files, version=vqlearn.__version__, dist=str(md.distribution('vqlearn').locate_file('')),
                              weights=str(vqlearn.cli.WEIGHTS_DIR.resolve()), loss=h['loss'], mse=(before, after))))
    """)
    r = run([env['py'], '-c', script], cwd=env['cwd'], env=env['environ'])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    venv = env['venv']
    outside = {m: f for m, f in res['files'].items() if venv not in Path(f).parents}
    assert not outside, f"imported from outside the test environment {venv} (not the wheel): {outside}"
    assert Path(res['dist']).resolve() == env['site'].resolve(), res['dist']
    assert res['version'] == settings()['version']
    assert Path(res['weights']) == (env['site'] / 'vqlearn' / 'weights').resolve()
    loss, (before, after) = res['loss'], res['mse']
    assert len(loss) == 5 and all(np.isfinite(loss)), loss
    # 100 steps take the reconstruction error from ~0.066 to ~0.047 (seeds 0-3: 0.69-0.73 of it)
    assert loss[-1] < 0.85 * loss[0] and after < 0.85 * before, f"training did not lower the loss: {loss}, mse {before} -> {after}"


def test_console_script_draws_pegasi_offline(env, tmp_path):
    exe = env['bin'] / ('vqlearn.exe' if os.name == 'nt' else 'vqlearn')
    assert exe.is_file()
    if os.name != 'nt': assert exe.read_text().splitlines()[0] == f"#!{env['py']}"
    png, npz = tmp_path / 'OUT.png', tmp_path / 'OUT.npz'
    run([exe, 'pegasus', '-n', 2, '--seed', 0, '-o', png, '--npz', npz], cwd=env['cwd'], env=env['environ'])
    assert png.is_file() and png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    d = np.load(npz)
    assert d['images'].shape == (2, 32, 32, 3) and d['images'].dtype == np.uint8
    assert d['images'].std() > 1, "the drawn images are flat"
