# peal-backend: the Label Studio ML backend (HTTP server) and, with another command, its RQ worker.
#   docker build -t peal-backend .
#   docker run -p 9090:9090 -e LABEL_STUDIO_URL=... -e LABEL_STUDIO_API_KEY=... -v peal-models:/data/models peal-backend
# See docker-compose.yml for Label Studio + Redis + backend + worker together.
#
# Any base with Python 3.11 and its venv module works: python:3.11-slim by default; without an image
# registry, a Debian 12 base made by scripts/docker_build_local.sh (BASE_IMAGE=peal-local/python:3.11-bookworm).
ARG BASE_IMAGE=python:3.11-slim

# --- deps: a virtual environment with CPU torch and the project's dependencies ----------------------
# Keyed on setup.py alone: a change to the code reuses this stage (and the runtime's copy of it).
FROM ${BASE_IMAGE} AS deps

# CPU-only torch, pinned to the +cpu build of 2.13.0, from PyTorch's CPU wheel index (PyPI's torch
# is the CUDA build: gigabytes of wheels). PIP_OPTIONS is added to both pip installs; with
#   --build-arg PIP_OPTIONS="--no-index --find-links /wheels"
# everything comes from docker/wheelhouse/ in the build context instead (scripts/docker_build_local.sh
# fills it on the host), and the build needs no network at all.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_OPTIONS=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python3 -m venv /opt/venv
COPY docker/wheelhouse/ /wheels/
# torch first, in its own layer: it is the largest and changes least. PIP_OPTIONS is split on spaces.
# hadolint ignore=SC2086
RUN /opt/venv/bin/pip install $PIP_OPTIONS --index-url "$TORCH_INDEX_URL" torch==2.13.0+cpu

# setup.py's install_requires, through an empty package of the same name, removed after
COPY setup.py /src/
# hadolint ignore=SC2086
RUN mkdir /src/peal_backend && touch /src/peal_backend/__init__.py \
    && /opt/venv/bin/pip install $PIP_OPTIONS /src \
    && /opt/venv/bin/pip uninstall -y peal-backend \
    && /opt/venv/bin/python -c "import torch; assert torch.__version__ == '2.13.0+cpu', torch.__version__"

# --- runtime: the base, the dependencies' venv, the project; no wheels, no build files --------------
FROM ${BASE_IMAGE}

ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PORT=9090 \
    MODEL_DIR=/data/models \
    PEAL_BACKBONE=peal-mini \
    LOG_LEVEL=INFO

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin peal \
    && mkdir -p /data/models \
    && chown peal:peal /data/models

COPY --from=deps /opt/venv /opt/venv
# the project itself: no dependency to fetch (all in the venv), so no network and no index
COPY setup.py /src/
COPY peal_backend /src/peal_backend
RUN pip install --no-deps --no-build-isolation /src \
    && rm -rf /src \
    && python -c "import torch, peal_backend.server, peal_backend.backbone; assert torch.__version__ == '2.13.0+cpu'"
WORKDIR /app
COPY _wsgi.py ./

USER 10001
VOLUME ["/data/models"]
EXPOSE 9090

# Unhealthy when /health does not answer, or answers DEGRADED: a problem found at start, which the
# log and /health name (MODEL_DIR not writable, LABEL_STUDIO_URL unreachable); the server stays up.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import json, os, sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '9090'), timeout=4); sys.exit(json.load(r).get('status') != 'UP')"]

# gunicorn binds 0.0.0.0:$PORT by itself. One worker process: without REDIS_URL trainings run in
# that process's background thread; threads serve /predict while a training runs. The long timeout
# covers a first /predict that loads the backbone. Set REDIS_URL and run `peal-backend worker` in a
# second container to move trainings out (see docker-compose.yml); then WORKERS may be raised with
# GUNICORN_CMD_ARGS="--workers 2".
CMD ["gunicorn", "--workers", "1", "--threads", "8", "--timeout", "300", "--graceful-timeout", "30", "--access-logfile", "-", "_wsgi:app"]
