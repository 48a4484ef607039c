#!/usr/bin/env bash
# The tools that check the Arm kernels on an x86 machine (tests/unit/test_kernel_variants.py): Debian's aarch64
# cross compiler and qemu-user. Installed once per machine where apt-get can (root); elsewhere those tests are
# skipped, and this says why. Never fails the build by itself.
set -u
[ "$(uname -m)" = x86_64 ] || exit 0
if command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 && command -v qemu-aarch64 >/dev/null 2>&1; then
  exit 0
fi
packages="gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing the Arm cross compiler and qemu-user for the kernel tests (once per machine)" >&2
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq $packages >/dev/null 2>&1; then
    apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $packages >/dev/null 2>&1 \
      || echo "could not install $packages: the Arm kernel tests will be skipped" >&2
  fi
else
  echo "$packages are not installed and apt-get needs root: the Arm kernel tests will be skipped" >&2
fi
exit 0
