#!/usr/bin/env bash
# Install pyfuse3 3.5.0 with stargzfs's patch (scripts/pyfuse3-3.5.0.patch) into a venv.
#
# The patch lets the kernel open files and directories without asking the daemon and cache
# directory listings and symlink targets (stargzfs/fuse/operations.py says how). stargzfs
# works with a stock pyfuse3 too, with ~100 more FUSE round trips per
# `python3 -c 'import json'` in a mounted image.
#
# usage: scripts/build-pyfuse3.sh VENV_PYTHON
# The wheel is built once (~40 s: sdist from PyPI, its sha256 checked, Cython) and cached
# under ${XDG_CACHE_HOME:-~/.cache}/stargzfs-build, keyed by the patch and the Python version.
# A no-op when the venv already has it.
set -euo pipefail
PY=${1:?usage: build-pyfuse3.sh VENV_PYTHON}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VERSION=3.5.0
SDIST_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PATCH=$here/pyfuse3-$VERSION.patch
PIP=("$PY" -m pip --disable-pip-version-check -q)

# The patch sets this version (PKG-INFO); bump both when the patch changes.
PATCHED_VERSION=$VERSION+stargzfs1

patched() {  # from the metadata: importing pyfuse3 needs trio, maybe not installed yet
  "$PY" -c 'import sys, importlib.metadata as m
try:
    sys.exit(m.version("pyfuse3") != sys.argv[1])
except m.PackageNotFoundError:
    sys.exit(1)' "$PATCHED_VERSION"
}
patched && exit 0

key=$(sha256sum <"$PATCH" | cut -c1-12)
pytag=$("$PY" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
cache=${XDG_CACHE_HOME:-$HOME/.cache}/stargzfs-build/pyfuse3-$VERSION-$key-$pytag
wheel=$(find "$cache" -maxdepth 1 -name 'pyfuse3-*.whl' 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "build-pyfuse3: building pyfuse3 $VERSION with scripts/pyfuse3-$VERSION.patch" >&2
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  "${PIP[@]}" download --no-deps --no-binary pyfuse3 -d "$work" "pyfuse3==$VERSION"
  sdist=$work/pyfuse3-$VERSION.tar.gz
  echo "$SDIST_SHA256  $sdist" | sha256sum -c --quiet -
  tar -xzf "$sdist" -C "$work"
  patch -s -p0 -d "$work/pyfuse3-$VERSION" <"$PATCH"
  rm -f "$work/pyfuse3-$VERSION/src/pyfuse3/__init__.c"  # generated from the sources we patched
  "${PIP[@]}" wheel --no-deps -w "$work/dist" "$work/pyfuse3-$VERSION"
  mkdir -p "$cache"
  built=$(find "$work/dist" -name 'pyfuse3-*.whl' | head -n 1)
  # Concurrent builders: each renames its own complete file into place.
  cp "$built" "$cache/.$$.tmp" && mv "$cache/.$$.tmp" "$cache/$(basename "$built")"
  wheel=$cache/$(basename "$built")
fi
"${PIP[@]}" install "$wheel"  # replaces a stock pyfuse3; brings trio if missing
"$PY" -c 'import sys, pyfuse3
sys.exit("fh_is_inode" not in getattr(pyfuse3, "STARGZFS_EXTENSIONS", ()))' || {
  echo "build-pyfuse3: $wheel installed but pyfuse3 is not the patched one" >&2
  exit 1
}
