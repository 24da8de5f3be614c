# qscore vLLM stages (validate, score; and `vllm serve` with --entrypoint vllm) on the official
# vLLM image.
#   make image-vllm     (docker build -f docker/vllm.Dockerfile -t qscore-vllm:TAG .)
# vLLM 0.26.0 brings its own torch, transformers and compressed-tensors 0.17.0 (llm-compressor
# needs 0.19.0: that is why quantize has an image of its own). requirements/vllm.txt is installed
# with every package of the base image held at its version, so vLLM's stack is left as it is;
# /opt/qscore/pip-freeze.txt records what the image holds.
# BASE_IMAGE (make's VLLM_BASE): another image with the same interface (python3 with pip and vllm==0.26.0,
# `vllm` on PATH), e.g. a mirror of the official one. `make test-images` builds this file unchanged on a
# CPU stand-in made from PyPI's vllm==0.26.0, since no registry can give it the official image.
ARG BASE_IMAGE=vllm/vllm-openai:v0.26.0
FROM ${BASE_IMAGE}

# CACHE_DIR: every compile and JIT cache goes under /cache (jobs/core/caches.py); mount a host directory there
# (make does) and the next container starts from them instead of a fresh HOME's nothing.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/opt/qscore \
    HOME=/home/qscore \
    USER=qscore \
    HF_HOME=/hf \
    VLLM_NO_USAGE_STATS=1 \
    CACHE_DIR=/cache

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/qscore

COPY requirements/vllm.txt requirements/vllm.txt
RUN python3 -m pip list --format=freeze --exclude-editable > /tmp/base-constraints.txt \
    && PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir \
       --constraint /tmp/base-constraints.txt --requirement requirements/vllm.txt \
    && python3 -m pip list --format=freeze > /opt/qscore/pip-freeze.txt \
    && rm /tmp/base-constraints.txt

# Any uid may run the container (make passes -u $(id -u):$(id -g)): HOME and the mount points are
# writable by all; ENV USER keeps getpass (torch caches) working for a uid with no passwd entry.
RUN groupadd --gid 10001 qscore \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home --home-dir /home/qscore --shell /usr/sbin/nologin qscore \
    && mkdir -p /models /results /data /hf /cache \
    && chmod 1777 /home/qscore /models /results /data /hf /cache

COPY jobs/ /opt/qscore/jobs/

# Labels last: a new revision must not invalidate the cached layers above.
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.vendor="qscore" \
      org.opencontainers.image.title="qscore-vllm" \
      org.opencontainers.image.description="qscore validate/score stages on vLLM 0.26.0; python3 -m jobs <stage>" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["python3", "-m", "jobs"]
CMD ["score"]
