# peal-backend: the Label Studio ML backend (HTTP server) and, with another command, its RQ worker.
#   docker build -t peal-backend .
#   docker run -p 9090:9090 -e LABEL_STUDIO_URL=... -e LABEL_STUDIO_API_KEY=... -v peal-models:/data/models peal-backend
# See docker-compose.yml for Label Studio + Redis + backend + worker together.
FROM python:3.11-slim

# CPU-only torch, pinned to the +cpu build of 2.13.0, from PyTorch's CPU wheel index (PyPI's torch
# is the CUDA build: gigabytes of wheels). Where that index is not reachable but a local CPU wheel is
# on pip's find-links (this project's development machines: /opt/wheels), build with
#   --build-arg TORCH_INDEX_URL=https://pypi.org/simple
# the pin then matches only the local wheel.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PORT=9090 \
    MODEL_DIR=/data/models \
    PEAL_BACKBONE=peal-mini \
    LOG_LEVEL=INFO

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin peal \
    && mkdir -p /data/models \
    && chown peal:peal /data/models

WORKDIR /app

# torch first, in its own layer: it is the largest and changes least.
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" torch==2.13.0+cpu

COPY setup.py README.md ./
COPY peal_backend ./peal_backend
COPY _wsgi.py ./
RUN pip install --no-cache-dir . \
    && python -c "import peal_backend.server, peal_backend.backbone"

USER 10001
VOLUME ["/data/models"]
EXPOSE 9090

HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('PORT', '9090'), timeout=4)"]

# gunicorn binds 0.0.0.0:$PORT by itself. One worker process: without REDIS_URL trainings run in
# that process's background thread; threads serve /predict while a training runs. The long timeout
# covers a first /predict that loads the backbone. Set REDIS_URL and run `peal-backend worker` in a
# second container to move trainings out (see docker-compose.yml); then WORKERS may be raised with
# GUNICORN_CMD_ARGS="--workers 2".
CMD ["gunicorn", "--workers", "1", "--threads", "8", "--timeout", "300", "--graceful-timeout", "30", "--access-logfile", "-", "_wsgi:app"]
