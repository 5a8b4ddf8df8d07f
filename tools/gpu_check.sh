#!/usr/bin/env bash
# Run the lessons (quick configuration, cuda cells included when a GPU is present) and the tests; print a table.
# Works from a bare copy of the repository with a preinstalled torch: the package is imported from the checkout.
#   tools/gpu_check.sh [--nbs 06_vqvae 08_prior] [--no-tests]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TQDM_DISABLE=1
exec python3 tools/gpu_check.py "$@"
