#!/usr/bin/env bash
# Builds mapl's container image (the top-level Dockerfile) with buildah, without a registry:
# the base image debian:bookworm-slim is made here from Debian's archive (debootstrap, minbase)
# and kept in buildah's storage, so a second run skips it. Needs root.
#
#   bash deploy/image.sh            # mapl:latest (the daemon, its health probe, the Python package)
#   bash deploy/image.sh --trainer  # and mapl-trainer:latest (adds PyTorch and examples/)
#
# buildah runs with chroot isolation and vfs storage (no overlay, no user namespaces: works in a
# container or VM without either); override with BUILDAH_ISOLATION / STORAGE_DRIVER. The Debian
# mirror is the one apt uses here (MAPL_DEBIAN_MIRROR overrides it).
set -euo pipefail
cd "$(dirname "$0")/.."
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
IMAGE=${MAPL_IMAGE:-mapl:latest}
TRAINER_IMAGE=${MAPL_TRAINER_IMAGE:-mapl-trainer:latest}
BASE=localhost/debian:bookworm-slim
JOBS=${MAPL_IMAGE_JOBS:-2}
trainer=0
for arg in "$@"; do
  case "$arg" in
    --trainer) trainer=1 ;;
    *) echo "usage: $0 [--trainer]" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { echo "image.sh: needs root (buildah with chroot isolation)" >&2; exit 1; }

phase_start=$(date +%s)
phase() {  # phase NAME: prints how long the phase since the last call took
  local now; now=$(date +%s)
  echo "image.sh: $1: $((now - phase_start)) s"
  phase_start=$now
}

# ---- tools ----
missing=()
command -v buildah >/dev/null || missing+=(buildah)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if [ ${#missing[@]} -gt 0 ]; then
  echo "image.sh: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
phase tools

# ---- the base image ----
# debian:bookworm-slim as Debian's own images are made: a minbase debootstrap, the archive's three
# suites in debian.sources, and dpkg told to leave out documentation, manuals and locales.
# Tagged localhost/debian:bookworm-slim: with --pull=never buildah resolves the Dockerfile's short
# name "debian:bookworm-slim" to it.
mirror() {
  if [ -n "${MAPL_DEBIAN_MIRROR:-}" ]; then echo "$MAPL_DEBIAN_MIRROR"; return; fi
  local uri
  uri=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources \
            /etc/apt/sources.list.d/*.list 2>/dev/null |
        grep -v '^\s*#' | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ') || true
  echo "${uri:-http://deb.debian.org/debian}"
}
if buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  echo "image.sh: base image $BASE present: kept"
else
  work=$(mktemp -d /var/tmp/mapl-base-XXXXXX)
  trap 'rm -rf "$work"' EXIT
  m=$(mirror); m=${m%/}
  echo "image.sh: debootstrap bookworm from $m"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$m" >"$work/debootstrap.log" 2>&1 ||
    { tail -n 30 "$work/debootstrap.log"; exit 1; }
  root=$work/rootfs
  rm -f "$root/etc/apt/sources.list"
  cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $m
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: ${m%/debian}/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/en*
EOF
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$root/usr/share/man/"* "$root/usr/share/info/"* "$root/usr/share/locale/"*
  rm -rf "$root/var/lib/apt/lists/"* "$root/var/cache/apt/"*.bin \
         "$root/var/cache/apt/archives/"*.deb "$root/var/log/"*.log "$root/var/log/apt/"*
  tar -C "$root" --numeric-owner -cf "$work/rootfs.tar" .
  # debootstrap takes bookworm's point release; the updates and security fixes since come from
  # the two other suites (squashed into one layer, as Debian's images are).
  cat >"$work/Containerfile" <<'EOF'
FROM scratch
ADD rootfs.tar /
RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get upgrade -y \
 && apt-get clean && rm -rf /var/lib/apt/lists/*
CMD ["bash"]
EOF
  phase debootstrap
  buildah bud --pull=never --format docker --squash -q -t "$BASE" \
    -f "$work/Containerfile" "$work" >/dev/null
  rm -rf "$work"
  trap - EXIT
  phase "base image import"
fi

# ---- mapl's images ----
# --layers: each instruction's result is cached, so a rebuild after a source change starts at
# COPY (the build dependencies stay installed). The build stage is tagged (mapl-build:latest) so
# that its cached layers are not dangling; vfs stores every layer as a full copy, and the images
# a rebuild leaves behind are pruned below.
bud=(buildah bud --pull=never --format docker --layers --build-arg "JOBS=$JOBS")
"${bud[@]}" --target build -t mapl-build:latest .
phase "build stage (compile, package)"
"${bud[@]}" --target runtime -t "$IMAGE" .
phase "image $IMAGE"
if [ "$trainer" = 1 ]; then
  "${bud[@]}" --target trainer -t "$TRAINER_IMAGE" .
  phase "image $TRAINER_IMAGE"
fi
buildah rmi --prune >/dev/null 2>&1 || true
buildah images
