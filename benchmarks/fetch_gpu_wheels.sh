#!/usr/bin/env bash
# Run HERE (where pip has an index) before a GPU call: saves the wheels the GPU
# machine lacks into .whl/ (git-ignored), which the call carries (carry: [".whl"])
# and benchmarks/run_gpu.sh installs. diffusers is the peer of the U-Net, step and
# training benchmarks (pure Python; its other needs are already on that machine);
# pytest-xdist (with execnet) runs the GPU tests in parallel processes, so that
# their Triton compilations share the machine's cores.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 importlib_metadata==8.7.1 \
  pytest-xdist==3.8.0 execnet==2.1.2
ls -l .whl
