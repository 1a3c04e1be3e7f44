#!/usr/bin/env bash
# Install the Debian 12 packages stargzfs needs to build, test and demo.
#
# Idempotent: when every package is already installed this is a fast no-op (no apt-get update).
# Otherwise it runs `apt-get update` once and installs only what is missing.
# Uses sudo only when not root. Prints what it does on stderr.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

PACKAGES=(
  # build pyfuse3 (no wheels): compiler, libc and Python headers, libfuse3 via pkg-config
  gcc libc6-dev python3-dev pkg-config libfuse3-dev
  # apply stargzfs's pyfuse3 patch (scripts/build-pyfuse3.sh)
  patch
  # runtime: fusermount3
  fuse3
  # the project's virtualenv and the Makefile itself
  python3 python3-venv make
  # tests and demo: a real registry (distribution 2.8), pushing OCI layouts, HTTP checks
  docker-registry skopeo curl ca-certificates
)

missing=()
for pkg in "${PACKAGES[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [ "$status" = "installed" ] || missing+=("$pkg")
done

if [ "${#missing[@]}" -eq 0 ]; then
  exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "install-system-deps: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
  SUDO=(sudo --preserve-env=DEBIAN_FRONTEND)
fi

echo "install-system-deps: installing ${missing[*]}" >&2
"${SUDO[@]}" apt-get update -q
"${SUDO[@]}" apt-get install -y -q "${missing[@]}"
