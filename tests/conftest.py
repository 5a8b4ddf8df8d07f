import os, tempfile
os.environ.setdefault('VQLEARN_DEVICE', 'cpu')   # tests are CPU tests, also on a machine with a GPU
os.environ.setdefault('MPLBACKEND', 'Agg')
# stage artifacts made by tests go to a fresh folder, never into (or from) the user's cache
os.environ.setdefault('VQLEARN_CACHE', tempfile.mkdtemp(prefix='vqlearn-test-cache-'))
