# syntax=docker/dockerfile:1
# The Chorus gateway alone: gRPC, telemetry and the audio encoders, no torch and
# no llama.cpp (`pip install .[gateway]`), so it starts in a second and scales
# cheaply. Build from the repository root:
#   docker build -f deploy/docker/gateway.Dockerfile -t chorus-gateway:0.1.0 .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/chorus/bin:$PATH
RUN python -m venv /opt/chorus
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chorus ./chorus
COPY services ./services
COPY gateway ./gateway
COPY tools ./tools
# The package itself; every dependency is pinned in its pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[gateway]"

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
EXPOSE 50051 9090
ENTRYPOINT ["chorus-gateway"]
