#!/usr/bin/env bash
# Installs what dsmoe needs to build and test on Debian 12 (as root), and nothing when it is all there.
# Sourced by scripts/quickstart and scripts/test.
set -euo pipefail

DSMOE_PACKAGES=(build-essential cmake pkg-config openmpi-bin libopenmpi-dev libhwloc-dev hwloc
                libcmocka-dev libopenblas-dev libdnnl-dev procps)
# scripts/test adds what only the tests need (DSMOE_EXTRA_PACKAGES).
DSMOE_PACKAGES+=(${DSMOE_EXTRA_PACKAGES[@]+"${DSMOE_EXTRA_PACKAGES[@]}"})

dsmoe_missing_packages() {
  local missing=()
  for p in "${DSMOE_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  echo "${missing[@]:-}"
}

missing=$(dsmoe_missing_packages)
if [ -n "$missing" ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "dsmoe: missing packages: $missing (run as root, or: sudo apt-get install $missing)" >&2
    exit 1
  fi
  echo "dsmoe: installing $missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 --no-install-recommends $missing
fi

# Open MPI refuses to run as root unless told; batch systems run jobs as users, a fresh VM as root.
if [ "$(id -u)" = 0 ]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
