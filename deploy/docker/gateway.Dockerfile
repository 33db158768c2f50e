# syntax=docker/dockerfile:1
# The Chorus gateway alone: gRPC, telemetry and the audio encoders, no torch and
# no llama.cpp (`pip install .[gateway]`), so it starts in a second and scales
# cheaply. Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t chorus-gateway:0.1.0 .
# The base is any Debian-family image with Python 3.11 as `python3`, its venv module
# and useradd (`--build-arg PYTHON_IMAGE=...`; tools/images builds one with
# mmdebstrap). `python3`, not `python`: Debian's own python3 package has no `python`.
# checkov cannot resolve build args and takes ${PYTHON_IMAGE} for an untagged image;
# the default is tagged, and tests/deploy/test_images.py fails on an untagged default.
# checkov:skip=CKV_DOCKER_7: the base is a build arg whose default carries a tag
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/chorus/bin:$PATH
RUN python3 -m venv /opt/chorus
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chorus ./chorus
COPY services ./services
COPY gateway ./gateway
COPY tools ./tools
# The package itself; every dependency is pinned in its pyproject.toml.
# Nothing installs at run time: pip leaves the environment, and with it its own
# advisories (setuptools came with the venv only; nothing in the gateway extra needs it).
# hadolint ignore=DL3013
RUN pip install ".[gateway]" \
 && pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="chorus-gateway" \
      org.opencontainers.image.description="Chorus client-facing gRPC gateway (no model weights, no GPU)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.vendor="Chorus"
RUN useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin chorus
COPY --from=build /opt/chorus /opt/chorus
ENV PATH=/opt/chorus/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    CHORUS_HOST=0.0.0.0
USER 10001:10001
WORKDIR /tmp
# gRPC, the HTTP port (OpenAI's speech endpoint, the browser page; --http-port), metrics.
EXPOSE 50051 8080 9090
# For docker and compose (Kubernetes ignores it: the chart probes each container
# itself); the port the gateway listens on is CHORUS_PORT when set.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s \
  CMD ["/bin/sh", "-c", "exec python -m chorus.rpc.probe --tier chorus-gateway --port \"${CHORUS_PORT:-50051}\""]
ENTRYPOINT ["chorus-gateway"]
