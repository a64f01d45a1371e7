#!/usr/bin/env bash
# Build the images of the Docker stack without an image registry, from Debian's own packages:
#   peal-local/python:3.11-bookworm  base: debootstrap minbase of Debian 12 + python3 (3.11) + venv
#   peal-backend:latest              ./Dockerfile on that base, torch and deps from docker/wheelhouse
#   peal-local/label-studio:1.23.2   docker/labelstudio.Dockerfile (pip install label-studio==1.23.2)
#   peal-local/redis:7               docker/redis.Dockerfile (Debian's redis-server)
# The base is made once (skipped when the image exists); the others are docker builds, cached by layer.
# Needs root, a running Docker engine, debootstrap, and network access to Debian's mirror and PyPI
# from the host only (the wheels are fetched by the host's pip, with its certificates and find-links,
# where the CPU torch wheel lies; PyTorch's index is not needed). The builds themselves are offline
# but for the Redis image's apt-get.
# Prints the time of each step and the image sizes.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${PEAL_LOCAL_BASE:-peal-local/python:3.11-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export DOCKER_BUILDKIT=0   # the classic builder: the engine from Debian's docker.io has no buildx plugin
step() { local name=$1; shift; local t0; t0=$(date +%s); "$@"; echo "[build] $name: $(( $(date +%s) - t0 )) s"; }

make_base() {
  if docker image inspect "$BASE" >/dev/null 2>&1; then echo "[build] base $BASE exists, kept"; return; fi
  command -v debootstrap >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap)
  local dir; dir=$(mktemp -d /var/tmp/peal-rootfs.XXXXXX)
  # python3-venv brings ensurepip (pip + setuptools wheels); ca-certificates for pip's TLS
  local rc=0
  nice debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$dir" "$MIRROR" >/dev/null || rc=$?
  if [ $rc = 0 ]; then
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/archives/*.deb
    tar -C "$dir" -c . | docker import \
        -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        -c 'CMD ["python3"]' - "$BASE" >/dev/null || rc=$?
  fi
  # debootstrap mounts /proc and /sys in the new root while it works (a failed one may leave them):
  # never delete across a mount
  umount -l "$dir/proc" "$dir/sys" 2>/dev/null || true
  rm -rf --one-file-system "$dir"
  return $rc
}

# Wheels for the backend image: torch 2.13.0 (the CPU build on pip's find-links) and every dependency,
# so the image builds offline. pip wheel also builds wheels for any dependency published only as sdist.
# Likewise Label Studio's wheels, in its own build context (docker/labelstudio/).
make_wheelhouse() {
  local py=${PYTHON:-python3} stamp
  stamp=$(sha256sum setup.py | cut -c1-16)   # the dependencies are setup.py's: same file, same wheels
  if [ "$(cat docker/wheelhouse/.stamp 2>/dev/null)" = "$stamp" ]; then
    echo "[build] docker/wheelhouse is up to date with setup.py, kept"
  else
    # async-timeout: redis needs it on Python < 3.11.3, which Debian 12's 3.11.2 is; pip resolves the
    # markers for the host's Python, which may be newer
    nice "$py" -m pip wheel -q --wheel-dir docker/wheelhouse torch==2.13.0 . setuptools wheel async-timeout
    rm -f docker/wheelhouse/peal_backend-*.whl   # the image installs the project from its own COPY
    ls docker/wheelhouse/torch-2.13.0+cpu-*.whl >/dev/null  # the CPU build, not PyPI's CUDA one
    echo "$stamp" > docker/wheelhouse/.stamp
  fi
  if [ -f docker/labelstudio/wheelhouse/.complete ]; then
    echo "[build] docker/labelstudio/wheelhouse kept"
  else
    nice "$py" -m pip wheel -q --wheel-dir docker/labelstudio/wheelhouse label-studio==1.23.2 async-timeout
    touch docker/labelstudio/wheelhouse/.complete
  fi
}

step "base image" make_base
step "wheelhouse" make_wheelhouse
step "backend image" nice docker build -q --force-rm -t peal-backend:latest --build-arg BASE_IMAGE="$BASE" \
    --build-arg PIP_OPTIONS="--no-index --find-links /wheels" .
step "label studio image" nice docker build -q --force-rm -t peal-local/label-studio:1.23.2 \
    --build-arg BASE_IMAGE="$BASE" -f docker/labelstudio.Dockerfile docker/labelstudio
# apt-get inside the build: Debian's mirror over plain http, on the host's network
step "redis image" nice docker build -q --force-rm --network host -t peal-local/redis:7 \
    --build-arg BASE_IMAGE="$BASE" - < docker/redis.Dockerfile
docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^(peal-backend:latest|peal-local/)' | sed 's/^/[build] image /'
