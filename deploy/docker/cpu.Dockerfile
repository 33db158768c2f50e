# syntax=docker/dockerfile:1
# Chorus on CPUs: the token server, the codec worker and `chorus models demo` (and
# the gateway, for single-image installs). Build from the repository root:
#   docker build -f deploy/docker/cpu.Dockerfile -t chorus-tts:0.1.0 .
# Weights are not in the image: mount them at /models (backbone.gguf, snac/).
# The base is any Debian-family image with Python 3.11 as `python3`, its venv module
# and useradd (`--build-arg PYTHON_IMAGE=...`; tools/images builds one with
# mmdebstrap). `python3`, not `python`: Debian's own python3 package has no `python`.
# checkov cannot resolve build args and takes ${PYTHON_IMAGE} for an untagged image;
# the default is tagged, and tests/deploy/test_images.py fails on an untagged default.
# checkov:skip=CKV_DOCKER_7: the base is a build arg whose default carries a tag
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Wheels built beforehand, handed in as a named build context
# (`--build-context wheels=DIR`, which replaces this empty stage): TORCH_WHEEL and
# LLAMA_WHEEL name files in it. Empty, the default, fetches torch and compiles
# llama.cpp here. tools/images hands in the host's, so that a check does not spend
# ten minutes compiling the same llama.cpp again. Mounted per RUN, they reach no layer.
FROM scratch AS wheels

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/chorus/bin:$PATH
RUN python3 -m venv /opt/chorus
ARG TORCH_WHEEL=""
ARG LLAMA_WHEEL=""
# PyTorch's CPU build (PyPI's Linux wheel drags in gigabytes of CUDA libraries).
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN --mount=type=bind,from=wheels,target=/wheels \
    if [ -n "${TORCH_WHEEL}" ]; then pip install "/wheels/${TORCH_WHEEL}"; \
    else pip install --index-url "${TORCH_INDEX}" torch==2.13.0; fi
# llama.cpp's portable build (tools/llama_wheel: AVX, AVX2, FMA, F16C, BMI2; no
# AVX-512, no AMX), not tuned to the build machine: the image runs on any x86-64
# node with AVX2 (Intel Haswell and AMD Zen on) that the scheduler picks.
# docs/deploy.md says what a native build would gain. Its own layer, the slow one.
# A wheel from /wheels must be this build: tools/images hands over only a portable
# wheel whose build record carries exactly these CMAKE_ARGS.
ENV CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
# The C++ toolchain is needed only to compile, and stays in this stage.
# Distribution packages are not pinned: the archive drops superseded versions (a pin
# would break the build at the next security update); the base image tag pins the release.
# hadolint ignore=DL3008
RUN --mount=type=bind,from=wheels,target=/wheels \
    if [ -n "${LLAMA_WHEEL}" ]; then pip install "/wheels/${LLAMA_WHEEL}"; \
    else apt-get update \
      && apt-get install -y --no-install-recommends build-essential cmake \
      && rm -rf /var/lib/apt/lists/* \
      && pip install --no-binary llama-cpp-python llama-cpp-python==0.3.36; fi
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
RUN pip install ".[all]" \
 && pip uninstall --yes pip

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
# Token server, codec worker, gateway (single-image installs: gRPC and HTTP), metrics.
EXPOSE 50051 50052 50053 8080 9090
# The chart names the service per Deployment (chorus-codec-worker, chorus-gateway...).
# checkov:skip=CKV_DOCKER_2: one image runs three services on three ports (the CMD is only the default); the chart probes each container through its own gRPC health
CMD ["chorus-token-server"]
