# syntax=docker/dockerfile:1
# Chorus on NVIDIA GPUs: the token server with llama.cpp's CUDA backend
# (--gpu-layers) and the codec worker with CUDA torch (--device cuda). Build from
# the repository root:
#   docker build -f deploy/docker/cuda.Dockerfile -t chorus-tts-cuda:0.1.0 .
# Weights are not in the image: mount them at /models (backbone.gguf, snac/).
# The bases: CUDA_IMAGE's devel and runtime tags for CUDA_VERSION on UBUNTU (a
# mirror of nvidia/cuda: `--build-arg CUDA_IMAGE=registry.example.com/nvidia/cuda`).
ARG CUDA_IMAGE=nvidia/cuda
ARG CUDA_VERSION=12.8.1
ARG UBUNTU=ubuntu22.04

FROM ${CUDA_IMAGE}:${CUDA_VERSION}-devel-${UBUNTU} AS build
# Distribution packages are not pinned: the archive drops superseded versions (a pin
# would break the build at the next security update); the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential cmake \
 && rm -rf /var/lib/apt/lists/*
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/chorus/bin:$PATH
# PyPI's Linux torch is the CUDA build, its CUDA libraries in pip packages.
RUN python3.11 -m venv /opt/chorus \
 && pip install torch==2.13.0
# No GPU at build time: name the architectures (A100, A10/RTX 30, L4/RTX 40, H100)
# instead of "native", and link the driver library's stub; the real one comes from
# the node at run time.
ARG CUDA_ARCHITECTURES="80;86;89;90"
ENV CMAKE_ARGS="-DGGML_CUDA=ON -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHITECTURES}" \
    LIBRARY_PATH=/usr/local/cuda/lib64/stubs
RUN pip install llama-cpp-python==0.3.36
WORKDIR /src
COPY pyproject.toml README.md ./
COPY chorus ./chorus
COPY services ./services
COPY gateway ./gateway
COPY tools ./tools
# The package itself; every dependency is pinned in its pyproject.toml.
# Nothing installs at run time: pip leaves the environment, and with it its own
# advisories (torch needs setuptools, which stays).
# hadolint ignore=DL3013
RUN pip install ".[token-server,codec-worker,models]" \
 && pip uninstall --yes pip

FROM ${CUDA_IMAGE}:${CUDA_VERSION}-runtime-${UBUNTU}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="chorus-tts-cuda" \
      org.opencontainers.image.description="Chorus streaming TTS on NVIDIA GPUs: token server and codec worker" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.vendor="Chorus"
# Distribution packages are not pinned: the archive drops superseded versions (a pin
# would break the build at the next security update); the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin chorus
COPY --from=build /opt/chorus /opt/chorus
ENV PATH=/opt/chorus/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    CHORUS_HOST=0.0.0.0 \
    CHORUS_MODEL=/models/backbone.gguf \
    CHORUS_SNAC_DIR=/models/snac \
    CHORUS_GPU_LAYERS=-1 \
    CHORUS_CODEC_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
VOLUME ["/models"]
USER 10001:10001
WORKDIR /tmp
EXPOSE 50052 50053 9090
# checkov:skip=CKV_DOCKER_2: one image runs two services on two ports (the CMD is only the default); the chart probes each container through its own gRPC health
CMD ["chorus-token-server"]
