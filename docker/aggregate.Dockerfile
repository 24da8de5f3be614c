# qscore aggregate stage: metrics, report and plots from the per-token Parquet files. No torch,
# no GPU.
#   make image-aggregate     (docker build -f docker/aggregate.Dockerfile -t qscore-aggregate:TAG .)
FROM python:3.11.15-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONPATH=/opt/qscore \
    HOME=/home/qscore \
    USER=qscore \
    MPLBACKEND=Agg \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/qscore

COPY requirements/aggregate.txt requirements/aggregate.txt
RUN python3 -m pip install --no-cache-dir --requirement requirements/aggregate.txt \
    && python3 -m pip list --format=freeze > /opt/qscore/pip-freeze.txt

RUN groupadd --gid 10001 qscore \
    && useradd --uid 10001 --gid 10001 --no-log-init --create-home --home-dir /home/qscore --shell /usr/sbin/nologin qscore \
    && mkdir -p /results \
    && chmod 1777 /home/qscore /results

COPY jobs/ /opt/qscore/jobs/

# Labels last: a new revision must not invalidate the cached layers above.
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.vendor="qscore" \
      org.opencontainers.image.title="qscore-aggregate" \
      org.opencontainers.image.description="qscore aggregate stage: summary.json/csv, report.md and plots (CPU, no torch); python3 -m jobs <stage>" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="python:3.11.15-slim-bookworm"

USER 10001:10001
ENTRYPOINT ["python3", "-m", "jobs"]
CMD ["aggregate"]
