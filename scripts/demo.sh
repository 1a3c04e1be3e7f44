#!/usr/bin/env bash
# stargzfs demo: a throwaway local registry with the shared 2-layer eStargz fixture image in it.
#
#   1. start Debian's docker-registry (distribution 2.8) on a free 127.0.0.1 port, temp storage
#   2. push ../shared/fixtures/oci-image (tag v1) with skopeo, keeping every digest
#   3. read the manifest back over HTTP and check its digest
#   4. look inside without pulling: stargzfs layers / ls / cat
#   5. mount the image lazily with stargzfs, list it, copy a file out, show what was fetched
#   6. a real image from this machine's files (dash, ls, their libraries): push it, convert it
#      to eStargz with dash prioritized, mount it and run dash inside it (chroot, as root)
#   7. unmount, stop the registry and delete its data (always, on any exit)
#
# Needs docker-registry, skopeo, curl, python3: `make demo` installs them first.
# Override the fixture location with STARGZFS_FIXTURES=/path/to/fixtures.
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
fixtures=${STARGZFS_FIXTURES:-$repo_root/../shared/fixtures}
layout=$(realpath -m "$fixtures/oci-image")
image_repo=demo/fixture
tag=v1
oci_accept='application/vnd.oci.image.manifest.v1+json'

say() { printf '\n== %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

stargzfs=${STARGZFS:-$repo_root/.venv/bin/stargzfs}
[ -x "$stargzfs" ] || die "$stargzfs not found: run make test (or make venv) first"

for tool in docker-registry skopeo curl python3 sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool not found: run scripts/install-system-deps.sh (or make demo)"
done

workdir=$(mktemp -d "${TMPDIR:-/tmp}/stargzfs-demo.XXXXXX")
registry_pid=""
cleanup() {
  if [ -d "$workdir/mnt" ] && grep -qs " $workdir/mnt " /proc/mounts; then
    "$stargzfs" umount "$workdir/mnt" && echo "   unmounted"
  fi
  if [ -n "$registry_pid" ] && kill -0 "$registry_pid" 2>/dev/null; then
    kill "$registry_pid" 2>/dev/null || true
    wait "$registry_pid" 2>/dev/null || true
    echo "   registry stopped"
  fi
  rm -rf "$workdir"
}
trap cleanup EXIT

# -- 1. registry ---------------------------------------------------------------------------------
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
host=127.0.0.1:$port
mkdir -p "$workdir/storage"
cat >"$workdir/config.yml" <<EOF
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: "$workdir/storage"
  delete:
    enabled: true
http:
  addr: "$host"
EOF

say "1. starting docker-registry on $host (data in $workdir/storage)"
(
  # REGISTRY_* variables (e.g. REGISTRY_AUTH_FILE) would override the registry's config.
  for var in $(compgen -e); do [[ $var == REGISTRY_* ]] && unset "$var"; done
  exec docker-registry serve "$workdir/config.yml"
) >"$workdir/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 1 500); do
  if curl -fsS -o /dev/null "http://$host/v2/" 2>/dev/null; then break; fi
  kill -0 "$registry_pid" 2>/dev/null || { cat "$workdir/registry.log" >&2; die "registry exited"; }
  sleep 0.01
done
curl -fsS -o /dev/null "http://$host/v2/" || { cat "$workdir/registry.log" >&2; die "registry not ready"; }
echo "   GET http://$host/v2/ -> 200"

# -- 2. push ---------------------------------------------------------------------------------------
if [ ! -f "$layout/index.json" ]; then
  say "2. fixture image not found at $layout: nothing to push"
  echo "   (set STARGZFS_FIXTURES to the shared fixtures directory to see the rest of the demo)"
  exit 0
fi
say "2. pushing oci:$layout:$tag -> $host/$image_repo:$tag"
skopeo --insecure-policy copy --quiet --preserve-digests --dest-tls-verify=false --dest-no-creds \
  "oci:$layout:$tag" "docker://$host/$image_repo:$tag"
echo "   pushed"

# -- 3. read back ----------------------------------------------------------------------------------
say "3. reading the manifest back: GET /v2/$image_repo/manifests/$tag"
curl -fsS -H "Accept: $oci_accept" -D "$workdir/headers" -o "$workdir/manifest.json" \
  "http://$host/v2/$image_repo/manifests/$tag"
served=$(sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: *\([^[:space:]]*\).*/\1/p' "$workdir/headers")
computed=sha256:$(sha256sum "$workdir/manifest.json" | cut -d' ' -f1)
expected=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"])' \
  "$layout/index.json")
echo "   served digest:   $served"
echo "   computed digest: $computed"
echo "   layout digest:   $expected"
[ "$served" = "$computed" ] && [ "$computed" = "$expected" ] || die "manifest digests differ"
python3 - "$workdir/manifest.json" <<'EOF'
import json, sys
manifest = json.load(open(sys.argv[1]))
print(f"   manifest {manifest['mediaType']}, {len(manifest['layers'])} layers:")
for layer in manifest["layers"]:
    toc = layer.get("annotations", {}).get("containerd.io/snapshot/stargz/toc.digest", "none")
    print(f"     {layer['digest'][:19]}...  {layer['size']:>6} B  eStargz TOC {toc[:19]}...")
EOF

# -- 4. look inside without pulling ----------------------------------------------------------------
ref=$host/$image_repo:$tag
say "4. stargzfs layers $ref"
"$stargzfs" layers "$ref"
say "   stargzfs ls -l $ref /usr/bin"
"$stargzfs" ls -l "$ref" /usr/bin
say "   stargzfs cat $ref /etc/passwd"
"$stargzfs" cat "$ref" /etc/passwd

# -- 5. mount --------------------------------------------------------------------------------------
mkdir -p "$workdir/mnt" "$workdir/out"
say "5. stargzfs mount $ref $workdir/mnt"
"$stargzfs" mount "$ref" "$workdir/mnt" --cache-dir "$workdir/cache"
echo "   mounted; find $workdir/mnt | head:"
(cd "$workdir/mnt" && find . | sort | head -15 | sed 's/^/     /')
cp "$workdir/mnt/usr/lib/libdemo.so.1" "$workdir/out/"
echo "   copied usr/lib/libdemo.so.1 out: $(sha256sum "$workdir/out/libdemo.so.1" | cut -c1-16)..."
say "   stargzfs stats $workdir/mnt"
"$stargzfs" stats "$workdir/mnt"
"$stargzfs" umount "$workdir/mnt"
echo "   unmounted"

# -- 6. a real image from this machine's files: push, convert to eStargz, run a program lazily ----
rootfs=$workdir/rootfs
say "6. building a rootfs from this machine's files: dash, ls and their shared libraries"
mkdir -p "$rootfs/usr/bin" "$rootfs/etc"
for prog in /bin/dash /bin/ls; do
  cp -L "$prog" "$rootfs/usr/bin/"
  for lib in $(ldd "$prog" | grep -o '/[^ ]*'); do
    mkdir -p "$rootfs$(dirname "$lib")"
    cp -L "$lib" "$rootfs$lib"
  done
done
cp /etc/os-release "$rootfs/etc/"
ln -s usr/bin "$rootfs/bin"
echo "   $(find "$rootfs" | wc -l) entries, $(du -sh "$rootfs" | cut -f1)"
plain=$host/demo/machine:plain
esgz=$host/demo/machine:esgz
say "   stargzfs push dir-rootfs:$rootfs $plain"
"$stargzfs" push -q "dir-rootfs:$rootfs" "$plain"
printf 'usr/bin/dash\n' >"$workdir/prioritize.txt"
say "   stargzfs convert $plain $esgz --prioritize (usr/bin/dash first)"
echo "   digest $("$stargzfs" convert -q "$plain" "$esgz" --prioritize "$workdir/prioritize.txt")"
"$stargzfs" layers "$esgz"
say "   mount $esgz and run a program inside it (chroot, as root)"
"$stargzfs" mount "$esgz" "$workdir/mnt" --cache-dir "$workdir/cache"
if [ "$(id -u)" -eq 0 ]; then
  chroot "$workdir/mnt" /bin/dash -c \
    'echo "   hello from $(. /etc/os-release; echo "$PRETTY_NAME") in a lazily mounted image"; ls -l /usr/bin' \
    | sed 's/^-/   -/'
else
  echo "   (not root: skipping chroot)"; ls -l "$workdir/mnt/usr/bin"
fi
"$stargzfs" stats "$workdir/mnt"
"$stargzfs" umount "$workdir/mnt"
echo "   unmounted"

say "done: the registry stops and its data is deleted now"
