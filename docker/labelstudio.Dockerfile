# Label Studio 1.23.2 from PyPI's wheels on a local base with Python 3.11, for machines without an
# image registry (scripts/docker_build_local.sh). It stands in for heartexlabs/label-studio:1.23.2 in
# docker/compose.local.yml: same port, same data folder (/label-studio/data), a non-root user.
# The build is offline: the context is docker/labelstudio/, whose wheelhouse/ the script fills on the
# host (`pip wheel label-studio==1.23.2`), so no certificate or index is needed inside the build.
#   docker build --build-arg BASE_IMAGE=peal-local/python:3.11-bookworm \
#       -t peal-local/label-studio:1.23.2 -f docker/labelstudio.Dockerfile docker/labelstudio
ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY wheelhouse/ /wheels/
RUN python3 -m venv /opt/label-studio \
    && /opt/label-studio/bin/pip install --no-index --find-links /wheels label-studio==1.23.2

FROM ${BASE_IMAGE}
ENV PATH=/opt/label-studio/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LABEL_STUDIO_BASE_DATA_DIR=/label-studio/data

RUN useradd --create-home --uid 1001 --shell /usr/sbin/nologin labelstudio \
    && mkdir -p /label-studio/data /label-studio/files \
    && chown -R labelstudio:labelstudio /label-studio
COPY --from=builder /opt/label-studio /opt/label-studio

USER 1001
WORKDIR /label-studio
VOLUME ["/label-studio/data"]
EXPOSE 8080
CMD ["label-studio", "start", "--no-browser", "--internal-host", "0.0.0.0", "--port", "8080"]
