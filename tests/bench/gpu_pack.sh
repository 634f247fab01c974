#!/bin/sh
# Packs what a device call needs beside the tree into .devpack/pack.tar.xz: the named binaries of a
# CUDA build and the libraries the GPU machine lacks (.devlibs, ../shared/device/pack-libs.sh).
# MPICH's library alone is 41 MB of the 64 MiB a call carries, so they travel compressed (xz: about
# a fifth). On the device: `tar -xJf .devpack/pack.tar.xz` in the tree puts BUILD/bin and .devlibs
# where tests/bench/gpu_devrun.sh expects them.
# usage: sh tests/bench/gpu_pack.sh [BUILD_DIR [BIN...]]   (carry [".devpack"])
set -eu
cd "$(dirname "$0")/../.."
B=${1:-build-gpu}
[ $# -gt 0 ] && shift
bins=${*:-mill test_comm st_diff test_model_cuda test_cuda_ops}
[ -f .devlibs/libzmq.so.5 ] || sh ../shared/device/pack-libs.sh
rm -rf .devpack
mkdir -p ".devpack/stage/$B/bin"
for b in $bins; do cp "$B/bin/$b" ".devpack/stage/$B/bin/"; done
cp -r .devlibs .devpack/stage/
tar -C .devpack/stage -cf - . | xz -T2 -6 > .devpack/pack.tar.xz
rm -rf .devpack/stage
grep -qx '/.devpack/' .git/info/exclude 2>/dev/null || echo '/.devpack/' >> .git/info/exclude
echo "packed $(du -h .devpack/pack.tar.xz | cut -f1): $B/bin/{$(echo $bins | tr ' ' ',')} and .devlibs"
