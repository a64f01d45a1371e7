# Debian's redis-server on a local base, for machines without an image registry
# (scripts/docker_build_local.sh); it stands in for redis:7-alpine in docker/compose.local.yml.
#   docker build --network host --build-arg BASE_IMAGE=peal-local/python:3.11-bookworm \
#       -t peal-local/redis:7 - < docker/redis.Dockerfile
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# bookworm's redis-server is the point (7.0 with its security updates): no version pin
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends redis-server \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /data \
    && chown redis:redis /data

# the system user the package creates (its uid is chosen at install)
# hadolint ignore=DL3066
USER redis
WORKDIR /data
VOLUME ["/data"]
EXPOSE 6379
# Without a config file redis-server listens on every interface but, in protected mode, answers only
# loopback clients: the other containers need it off (the official image's entry point does the same).
CMD ["redis-server", "--protected-mode", "no"]
