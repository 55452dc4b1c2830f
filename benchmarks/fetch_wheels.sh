#!/usr/bin/env bash
# Download the pure-Python wheels the GPU machine lacks into .whl/ (ignored by git), for benchmarks/gpu_check.sh
# to install there without a network: diffusers (the version installed here, else 0.42.1, the one CI tests) and
# importlib_metadata, its one requirement that machine does not have (it has huggingface-hub, safetensors,
# regex, requests, filelock, numpy, Pillow and zipp). About 6.5 MB together.
#
#   bash benchmarks/fetch_wheels.sh          then carry ".whl" with the gpu_check call
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VERSION="${DIFFUSERS_VERSION:-$("$PY" -c 'import diffusers; print(diffusers.__version__)' 2> /dev/null || echo 0.42.1)}"
mkdir -p .whl
rm -f .whl/*.whl  # one version of each: two would stop the install there
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform any --platform manylinux2014_x86_64 -d .whl "diffusers==$VERSION" "importlib_metadata>=6"
ls -l .whl
du -sh .whl
