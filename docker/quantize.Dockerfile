# qscore quantize stage: llm-compressor on a CUDA PyTorch base image.
#   make image-quantize     (docker build -f docker/quantize.Dockerfile -t qscore-quantize:TAG .)
# torch comes from the base image and is held at its version: requirements/quantize.txt does not
# list it and pip is constrained to the installed build, so no requirement can swap it for another.
# The CUDA 13.0 base needs an NVIDIA driver >= 580; for older drivers build with
#   make image-quantize QUANTIZE_BASE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
# (llmcompressor 0.14.0.1 accepts torch 2.10 to 2.14).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONPATH=/opt/qscore \
    HOME=/home/qscore \
    USER=qscore \
    HF_HOME=/hf \
    CACHE_DIR=/cache

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /opt/qscore

COPY requirements/quantize.txt requirements/quantize.txt
RUN python3 -c 'import torch; print("torch==" + torch.__version__)' > /tmp/base-torch.txt \
    && python3 -m pip install --no-cache-dir --constraint /tmp/base-torch.txt --requirement requirements/quantize.txt \
    && python3 -m pip list --format=freeze > /opt/qscore/pip-freeze.txt \
    && rm /tmp/base-torch.txt

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
      org.opencontainers.image.title="qscore-quantize" \
      org.opencontainers.image.description="qscore quantize stage: llm-compressor (NVFP4 and other schemes) on CUDA PyTorch; python3 -m jobs <stage>" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

USER 10001:10001
ENTRYPOINT ["python3", "-m", "jobs"]
CMD ["quantize"]
