#!/bin/sh
# packaging/container/build-in-image.sh: builds and installs dsmoe inside a container image (run by
# dsmoe.def and the Dockerfile from the copied checkout). Debian 12 or Ubuntu 24.04 based images: the
# same package names; CMake >= 3.25 is needed (Ubuntu 22.04's 3.22 is too old).
# The CUDA kernel plugin is built when the image has the CUDA toolkit (NVIDIA's nvidia/cuda:*-devel
# images: /usr/local/cuda), for the GPU architectures in $CUDA_ARCH; otherwise the CPU plugins only.
# Usage: build-in-image.sh <source dir> <install prefix>
set -eu
src=$1
prefix=$2
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends build-essential cmake pkg-config openmpi-bin libopenmpi-dev \
    libhwloc-dev hwloc libopenblas-dev
# oneDNN gives the cpu plugin its bfloat16 GEMMs; without it they are emulated (slow but right).
apt-get install -y --no-install-recommends libdnnl-dev || echo "dsmoe image: no libdnnl-dev here: bf16 GEMMs emulated"

gpu="-DDSMOE_WITH_CUDA=OFF -DDSMOE_WITH_NCCL=OFF"
if [ -x /usr/local/cuda/bin/nvcc ]; then
    gpu="-DDSMOE_WITH_CUDA=ON -DDSMOE_WITH_NCCL=AUTO -DCUDAToolkit_ROOT=/usr/local/cuda"
fi
# shellcheck disable=SC2086 # $gpu is a list of options
cmake -S "$src" -B /tmp/dsmoe-build -DCMAKE_BUILD_TYPE=Release -DBUILD_TESTING=OFF \
      -DCMAKE_INSTALL_PREFIX="$prefix" -DDSMOE_CPU_ARCH="${DSMOE_CPU_ARCH:-x86-64-v3}" \
      -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-80;90}" $gpu
cmake --build /tmp/dsmoe-build -j"$(nproc)"
cmake --install /tmp/dsmoe-build
rm -rf /tmp/dsmoe-build "$src"
apt-get clean
rm -rf /var/lib/apt/lists/*
"$prefix/bin/dsmoe" --config
