import os
os.environ.setdefault('VQLEARN_DEVICE', 'cpu')   # tests are CPU tests, also on a machine with a GPU
os.environ.setdefault('MPLBACKEND', 'Agg')
