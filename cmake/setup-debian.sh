#!/bin/sh
# Installs what building, testing and benchmarking polyattn needs on Debian 12 (bookworm),
# and nothing when it is all there already. Run as root or with sudo available. python3-torch,
# libtorch-dev and python3-pytest are the PyTorch extension (python/) and its tests;
# libopenblas0-openmp gives PyTorch's matmuls OpenBLAS instead of the reference BLAS that
# python3-torch pulls in (bench/bench_torch.py compares against PyTorch's own attention).
set -eu
packages="cmake make g++ clang libomp-dev libeigen3-dev libxsimd-dev catch2 libbenchmark-dev python3-matplotlib libopenmpi-dev openmpi-bin bible-kjv python3-torch libtorch-dev python3-pytest libopenblas0-openmp"
missing=""
for p in $packages; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -z "$missing" ]; then
  echo "setup-debian: all dependencies present"
  exit 0
fi
echo "setup-debian: installing$missing"
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing
