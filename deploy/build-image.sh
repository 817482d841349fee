#!/usr/bin/env bash
# Build the raftbridge container image without any registry (no `docker pull`).
#
# The binary links glibc dynamically, so this script stages a minimal root filesystem: the release
# binary, the shared libraries `ldd` reports plus the dynamic loader, /etc/passwd and /etc/group
# with the user raftbridge (uid/gid 10001), /etc/nsswitch.conf (`hosts: files dns`, so glibc
# resolves names such as the compose alias `raftbridge`), and /data owned by that user. Then
# `docker build` turns deploy/Dockerfile (FROM scratch) into the image.
#
# Usage: deploy/build-image.sh [TAG]          (default tag raftbridge:dev)
# Env:   RAFTBRIDGE_BIN      the binary to pack (default target/release/raftbridge, built first);
#                            set, it is packed as is (no cargo build), e.g. the binary a chaos
#                            run names (deploy/chaos/run --mode docker)
#        SKIP_CARGO_BUILD=1  reuse target/release/raftbridge as is (no cargo build)
#        CARGO_TARGET_DIR    honoured when locating the binary
set -euo pipefail

tag="${1:-raftbridge:dev}"
repo="$(cd "$(dirname "$0")/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$repo/target}"
bin="${RAFTBRIDGE_BIN:-$target_dir/release/raftbridge}"

# A given RAFTBRIDGE_BIN is what goes in the image: building target/release would not change it.
if [[ "${SKIP_CARGO_BUILD:-0}" != 1 && -z "${RAFTBRIDGE_BIN:-}" ]]; then
  echo "build-image: cargo build --release (no-op when target/release is fresh)"
  (cd "$repo" && cargo build --release --locked --bin raftbridge)
fi
[[ -x "$bin" ]] || { echo "build-image: $bin missing; run cargo build --release" >&2; exit 1; }

ctx="$(mktemp -d "${TMPDIR:-/tmp}/raftbridge-image.XXXXXX")"
trap 'rm -rf "$ctx"' EXIT
root="$ctx/rootfs"
mkdir -p "$root/etc" "$root/tmp" "$ctx/data"
# The data dir holds every stored value in clear: its user only (the node warns otherwise).
chmod 700 "$ctx/data"

# The binary, stripped of debug info (line tables are useful for backtraces but triple the size;
# keep them with KEEP_DEBUG=1).
if [[ "${KEEP_DEBUG:-0}" == 1 ]] || ! command -v strip >/dev/null 2>&1; then
  cp "$bin" "$root/raftbridge"
else
  strip --strip-debug -o "$root/raftbridge" "$bin"
fi

# Shared libraries and the loader, at the paths the binary expects. The glibc NSS modules for
# files/dns are built into libc since glibc 2.34; on older hosts they are separate libraries, so
# copy them (and their dependencies) when they exist.
libs=("$bin")
for extra in libnss_files.so.2 libnss_dns.so.2 libresolv.so.2; do
  for dir in /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /lib64 /usr/lib64 /lib /usr/lib; do
    if [[ -e "$dir/$extra" ]]; then libs+=("$dir/$extra"); break; fi
  done
done
copy_lib() { # copy a file keeping its absolute path; resolve symlinks to the real file
  local src="$1"
  mkdir -p "$root$(dirname "$src")"
  cp -L "$src" "$root$src"
}
for f in "${libs[@]}"; do
  [[ "$f" == "$bin" ]] || copy_lib "$f"
  # ldd runs on its own first: inside the process substitution below its failure would go
  # unnoticed (set -e does not see it) and the image would lack every library. One failure is
  # expected: a static binary, for which glibc's ldd says "not a dynamic executable" and exits 1
  # (a static-pie one: "statically linked", exit 0); it needs no libraries, as before. ldd says
  # the same of a file that is no ELF binary at all, hence the check of the ELF magic.
  if ! deps="$(LC_ALL=C ldd "$f" 2>"$ctx/ldd.err")"; then
    if [[ "$f" == "$bin" && "$(od -An -N4 -c "$f" | tr -d ' ')" == '177ELF' ]] \
      && grep -q 'not a dynamic executable' "$ctx/ldd.err"; then
      echo "build-image: $bin is statically linked: no shared libraries to copy"
      deps=""
    else
      echo "build-image: ldd $f failed: $(cat "$ctx/ldd.err")" >&2
      exit 1
    fi
  fi
  # `ldd` lines: "libc.so.6 => /lib/.../libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
  while read -r lib; do
    [[ -n "$lib" && -e "$root$lib" ]] || copy_lib "$lib"
  done < <(awk '/=> \// { print $3; next } /^[[:space:]]*\// { print $1 }' <<<"$deps")
done

cat > "$root/etc/passwd" <<'PASSWD'
root:x:0:0:root:/:/sbin/nologin
raftbridge:x:10001:10001:raftbridge:/data:/sbin/nologin
PASSWD
cat > "$root/etc/group" <<'GROUP'
root:x:0:
raftbridge:x:10001:
GROUP
printf 'hosts: files dns\n' > "$root/etc/nsswitch.conf"
# Docker and Kubernetes bind-mount /etc/hosts and /etc/resolv.conf over these placeholders.
: > "$root/etc/hosts"
: > "$root/etc/resolv.conf"
chmod 1777 "$root/tmp"

cp "$repo/deploy/Dockerfile" "$ctx/Dockerfile"
echo "build-image: rootfs $(du -sh "$root" | cut -f1), building $tag"
previous="$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)"
# The legacy builder is enough for a FROM scratch image and needs no buildx plugin.
DOCKER_BUILDKIT="${DOCKER_BUILDKIT:-0}" docker build -q -t "$tag" "$ctx" >/dev/null
current="$(docker image inspect -f '{{.Id}}' "$tag")"
if [[ -n "$previous" && "$previous" != "$current" ]]; then
  # Drop the image this tag pointed to before, unless a container still uses it.
  docker rmi "$previous" >/dev/null 2>&1 || true
fi
echo "build-image: $tag $(docker image inspect -f '{{.Size}}' "$tag" | awk '{ printf "%.1f MB", $1/1e6 }')"
