#!/usr/bin/env bash
# Builds the service images from deploy/docker/Dockerfile with podman, on a machine without Docker or a
# registry: everything machine-specific lives here, not in the Dockerfile (which stays the one file real
# users build with `docker build`, from the public python image and PyTorch's CPU index).
#
#   deploy/images.sh base     a Debian bookworm base image made with debootstrap (python3, venv, certs),
#                             imported as localhost/wombat-python:3.11-bookworm
#   deploy/images.sh build    the CPU targets materializer, inference, rrhf and gateway on that base
#   deploy/images.sh sizes    prints each image's size
#   deploy/images.sh run ARGS podman run with this machine's runtime and limits (make image-test uses it)
#
# Why each knob (this development machine; a normal Docker host needs none of them):
# - no registry is reachable, so the base comes from Debian's packages through debootstrap;
# - crun refuses this host's hybrid cgroups: containers run with runc;
# - the host cannot raise RLIMIT_NOFILE, and podman's default asks for more than it has: --ulimit;
# - builds run with --isolation chroot and the host's network (pip reaches PyPI and the CPU torch wheel
#   this machine keeps under /opt/wheels, mounted read-only into the build), trusting the host's CA
#   bundle and pip.conf (a TLS-inspecting proxy), also mounted read-only for the build only;
# Requirements: apt-get install podman buildah runc debootstrap (Debian). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-localhost/wombat-python:3.11-bookworm}
TAG=${TAG:-0.1.0-cpu}
TARGETS=${TARGETS:-"materializer inference rrhf gateway"}
WHEELS=${WHEELS:-/opt/wheels}
WORK=${WORK:-.wombat/images}
PODMAN=(podman --runtime /usr/sbin/runc)
ULIMITS=(--ulimit nofile=20000:20000 --ulimit nproc=20000:20000)

need() {
  for tool in "$@"; do
    if ! command -v "$tool" >/dev/null; then
      echo "deploy/images.sh needs $tool: sudo apt-get install -y podman buildah runc debootstrap" >&2
      exit 2
    fi
  done
}

base() {
  need debootstrap podman
  if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
    echo "base image $BASE_IMAGE exists (podman rmi it to rebuild)"
    return
  fi
  local root="$WORK/bookworm-root"
  rm -rf "$root" && mkdir -p "$root"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" \
    http://deb.debian.org/debian
  # The public python image keeps its interpreter at /usr/local/bin/python; so does this base.
  ln -sf /usr/bin/python3 "$root/usr/local/bin/python"
  rm -rf "$root/var/cache/apt/archives"/*.deb "$root/var/lib/apt/lists"/*
  tar -C "$root" -c . | "${PODMAN[@]}" import --change 'CMD ["python3"]' - "$BASE_IMAGE"
  rm -rf "$root"
}

build() {
  need podman
  "${PODMAN[@]}" image exists "$BASE_IMAGE" || base
  local mount=()
  local torch_args="--index-url https://download.pytorch.org/whl/cpu"
  if [ -d "$WHEELS" ] && ls "$WHEELS"/torch-*.whl >/dev/null 2>&1; then
    mount=(--volume "$(realpath "$WHEELS"):/wheels:ro")
    torch_args="--find-links /wheels"  # its 2.13.0+cpu sorts above PyPI's 2.13.0 (the CUDA build)
  fi
  # A machine behind a TLS-inspecting proxy (this one) trusts its CA in the system bundle and points pip
  # at it in /etc/pip.conf: the build sees both, read-only, and the images keep neither.
  if [ -f /etc/pip.conf ]; then
    mount+=(--volume /etc/pip.conf:/etc/pip.conf:ro
            --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro)
  fi
  for target in $TARGETS; do
    echo "building wombat-$target:$TAG"
    "${PODMAN[@]}" build --isolation chroot --network host "${ULIMITS[@]}" "${mount[@]}" \
      --build-arg VARIANT=cpu --build-arg PYTHON_IMAGE="$BASE_IMAGE" --build-arg TORCH_PIP_ARGS="$torch_args" \
      -f deploy/docker/Dockerfile --target "$target" -t "wombat-$target:$TAG" .
  done
}

sizes() {
  for target in $TARGETS; do
    "${PODMAN[@]}" image inspect --format "wombat-$target:$TAG {{.Size}}" "wombat-$target:$TAG"
  done
}

run() {
  need podman
  exec "${PODMAN[@]}" run "${ULIMITS[@]}" "$@"
}

case "${1:-build}" in
  base) base ;;
  build) build ;;
  sizes) sizes ;;
  run) shift; run "$@" ;;
  *) echo "usage: deploy/images.sh base|build|sizes|run" >&2; exit 2 ;;
esac
