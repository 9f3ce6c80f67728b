#!/usr/bin/env bash
# NVIDIA DALI and the packages it needs, carried to a GPU machine whose image lacks them
# and which cannot download. One call there carries at most 64 MiB with the working tree,
# so the wheels (269 MB; 248 MB as one xz-compressed tar) travel as numbered parts of that
# archive, a call each: four parts.
#
#   here:   benchmarks/gpu-wheels.sh pack [WHEEL_DIR]
#             downloads DALI and its dependencies at this environment's versions, for
#             Python 3.12 on x86-64 Linux, into /tmp/gpu-wheels (or takes WHEEL_DIR's
#             wheels), and splits them into .gpuwheels/part-NN (git-ignored), 60 MiB each
#   there:  benchmarks/gpu-wheels.sh stash .gpuwheels/part-NN     one call per part, that
#             part named in the call's `carry`; moves it out of the tree, where it stays
#             while the machine is warm
#   there:  benchmarks/gpu-wheels.sh join
#             joins the parts, checks every wheel's SHA-256 and prints the folder to pass
#             as WHEELS= to benchmarks/gpu-check.sh
#
# PART_BYTES overrides the part size (tests use small parts); PARTS_DIR and JOINED_DIR the
# folders used on the GPU machine.
set -euo pipefail
PY=${PYTHON:-.venv/bin/python}
PART_BYTES=${PART_BYTES:-$((60 * 1024 * 1024))}
PARTS_DIR=${PARTS_DIR:-/tmp/gpu-wheel-parts}
JOINED_DIR=${JOINED_DIR:-/tmp/gpu-wheels-joined}
# DALI's requirements that the GPU image does not hold (its package list, read 2026-11-17)
PACKAGES="nvidia-dali-cuda130 astunparse gast libcst makefun nvtx optree nvidia-libnvcomp-cu13
  nvidia-nvimgcodec-cu13 nvidia-nvjpeg nvidia-nvjpeg2k-cu13 nvidia-nvtiff-cu13"

pack() {
  local wheels=${1:-}
  if [ -z "$wheels" ]; then
    wheels=/tmp/gpu-wheels
    rm -rf "$wheels"
    # shellcheck disable=SC2086  # one name per word
    pins=$("$PY" -c 'import sys, importlib.metadata as m
print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $PACKAGES)
    # shellcheck disable=SC2086
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$wheels" $pins
  fi
  if [ -d .git/info ] && ! grep -qx '/.gpuwheels/' .git/info/exclude 2>/dev/null; then
    echo '/.gpuwheels/' >> .git/info/exclude  # the parts never enter the repository
  fi
  rm -rf .gpuwheels
  mkdir -p .gpuwheels
  local sums names
  sums=$(mktemp -d)
  names=$(cd "$wheels" && ls -- *.whl)
  (cd "$wheels" && sha256sum -- *.whl) > "$sums/SHA256SUMS"
  # shellcheck disable=SC2086  # wheel names have no spaces
  tar cf - -C "$wheels" $names -C "$sums" SHA256SUMS | xz -6 -T0 |
    split -b "$PART_BYTES" -d -a 2 - .gpuwheels/part-
  rm -rf "$sums"
  ls -l .gpuwheels
  echo "$(ls .gpuwheels | wc -l) part(s): carry each in a call of its own"
}

stash() {
  mkdir -p "$PARTS_DIR"
  mv -- "$@" "$PARTS_DIR"/
  ls -l "$PARTS_DIR"
}

join() {
  rm -rf "$JOINED_DIR"
  mkdir -p "$JOINED_DIR"
  cat "$PARTS_DIR"/part-* | xz -d | tar xf - -C "$JOINED_DIR"
  (cd "$JOINED_DIR" && sha256sum --quiet -c SHA256SUMS)
  echo "WHEELS=$JOINED_DIR"
}

case ${1:-} in
  pack | stash | join) "$@" ;;
  *) echo "usage: benchmarks/gpu-wheels.sh pack [WHEEL_DIR] | stash PART... | join" >&2; exit 2 ;;
esac
