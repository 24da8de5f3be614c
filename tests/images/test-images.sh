#!/usr/bin/env bash
# make test-images: build the aggregate and quantize images for real and prove that the demo's pipeline run
# in them gives the same bytes as the local demo. Made for CI (Debian, root, CPU, no container registry):
#
#  1. installs from Debian's archive what is missing (docker.io for dockerd, debootstrap), and starts dockerd
#     if no Docker engine answers (and stops only that daemon, by its pid);
#  2. makes stand-ins for the base images no registry can give here, cached in Docker's store (and the
#     Debian root filesystem as a tarball in CACHE_DIR): the aggregate image's FROM (python:*-slim-<suite>)
#     from debootstrap, tagged under that exact name only while the images build; and a CPU PyTorch base
#     from the CPU wheel of requirements/torch-cpu.txt's torch, passed as QUANTIZE_BASE;
#  3. builds the images with `make image-aggregate image-quantize`, the Dockerfiles unchanged;
#  4. runs `make demo` twice in two fresh copies of the project: locally, and with DEMO_RUNNER=docker
#     (build-tiny, quantize, validate, score with the transformers backend in the quantize image, aggregate
#     in the aggregate image; containers as a non-root uid, no --gpus, no network, models/ read-only while
#     scoring);
#  5. compares every output: tests/images/compare.py.
#
# Settings (environment): TEST_IMAGES_TAG (image tag, default test-images), TEST_IMAGES_UID / TEST_IMAGES_GID
# (the uid:gid the containers run as when this runs as root; default 1000), TEST_IMAGES_CACHE (default
# ~/.cache/qscore/test-images), TEST_IMAGES_KEEP=1 (keep the work directory). A failure prints one line
# `test-images: error: ...` (after the tail of the failing step's log) and exits 1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/tests/images
TAG=${TEST_IMAGES_TAG:-test-images}
PREFIX=qscore
RUN_UID=${TEST_IMAGES_UID:-1000}
RUN_GID=${TEST_IMAGES_GID:-$RUN_UID}
CACHE=${TEST_IMAGES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/qscore/test-images}
VENV_DIR=${VENV:-.venv}
[[ $VENV_DIR = /* ]] || VENV_DIR=$ROOT/$VENV_DIR
PY=$VENV_DIR/bin/python
RUN_ID=$(date +%Y%m%d%H%M%S)-$$
# bump when the way a stand-in is made changes, so cached ones are rebuilt
RECIPE=1

WORK=""
DOCKERD_PID=""
ALIASES=()
STATUS=1
declare -a TIMES=()

say() { printf 'test-images: %s\n' "$*"; }
die() { printf 'test-images: error: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local rc=$?
  set +e
  if [[ -n $WORK ]] && docker info >/dev/null 2>&1; then
    local ids
    ids=$(docker ps -aq --filter "label=qscore.test-images=$RUN_ID")
    [[ -n $ids ]] && docker rm -f $ids >/dev/null
  fi
  for alias in "${ALIASES[@]}"; do docker rmi "$alias" >/dev/null 2>&1; done  # the tag only: the stand-in stays
  if [[ -n $DOCKERD_PID ]]; then
    say "stopping the dockerd this script started (pid $DOCKERD_PID)"
    kill -TERM "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && kill -KILL "$DOCKERD_PID"
    wait "$DOCKERD_PID" 2>/dev/null
  fi
  if [[ -n $WORK ]]; then
    if [[ $STATUS -eq 0 && ${TEST_IMAGES_KEEP:-} != 1 ]]; then rm -rf "$WORK"; else say "work directory kept: $WORK"; fi
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# step NAME CMD...: run CMD with its output in $WORK/logs/NAME.log, timed; on failure show the log's tail.
# CMD runs in a subshell outside any `||`, so that `set -e` holds inside the functions it calls.
step() {
  local name=$1; shift
  local log=$WORK/logs/$name.log t0=$SECONDS rc
  say "$name ..."
  set +e
  ( "$@" ) >"$log" 2>&1
  rc=$?
  set -e
  TIMES+=("$(printf '%-22s %5d s' "$name" $((SECONDS - t0)))")
  if [[ $rc -ne 0 ]]; then
    tail -n 40 "$log" | sed 's/^/    | /' >&2
    die "$name failed (exit $rc); full log: $log"
  fi
  say "$name done in $((SECONDS - t0)) s"
}

# clean_make HOME DIR ARGS...: make in DIR with a clean environment: nothing of the caller's make or shell
# leaks in (the Makefile reads MODELS, HF_HOME, ... from the environment; `make test-images` exports them).
# HOME holds the caches make mounts into the containers (HF_HOME, CACHE_DIR): one per run.
clean_make() {
  local home=$1 dir=$2; shift 2
  mkdir -p "$home"
  env -i PATH="$PATH" HOME="$home" USER="${USER:-qscore}" LANG=C.UTF-8 TMPDIR="$WORK/tmp" PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ${DOCKER_HOST:+DOCKER_HOST=$DOCKER_HOST} \
    make --no-print-directory -C "$dir" "$@"
}

# --- 0. where we are -----------------------------------------------------------------------------------
[[ $(uname -s) = Linux ]] || die "needs Linux (a Docker engine with overlay2 and runc); this is $(uname -s)"
[[ -x $PY ]] || die "no venv at $VENV_DIR: run make setup first"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/qscore-test-images.XXXXXX")
chmod 755 "$WORK"
mkdir -p "$WORK/logs" "$WORK/tmp" "$CACHE"
say "work directory $WORK, cache $CACHE, images $PREFIX-*:$TAG"

# --- 1. a Docker engine ----------------------------------------------------------------------------------
apt_install() {
  command -v apt-get >/dev/null || die "cannot install $*: no apt-get (install them, or use a Debian/Ubuntu host)"
  [[ $EUID -eq 0 ]] || die "cannot install $*: not root (install them, or run as root)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends "$@"
}

start_dockerd() {
  [[ $EUID -eq 0 ]] || die "no Docker engine answers and this is not root: start one (docker info), or run as root"
  if ! command -v dockerd >/dev/null || ! command -v docker >/dev/null; then
    step install-docker apt_install docker.io
  fi
  say "starting dockerd (log: $WORK/logs/dockerd.log)"
  dockerd --pidfile "$WORK/dockerd.pid" >"$WORK/logs/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  local t0=$SECONDS
  until docker info >/dev/null 2>&1; do
    kill -0 "$DOCKERD_PID" 2>/dev/null || { DOCKERD_PID=""; tail -n 20 "$WORK/logs/dockerd.log" >&2
      die "dockerd exited while starting; log: $WORK/logs/dockerd.log"; }
    (( SECONDS - t0 < 60 )) || die "dockerd did not answer within 60 s; log: $WORK/logs/dockerd.log"
    sleep 1
  done
  TIMES+=("$(printf '%-22s %5d s' start-dockerd $((SECONDS - t0)))")
  say "dockerd $(docker version --format '{{.Server.Version}}') ready in $((SECONDS - t0)) s (pid $DOCKERD_PID)"
}

if docker info >/dev/null 2>&1; then
  say "using the Docker engine that answers ($(docker version --format '{{.Server.Version}}'))"
else
  start_dockerd
fi
# The containers run as a non-root uid: the caller's, or RUN_UID when this runs as root (make passes
# DOCKER_USER to docker run -u; the directories they write are that uid's)
if [[ $EUID -eq 0 ]]; then
  [[ $RUN_UID -ne 0 ]] || die "TEST_IMAGES_UID must not be 0: the containers run as a non-root uid"
  CTR_USER=$RUN_UID:$RUN_GID
else
  CTR_USER=$(id -u):$(id -g)
fi

# --- 2. stand-in base images -------------------------------------------------------------------------------
label_of() { docker image inspect --format '{{ index .Config.Labels "org.qscore.stand-in" }}' "$1" 2>/dev/null || true; }
exists() { docker image inspect "$1" >/dev/null 2>&1; }

# the aggregate image's base, e.g. python:3.11.15-slim-bookworm -> python 3.11 on Debian bookworm
PYTHON_FROM=$(awk 'toupper($1) == "FROM" {print $2; exit}' "$ROOT/docker/aggregate.Dockerfile")
[[ $PYTHON_FROM =~ ^python:([0-9]+\.[0-9]+)\.[0-9]+-slim-([a-z]+)$ ]] \
  || die "docker/aggregate.Dockerfile: FROM $PYTHON_FROM is not python:X.Y.Z-slim-<debian suite>"
PY_MINOR=${BASH_REMATCH[1]}
SUITE=${BASH_REMATCH[2]}
PYTHON_STAND_IN=qscore-stand-in/debian-python:$SUITE

debian_mirror() {  # the machine's own Debian mirror, as apt uses it
  local m=""
  if [[ -f /etc/apt/sources.list.d/debian.sources ]]; then
    m=$(awk -v s="$SUITE" 'BEGIN{RS=""} /Suites:/ { u=""; ok=0
          n=split($0, l, "\n"); for (i=1;i<=n;i++) { split(l[i], w, /[ \t]+/)
            if (w[1]=="URIs:") u=w[2]; if (w[1]=="Suites:") for (j=2;j<=length(w);j++) if (w[j]==s) ok=1 }
          if (ok && u!="") { print u; exit } }' /etc/apt/sources.list.d/debian.sources)
  fi
  if [[ -z $m && -f /etc/apt/sources.list ]]; then
    m=$(awk -v s="$SUITE" '$1=="deb" { i=2; if ($2 ~ /^\[/) while ($i !~ /\]$/) i++; if ($2 ~ /^\[/) i++
          if ($(i+1)==s) { print $i; exit } }' /etc/apt/sources.list)
  fi
  echo "${m:-http://deb.debian.org/debian}"
}

PACKAGES=python3,python3-venv,python3-pip,ca-certificates,passwd
# the host's extra CA certificates go into the stand-in: where PyPI is reached through a proxy with its own
# CA, pip inside a build fails with CERTIFICATE_VERIFY_FAILED without them
EXTRA_CAS=$(find /usr/local/share/ca-certificates -name '*.crt' -type f 2>/dev/null | sort || true)
PY_KEY=$( { echo "recipe $RECIPE $SUITE $PACKAGES"; for f in $EXTRA_CAS; do sha256sum "$f"; done; } | sha256sum | cut -c1-16)

make_rootfs() {  # $1 = tarball to write
  command -v debootstrap >/dev/null || apt_install debootstrap
  local rootfs=$WORK/rootfs mirror
  mirror=$(debian_mirror)
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$mirror"
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED  # pip installs as in python:*-slim
  for f in $EXTRA_CAS; do cp "$f" "$rootfs/usr/local/share/ca-certificates/"; done
  chroot "$rootfs" update-ca-certificates
  local got
  got=$(chroot "$rootfs" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  [[ $got = "$PY_MINOR" ]] || { echo "debootstrap $SUITE gives python $got, $PYTHON_FROM is $PY_MINOR"; return 1; }
  chroot "$rootfs" python3 --version
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
  tar --numeric-owner -C "$rootfs" -cf "$1.tmp" . && mv "$1.tmp" "$1"
  rm -rf "$rootfs"
}

import_rootfs() {  # $1 = tarball
  docker import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' \
    --change "LABEL org.qscore.stand-in=$PY_KEY" \
    --change "LABEL org.opencontainers.image.description=\"Debian $SUITE python3 from debootstrap: stand-in for $PYTHON_FROM in make test-images\"" \
    "$1" "$PYTHON_STAND_IN"
}

if exists "$PYTHON_FROM" && [[ -z $(label_of "$PYTHON_FROM") ]]; then
  say "$PYTHON_FROM is in Docker's store (not a stand-in): building on it"
  PYTHON_BASE=$PYTHON_FROM
else
  if [[ $(label_of "$PYTHON_STAND_IN") = "$PY_KEY" ]]; then
    say "$PYTHON_STAND_IN: cached in Docker's store"
    TIMES+=("$(printf '%-22s %7s' python-base cached)")
  else
    tarball=$CACHE/debian-$SUITE-python-$PY_KEY.tar
    if [[ ! -s $tarball ]]; then
      step debootstrap make_rootfs "$tarball"
    else
      say "root filesystem cached: $tarball"
    fi
    step import-python-base import_rootfs "$tarball"
    find "$CACHE" -maxdepth 1 -name "debian-$SUITE-python-*.tar" ! -name "${tarball##*/}" -delete  # older recipes
  fi
  PYTHON_BASE=$PYTHON_STAND_IN
  docker tag "$PYTHON_STAND_IN" "$PYTHON_FROM"
  ALIASES+=("$PYTHON_FROM")
fi
say "python base: $(docker run --rm --network none "$PYTHON_BASE" python3 --version 2>&1)"

# The CPU PyTorch base: the wheel of the torch that requirements/torch-cpu.txt pins, as pip on this machine
# finds it (its own settings: find-links, an index), else from PyTorch's CPU index.
TORCH_VERSION=$(sed -n 's/^torch==\([^ #]*\).*/\1/p' "$ROOT/requirements/torch-cpu.txt")
[[ -n $TORCH_VERSION ]] || die "requirements/torch-cpu.txt pins no torch==X"
TORCH_BASE=qscore-stand-in/pytorch-cpu:$TORCH_VERSION
WHEELS=$CACHE/wheels
torch_wheel() { ls "$WHEELS"/torch-"$TORCH_VERSION"+cpu-cp"${PY_MINOR/./}"-*.whl 2>/dev/null | head -n 1; }
fetch_torch() {
  local args=(download --no-deps --only-binary=:all: --python-version "$PY_MINOR" --implementation cp
              --platform "manylinux_2_28_$(uname -m)" -d "$WHEELS" "torch==$TORCH_VERSION+cpu")
  "$PY" -m pip "${args[@]}" || "$PY" -m pip "${args[@]}" --index-url https://download.pytorch.org/whl/cpu
  [[ -n $(torch_wheel) ]] || { echo "no torch $TORCH_VERSION+cpu wheel for cp${PY_MINOR/./} in $WHEELS"; return 1; }
}
[[ -n $(torch_wheel) ]] || step fetch-torch-wheel fetch_torch
WHEEL=$(torch_wheel)
TORCH_KEY=$( { echo "recipe $RECIPE"; docker image inspect --format '{{.Id}}' "$PYTHON_BASE"; sha256sum "$WHEEL";
               sha256sum < "$HERE/torch-cpu-base.Dockerfile"; } | sha256sum | cut -c1-16)
build_torch_base() {
  local ctx=$WORK/torch-base
  mkdir -p "$ctx"
  ln "$WHEEL" "$ctx/" 2>/dev/null || cp "$WHEEL" "$ctx/"
  docker build -f "$HERE/torch-cpu-base.Dockerfile" -t "$TORCH_BASE" --build-arg "PYTHON_BASE=$PYTHON_BASE" \
    --build-arg "STAND_IN_KEY=$TORCH_KEY" "$ctx"
  rm -rf "$ctx"
}
if [[ $(label_of "$TORCH_BASE") = "$TORCH_KEY" ]]; then
  say "$TORCH_BASE: cached in Docker's store"
  TIMES+=("$(printf '%-22s %7s' build-torch-base cached)")
else
  step build-torch-base build_torch_base
fi

# --- 3. the project's images, with its own targets ------------------------------------------------------------
step image-aggregate clean_make "$WORK/build.home" "$ROOT" image-aggregate IMAGE_PREFIX=$PREFIX TAG="$TAG"
step image-quantize clean_make "$WORK/build.home" "$ROOT" image-quantize IMAGE_PREFIX=$PREFIX TAG="$TAG" QUANTIZE_BASE="$TORCH_BASE"
for alias in "${ALIASES[@]}"; do docker rmi "$alias" >/dev/null; done
ALIASES=()
# older builds of these images, left untagged by the new ones (only images with the project's labels)
docker image prune -f --filter label=org.opencontainers.image.vendor=qscore >/dev/null
docker image prune -f --filter label=org.qscore.stand-in >/dev/null

# --- 4. the demo, locally and in the containers -------------------------------------------------------------
copy_project() {  # a fresh copy of what the pipeline reads (not .env: the user's settings stay out)
  mkdir -p "$1"
  (cd "$ROOT" && tar -c --exclude=__pycache__ Makefile pyproject.toml .env.example jobs data requirements) | tar -x -C "$1"
}
copy_project "$WORK/local"
copy_project "$WORK/docker"
RESULTS=$(clean_make "$WORK/local.home" "$WORK/local" -s print-DEMO_RESULTS_DIR RUNNER=local)
# what the containers write (models/, the results, the caches under HOME) belongs to their uid; make itself
# (stamps, and the ModelOpt fixture from the venv) runs as the caller
mkdir -p "$WORK/docker/models" "$WORK/docker/$RESULTS" "$WORK/docker.home/.cache/huggingface" \
  "$WORK/docker.home/.cache/qscore"
[[ $EUID -ne 0 ]] || chown -R "$CTR_USER" "$WORK/docker" "$WORK/docker.home"

step demo-local clean_make "$WORK/local.home" "$WORK/local" demo VENV="$VENV_DIR"
step demo-docker clean_make "$WORK/docker.home" "$WORK/docker" demo DEMO_RUNNER=docker VENV="$VENV_DIR" IMAGE_PREFIX=$PREFIX TAG="$TAG" \
  DOCKER_USER="$CTR_USER" DOCKER_ARGS="--network none --label qscore.test-images=$RUN_ID"
# what ran where: make prints every command it runs
for stage in build-tiny quantize validate score; do
  grep -q "docker run .* $PREFIX-quantize:$TAG $stage " "$WORK/logs/demo-docker.log" \
    || die "the docker demo ran no $stage container (see $WORK/logs/demo-docker.log)"
done
grep -q "docker run .* $PREFIX-aggregate:$TAG aggregate " "$WORK/logs/demo-docker.log" \
  || die "the docker demo ran no aggregate container (see $WORK/logs/demo-docker.log)"
! grep -q -e '--gpus' "$WORK/logs/demo-docker.log" || die "the docker demo asked for a GPU (see $WORK/logs/demo-docker.log)"
! grep 'docker run' "$WORK/logs/demo-docker.log" | grep -v -q -e "-u $CTR_USER " \
  || die "a container of the docker demo did not run as $CTR_USER (see $WORK/logs/demo-docker.log)"

# --- 5. the comparison -----------------------------------------------------------------------------------------
say "comparing $WORK/local and $WORK/docker"
if ! "$PY" "$HERE/compare.py" --local "$WORK/local" --docker "$WORK/docker" --results "$RESULTS" \
    | tee "$WORK/logs/compare.log"; then
  die "the containers' outputs differ from the local run's (see above)"
fi

say "images:"
# docker trims the format's leading blanks, so the indent is added after the match
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' \
  | grep -E "^($PREFIX-(aggregate|quantize):$TAG|$TORCH_BASE|${PYTHON_BASE})  " | sed 's/^/  /' || true
say "times:"
printf '  %s\n' "${TIMES[@]}"
STATUS=0
say "OK: the aggregate and quantize images reproduce the local demo"
