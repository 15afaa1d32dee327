#!/usr/bin/env bash
# Installs, from Debian 12's archive, everything mapl's build, tests, benchmarks and demo need
# (clang-14: the thread-safety build, CMake preset "tsa").
# Idempotent: packages already present are skipped, and apt is not touched when nothing is missing.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config git
  clang-14
  libabsl-dev libopenblas-dev libxxhash-dev
  libprotobuf-dev protobuf-compiler libgrpc++-dev protobuf-compiler-grpc
  libgtest-dev libgmock-dev libbenchmark-dev
  pybind11-dev python3-dev python3-numpy python3-pytest
  prometheus-cpp-dev libucx-dev
  python3-faiss python3-torch python3-matplotlib
  bible-kjv iperf3
  openssl gdb
  python3-yaml
)
# Tools wanted as commands (tests/k8s/check_manifests.sh): package=command. The package is
# installed only when the command is missing, so a kubectl or node from another source (the
# Kubernetes apt repository, NodeSource's nodejs, which bundles npm) is left alone. The
# manifests need kustomize v5 (kubectl 1.27+); Debian 12's kubernetes-client 1.20 only stands
# in until a newer kubectl is installed, and the check says so.
TOOLS=(kubernetes-client=kubectl nodejs=node npm=npm)

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
for t in "${TOOLS[@]}"; do
  if ! command -v "${t#*=}" >/dev/null 2>&1; then
    missing+=("${t%%=*}")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all ${#PACKAGES[@]} packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-deps: need root (or sudo) to install: ${missing[*]}" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "install-deps: done"
