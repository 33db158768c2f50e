# syntax=docker/dockerfile:1
# Chorus on CPUs: the token server, the codec worker and `chorus models demo` (and
# the gateway, for single-image installs). Build from the repository root:
#   docker build -f deploy/docker/cpu.Dockerfile -t chorus-tts:0.1.0 .
# Weights are not in the image: mount them at /models (backbone.gguf, snac/).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# llama-cpp-python compiles llama.cpp: a C++ toolchain, in this stage only.
# Distribution packages are not pinned: the archive drops superseded versions (a pin
# would break the build at the next security update); the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/chorus/bin:$PATH
RUN python -m venv /opt/chorus
# PyTorch's CPU build (PyPI's Linux wheel drags in gigabytes of CUDA libraries).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "${TORCH_INDEX}" torch==2.13.0
# llama.cpp's portable build (tools/llama_wheel: AVX, AVX2, FMA, F16C, BMI2; no
# AVX-512, no AMX), not tuned to the build machine: the image runs on any x86-64
# node with AVX2 (Intel Haswell and AMD Zen on) that the scheduler picks.
# docs/deploy.md says what a native build would gain. Its own layer, the slow one.
ENV CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
RUN pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chorus ./chorus
COPY services ./services
COPY gateway ./gateway
COPY tools ./tools
# The package itself; every dependency is pinned in its pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[all]"

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="chorus-tts" \
      org.opencontainers.image.description="Chorus streaming TTS on CPUs: token server, codec worker, gateway" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.vendor="Chorus"
# llama.cpp's CPU backend is built with OpenMP.
# Distribution packages are not pinned: the archive drops superseded versions (a pin
# would break the build at the next security update); the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin chorus
COPY --from=build /opt/chorus /opt/chorus
ENV PATH=/opt/chorus/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    CHORUS_HOST=0.0.0.0 \
    CHORUS_MODEL=/models/backbone.gguf \
    CHORUS_SNAC_DIR=/models/snac
VOLUME ["/models"]
USER 10001:10001
WORKDIR /tmp
EXPOSE 50052 50053 9090
# The chart names the service per Deployment (chorus-codec-worker, chorus-gateway...).
CMD ["chorus-token-server"]
