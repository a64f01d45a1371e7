#!/usr/bin/env bash
# The Docker sidecar, end to end, on a machine with no image registry (run as root):
#   1. a Docker engine: installs Debian's docker.io, docker-compose and debootstrap if missing, and
#      starts dockerd if none answers;
#   2. the images (scripts/docker_build_local.sh): a Debian 12 + Python 3.11 base made by debootstrap,
#      the backend (./Dockerfile), Label Studio 1.23.2 and Redis; cached (base kept, docker layer cache);
#   3. the stack of docker-compose.yml + docker/compose.local.yml (Label Studio, Redis, backend,
#      training worker) under its own compose project, on free ports;
#   4. scripts/docker_e2e_drive.py, run in the backend image against the published ports: a project of
#      real chest X-rays, the backend connected through Label Studio's API, annotations, then a trained
#      version with every unlabeled task predicted and /next serving the lowest score;
#   5. the image as a plain `docker run` sidecar (/health, /setup, /predict; the HEALTHCHECK turns healthy),
#      and with bad input (a wrong LABEL_STUDIO_URL, MODEL_DIR with no volume, a read-only volume): it
#      stays up, logs the problem and names it on /health and /setup;
#   6. fault drills: the worker stopped mid-training and Redis restarted while a training is queued;
#      the queued training completes once;
#   7. teardown of what this script started (containers, networks, volumes of its compose project, and
#      dockerd if it started it). The images stay: they are the build cache of the next run.
# Exits 0 only if every check passed. PEAL_E2E_SKIP_DRILLS=1 leaves out step 6.
# Needs ../shared/datasets/pneumoniamnist.npz (or PEAL_DATASETS) for the images.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
T_START=$(date +%s)
PROJECT=${PEAL_E2E_PROJECT:-peal-e2e}
DATASETS=${PEAL_DATASETS:-$(cd .. && pwd)/shared/datasets}
say() { echo "[e2e] $*"; }
[ -f "$DATASETS/pneumoniamnist.npz" ] || { say "no $DATASETS/pneumoniamnist.npz: set PEAL_DATASETS"; exit 2; }

# --- 1. the engine ----------------------------------------------------------------------------------
STARTED_DOCKERD=""
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  say "starting dockerd (log: /var/log/peal-e2e-dockerd.log)"
  dockerd >/var/log/peal-e2e-dockerd.log 2>&1 &
  STARTED_DOCKERD=$!
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { say "dockerd did not come up"; tail -20 /var/log/peal-e2e-dockerd.log; exit 1; }
fi

free_port() {  # the first port from $1 on which nothing listens
  local p=$1
  while (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; do p=$((p + 1)); done
  echo "$p"
}
LS_PORT=$(free_port 18080); BACKEND_PORT=$(free_port 19090)
SIDECAR_PORT=$(free_port $((BACKEND_PORT + 1))); BAD_PORT=$(free_port $((SIDECAR_PORT + 1)))
TOKEN=$(head -c 20 /dev/urandom | od -An -tx1 | tr -d ' \n')   # 40 hex characters
export LABEL_STUDIO_API_KEY=$TOKEN LABEL_STUDIO_PASSWORD=$TOKEN PEAL_LABEL_STUDIO_PORT=$LS_PORT PEAL_BACKEND_PORT=$BACKEND_PORT
COMPOSE=(docker-compose -p "$PROJECT" -f docker-compose.yml -f docker/compose.local.yml)
NET=${PROJECT}_default
STATE=$(mktemp -d /tmp/peal-e2e.XXXXXX); chmod 777 "$STATE"   # the driver runs as the image's user
HAD_FILES=""; [ -e files ] && HAD_FILES=1   # docker-compose.yml bind-mounts ./files (created if missing)
EXTRA_CONTAINERS=("$PROJECT-sidecar" "$PROJECT-bad-url" "$PROJECT-bad-nomount" "$PROJECT-bad-ro")
RO_VOLUME=$PROJECT-readonly-models
OK=""

cleanup() {
  local rc=$?
  if [ -z "$OK" ] && docker info >/dev/null 2>&1; then
    say "FAILED (exit $rc): last logs"
    "${COMPOSE[@]}" logs --no-color --tail 60 2>/dev/null || true
  fi
  say "teardown"
  docker rm -f -v "${EXTRA_CONTAINERS[@]}" >/dev/null 2>&1 || true   # -v: their anonymous volumes too
  "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true
  docker volume rm "$RO_VOLUME" >/dev/null 2>&1 || true
  [ -n "$HAD_FILES" ] || rm -rf files
  rm -rf "$STATE"
  if [ -n "$STARTED_DOCKERD" ]; then
    kill "$STARTED_DOCKERD" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$STARTED_DOCKERD" 2>/dev/null || break; sleep 1; done
  fi
  exit $rc
}
trap cleanup EXIT

# --- 2. the images ------------------------------------------------------------------------------------
T_BUILD=$(date +%s)
bash scripts/docker_build_local.sh
BUILD_S=$(( $(date +%s) - T_BUILD ))

drive() {
  docker run --rm --network host -v "$REPO":/repo:ro -v "$STATE":/state -v "$DATASETS":/datasets:ro \
    peal-backend:latest python /repo/scripts/docker_e2e_drive.py --ls "http://127.0.0.1:$LS_PORT" \
    --backend "http://127.0.0.1:$BACKEND_PORT" --token "$TOKEN" "$@"
}
healthy_within() {  # container, seconds: poll its HEALTHCHECK status
  local s
  for _ in $(seq 1 "$2"); do
    s=$(docker inspect -f '{{.State.Health.Status}}' "$1")
    [ "$s" = healthy ] && return 0
    sleep 1
  done
  say "$1 is $s after $2 s"; return 1
}

# --- 3. the stack -------------------------------------------------------------------------------------
T_E2E=$(date +%s)
"${COMPOSE[@]}" up -d --no-build
say "stack up: Label Studio on :$LS_PORT, backend on :$BACKEND_PORT"

# --- 4. the loop --------------------------------------------------------------------------------------
drive main

# --- 5. docker run as a sidecar, and with bad input ----------------------------------------------------
SIDECAR_ENV=(-e LABEL_STUDIO_URL=http://label-studio:8080 -e "LABEL_STUDIO_API_KEY=$TOKEN" -e PEAL_BACKBONE=peal-mini
             -e PEAL_COLD_START=false -e PEAL_PUSH_PREDICTIONS=false)   # it must not reorder the project
docker run -d --name "$PROJECT-sidecar" --network "$NET" -p "$SIDECAR_PORT:9090" "${SIDECAR_ENV[@]}" \
  -v "${PROJECT}_models:/data/models" peal-backend:latest >/dev/null   # the stack's versions
docker run -d --name "$PROJECT-bad-url" --network "$NET" -p "$BAD_PORT:9090" "${SIDECAR_ENV[@]}" \
  -e LABEL_STUDIO_URL=http://label-studo:8080 peal-backend:latest >/dev/null
docker run -d --name "$PROJECT-bad-nomount" --network "$NET" -p "$((BAD_PORT + 1)):9090" "${SIDECAR_ENV[@]}" \
  -e MODEL_DIR=/models peal-backend:latest >/dev/null
docker volume create "$RO_VOLUME" >/dev/null
docker run -d --name "$PROJECT-bad-ro" --network "$NET" -p "$((BAD_PORT + 2)):9090" "${SIDECAR_ENV[@]}" \
  -v "$RO_VOLUME:/data/models:ro" peal-backend:latest >/dev/null
drive sidecar --url "http://127.0.0.1:$SIDECAR_PORT"
drive bad-input --url "http://127.0.0.1:$BAD_PORT" --expect LABEL_STUDIO_URL
drive bad-input --url "http://127.0.0.1:$((BAD_PORT + 1))" --expect MODEL_DIR
drive bad-input --url "http://127.0.0.1:$((BAD_PORT + 2))" --expect MODEL_DIR
for c in bad-url bad-nomount bad-ro; do
  line=$(docker logs "$PROJECT-$c" 2>&1 | grep -m1 "preflight:" || true)
  [ -n "$line" ] || { say "$c: no preflight line in its log"; docker logs --tail 30 "$PROJECT-$c"; exit 1; }
  read -r running restarts < <(docker inspect -f '{{.State.Running}} {{.RestartCount}}' "$PROJECT-$c")
  [ "$running" = true ] && [ "$restarts" = 0 ] || { say "$c: running=$running restarts=$restarts"; exit 1; }
  say "$c: still running, its log says: ${line:0:220}"
done
healthy_within "$PROJECT-sidecar" 120
say "sidecar: HEALTHCHECK healthy"

# --- 6. fault drills ------------------------------------------------------------------------------------
if [ "${PEAL_E2E_SKIP_DRILLS:-0}" != 1 ]; then
  WORKER=$("${COMPOSE[@]}" ps -q worker)
  drive drill-running                     # one annotation: its training runs on the worker
  docker stop "$WORKER" >/dev/null        # mid-training: SIGTERM, SIGKILL after 10 s
  drive drill-queue-one                   # one more annotation: a training queued, no worker to take it
  "${COMPOSE[@]}" restart redis
  healthy_within "$("${COMPOSE[@]}" ps -q redis)" 60
  drive drill-queued --when "Redis restarted"
  "${COMPOSE[@]}" start worker
  drive drill-finish
fi
E2E_S=$(( $(date +%s) - T_E2E ))

docker image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^(peal-backend:latest|peal-local/)' | sed 's/^/[e2e] image /'
say "build: $BUILD_S s, end to end: $E2E_S s, total: $(( $(date +%s) - T_START )) s"
OK=1
say "PASSED"
