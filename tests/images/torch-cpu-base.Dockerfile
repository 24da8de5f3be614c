# Stand-in for the quantize image's CUDA PyTorch base, for `make test-images` only (tests/images/test-images.sh):
# a Python base image plus a CPU wheel of the torch release requirements/torch-cpu.txt pins, which the
# script puts in the build context. docker/quantize.Dockerfile is then built unchanged on top of it
# with QUANTIZE_BASE. Not a product image: users build on pytorch/pytorch (docs/cuda-host.md).
ARG PYTHON_BASE=python:3.11.15-slim-bookworm
FROM ${PYTHON_BASE}

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

COPY torch-*.whl /tmp/wheels/
# torch's own dependencies (filelock, sympy, networkx, jinja2, fsspec, ...) come from PyPI, as in the
# official images; the wheel name (torch-<version>+cpu-...) is only known to the script.
RUN python3 -m pip install --no-cache-dir /tmp/wheels/torch-*.whl \
    && rm -rf /tmp/wheels \
    && python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'

ARG STAND_IN_KEY=unknown
LABEL org.opencontainers.image.title="qscore-stand-in-pytorch-cpu" \
      org.opencontainers.image.description="CPU PyTorch on a Python base: stand-in for pytorch/pytorch in make test-images" \
      org.qscore.stand-in="${STAND_IN_KEY}"

CMD ["python3"]
