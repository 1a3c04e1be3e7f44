#!/usr/bin/env bash
# Install pyfuse3 3.5.0 with stargzfs's patch (scripts/pyfuse3-3.5.0.patch) into a venv.
#
# The patch lets the kernel open files and directories without asking the daemon and cache
# directory listings and symlink targets (stargzfs/fuse/operations.py says how). stargzfs
# works with a stock pyfuse3 too, with ~100 more FUSE round trips per
# `python3 -c 'import json'` in a mounted image: if the build fails (offline, no compiler),
# this says so and leaves the venv to a stock pyfuse3.
#
# usage: scripts/build-pyfuse3.sh VENV_PYTHON
# The wheel is built once (~40 s: sdist from PyPI, its sha256 checked, Cython) and cached
# under ${XDG_CACHE_HOME:-~/.cache}/stargzfs-build, keyed by the patch, the build pins and the
# Python version.
# A no-op when the venv already has it: the installed version names the patch it was built
# with (3.5.0+stargzfs.<patch sha256 prefix>), so a changed patch is rebuilt.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VERSION=3.5.0
SDIST_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PATCH=$here/pyfuse3-$VERSION.patch
# What pyfuse3's build needs (its pyproject: setuptools>=78.1.1, setuptools_scm>=8, Cython),
# pinned: Cython regenerates the C the patch changes, and a future one could refuse it.
BUILD_PINS="Cython==3.3.1 setuptools==84.2.1 setuptools_scm==10.3.4"
key=$( (cat "$PATCH"; echo "$BUILD_PINS") | sha256sum | cut -c1-12)  # a new pin rebuilds too
PATCHED_VERSION=$VERSION+stargzfs.$key

if [ "${1:-}" = "--build-into" ]; then  # internal: build the wheel into $3 with python $2
  PY=$2 out=$3
  PIP=("$PY" -m pip --disable-pip-version-check -q)
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "${PIP[@]}" download --no-deps --no-binary pyfuse3 -d "$work" "pyfuse3==$VERSION"
  sdist=$work/pyfuse3-$VERSION.tar.gz
  echo "$SDIST_SHA256  $sdist" | sha256sum -c --quiet -
  tar -xzf "$sdist" -C "$work"
  src=$work/pyfuse3-$VERSION
  patch -s -p0 -d "$src" <"$PATCH"
  sed -i "s/^Version: .*/Version: $PATCHED_VERSION/" "$src/PKG-INFO"
  rm -f "$src/src/pyfuse3/__init__.c"  # generated from the sources we patched
  printf '%s\n' $BUILD_PINS >"$work/build-pins.txt"
  # pip installs the isolated build environment under these constraints too (PIP_CONSTRAINT
  # up to pip 25.2, PIP_BUILD_CONSTRAINT from 25.3 on; each ignores the other).
  PIP_CONSTRAINT=$work/build-pins.txt PIP_BUILD_CONSTRAINT=$work/build-pins.txt \
    "${PIP[@]}" wheel --no-deps -w "$work/dist" "$src"
  built=$(find "$work/dist" -name 'pyfuse3-*.whl' | head -n 1)
  mkdir -p "$out"
  # Concurrent builders: each renames its own complete file into place.
  cp "$built" "$out/.$$.tmp" && mv "$out/.$$.tmp" "$out/$(basename "$built")"
  exit 0
fi

PY=${1:?usage: build-pyfuse3.sh VENV_PYTHON}
patched() {  # from the metadata: importing pyfuse3 needs trio, maybe not installed yet
  "$PY" -c 'import sys, importlib.metadata as m
try:
    sys.exit(m.version("pyfuse3") != sys.argv[1])
except m.PackageNotFoundError:
    sys.exit(1)' "$PATCHED_VERSION"
}
patched && exit 0

pytag=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
cache=${XDG_CACHE_HOME:-$HOME/.cache}/stargzfs-build/pyfuse3-$VERSION-$key-$pytag
wheel=$(find "$cache" -maxdepth 1 -name 'pyfuse3-*.whl' 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "build-pyfuse3: building pyfuse3 $PATCHED_VERSION (scripts/pyfuse3-$VERSION.patch)" >&2
  if ! "$here/build-pyfuse3.sh" --build-into "$PY" "$cache"; then
    echo "build-pyfuse3: WARNING: the build failed; a stock pyfuse3 will be installed" \
      "(mounts work, warm runs make more FUSE round trips)" >&2
    exit 0
  fi
  wheel=$(find "$cache" -maxdepth 1 -name 'pyfuse3-*.whl' | head -n 1)
fi
"$PY" -m pip --disable-pip-version-check -q install "$wheel"  # replaces a stock one; brings trio
"$PY" -c 'import sys, pyfuse3
sys.exit("fh_is_inode" not in getattr(pyfuse3, "STARGZFS_EXTENSIONS", ()))' || {
  echo "build-pyfuse3: $wheel installed but pyfuse3 is not the patched one" >&2
  exit 1
}
