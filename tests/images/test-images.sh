#!/usr/bin/env bash
# make test-images: build the three images for real and prove that the demo's pipeline run in them gives the
# local demo's results. Made for CI (Debian, root, CPU, no container registry):
#
#  1. installs from Debian's archive what is missing (docker.io for dockerd, debootstrap), and starts dockerd
#     if no Docker engine answers (and stops only that daemon, by its pid);
#  2. makes stand-ins for the base images no registry can give here, cached in Docker's store (and the
#     Debian root filesystem as a tarball in CACHE_DIR): the aggregate image's FROM (python:*-slim-<suite>)
#     from debootstrap, tagged under that exact name only while the images build; a CPU PyTorch base from
#     the CPU wheel of requirements/torch-cpu.txt's torch, passed as QUANTIZE_BASE; and for the vLLM image,
#     the same Python with vllm==<its base's tag> from PyPI (vLLM's own CUDA torch, which runs on a CPU) and
#     requirements/quantize.txt's transformers, installed from a wheelhouse in CACHE_DIR, passed as VLLM_BASE;
#  3. builds the images with `make image-aggregate image-quantize image-vllm`, the Dockerfiles unchanged;
#  4. runs `make demo` twice in two fresh copies of the project: locally, and with DEMO_RUNNER=docker
#     (quantize, validate, score with the transformers backend in the quantize image, aggregate in the
#     aggregate image; the fixtures and the tasks with the venv in both; containers as a non-root uid: the
#     images' user 10001 when this runs as root, else the caller's; no --gpus, no network, models/ and the
#     HF cache read-only while scoring);
#  5. compares every output: tests/images/compare.py;
#  6. runs the vLLM image: `python3 -m jobs --help` and `validate --help` as its own user, `vllm --version`
#     through the entrypoint `make serve` uses, and `make score` (RUNNER=docker) of each model of the demo
#     with its settings (read from `make -n demo`: transformers backend, NVFP4 as declared) on the checkpoints
#     the containers made, mounted read-only; its Parquet rows must be the local demo's (compare.py --labels).
#
# Settings (environment): TEST_IMAGES_TAG (image tag, default test-images), TEST_IMAGES_CACHE (default
# ~/.cache/qscore/test-images), TEST_IMAGES_KEEP=1 (keep the work directory). A failure prints one line
# `test-images: error: ...` (after the tail of the failing step's log) and exits 1.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/tests/images
TAG=${TEST_IMAGES_TAG:-test-images}
PREFIX=qscore
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
CONTAINERS=()  # made by name (docker commit keeps a container's labels in the image it makes)
STATUS=1
declare -a TIMES=()

say() { printf 'test-images: %s\n' "$*"; }
die() { printf 'test-images: error: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local rc=$?
  set +e
  if [[ $STATUS -ne 0 && ${#TIMES[@]} -gt 0 ]]; then say "times:"; printf '  %s\n' "${TIMES[@]}"; fi  # a failed run's too
  if [[ -n $WORK ]] && docker info >/dev/null 2>&1; then
    local ids
    ids=$(docker ps -aq --filter "label=qscore.test-images=$RUN_ID")
    [[ -n $ids ]] && docker rm -f $ids >/dev/null
  fi
  for ctr in "${CONTAINERS[@]}"; do docker rm -f "$ctr" >/dev/null 2>&1; done
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
# HOME holds the caches make mounts into the containers (HF_HOME, CACHE_DIR): one per run. The venv is
# the caller's, made already (make test-images' own prerequisite): its setup stamp is taken as up to date
# (-o), or the copies' requirement files, newer than it, would have make reinstall it.
clean_make() {
  local home=$1 dir=$2; shift 2
  mkdir -p "$home"
  env -i PATH="$PATH" HOME="$home" USER="${USER:-qscore}" LANG=C.UTF-8 TMPDIR="$WORK/tmp" PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 ${DOCKER_HOST:+DOCKER_HOST=$DOCKER_HOST} \
    make --no-print-directory -C "$dir" -o "$VENV_DIR/.qscore-setup" "$@"
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
# The containers run as a non-root uid, as make chooses it (no DOCKER_USER): when make runs as root, the
# images' own user 10001, after a chown of what the stage writes; else the caller's uid, which make's
# command line names as the shell expression it prints as is. CTR_USER: `docker run -u`'s word in make's log.
if [[ $EUID -eq 0 ]]; then CTR_USER=10001:10001; else CTR_USER='"$(id -u):$(id -g)"'; fi
CTR_USER_RE=$(printf '%s' "$CTR_USER" | sed 's/[][\\.*^$()|+?{}]/\\&/g')

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

# The vLLM image's base: vllm/vllm-openai:vX.Y.Z is a CUDA image whose system Python has vLLM installed, with
# python3, pip and the `vllm` command on PATH: all docker/vllm.Dockerfile relies on. The stand-in gives that:
# the Python base plus `pip install vllm==X.Y.Z` from PyPI, which brings the torch (a CUDA build: it runs on a
# CPU, and the transformers backend needs no GPU), transformers and compressed-tensors vLLM pins. It runs in a
# container with a wheelhouse under CACHE mounted, and the container is committed as the image (a build on
# the classic builder cannot mount a directory). pip's own cache would not do: behind this machine's proxy
# the downloads come without the cache headers pip needs to keep them.
# transformers is pinned to requirements/quantize.txt's release (the venv's, and that of the GPU machine's vLLM
# runtime): vLLM asks only for >=5.5.3, and PyPI's newest (5.24.0 on 2026-12-02) loads a compressed-tensors
# checkpoint without its activation quantization, so NVFP4 W4A4 is scored as W4A16. Which transformers the
# official vllm/vllm-openai image holds cannot be read here (no registry): a CUDA host checks it
# (docs/cuda-host.md section 8).
VLLM_FROM=$(sed -n 's/^ARG BASE_IMAGE=//p' "$ROOT/docker/vllm.Dockerfile" | head -n 1)
[[ $VLLM_FROM =~ ^vllm/vllm-openai:v([0-9]+\.[0-9]+\.[0-9]+)$ ]] \
  || die "docker/vllm.Dockerfile: ARG BASE_IMAGE=$VLLM_FROM is not vllm/vllm-openai:vX.Y.Z"
VLLM_VERSION=${BASH_REMATCH[1]}
VLLM_BASE=qscore-stand-in/vllm-pypi:$VLLM_VERSION
TRANSFORMERS_VERSION=$(sed -n 's/^transformers==\([^ #]*\).*/\1/p' "$ROOT/requirements/quantize.txt")
[[ -n $TRANSFORMERS_VERSION ]] || die "requirements/quantize.txt pins no transformers==X"
VLLM_WHEELS=$CACHE/vllm-wheels
# What runs in the container. pip download resolves against PyPI and fetches only the wheels the wheelhouse
# lacks; the install takes them from the wheelhouse alone; then the releases a newer resolution replaced
# (vLLM's unpinned dependencies move) are deleted, so the wheelhouse does not grow with every run.
# g++ and Python's headers: the official image has both (Triton builds its launchers, Python extensions, at
# run time); on the CPU, compressed-tensors 0.17's FP4 rounding goes through torch.compile, whose CPU backend
# compiles C++ against Python.h too.
VLLM_INSTALL="set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off PIP_NO_CACHE_DIR=1
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends g++ python3-dev >/dev/null
rm -rf /var/lib/apt/lists/*
cd /tmp
python3 -m pip download --dest /wheels vllm==$VLLM_VERSION transformers==$TRANSFORMERS_VERSION
python3 -m pip install --no-index --find-links /wheels vllm==$VLLM_VERSION transformers==$TRANSFORMERS_VERSION
python3 -m pip check || true
command -v vllm
python3 -m pip list --format=freeze
python3 - <<'EOF'
import importlib.metadata as m, pathlib, re
norm = lambda s: re.sub(r'[-_.]+', '_', s).lower()
have = {(norm(d.metadata['Name']), d.version) for d in m.distributions()}
wheels = {}
for f in pathlib.Path('/wheels').glob('*.whl'):
    name, version = f.name.split('-')[:2]
    wheels.setdefault(norm(name), []).append((version, f))
for name, found in wheels.items():
    if any((name, v) in have for v, _ in found):
        for v, f in found:
            if (name, v) not in have:
                print('wheelhouse: replaced, deleted:', f.name)
                f.unlink()
print(*(p + '==' + m.version(p) for p in ('vllm', 'torch', 'transformers', 'compressed-tensors')))
EOF
rm -rf /tmp/* /root/.cache"
VLLM_KEY=$( { echo "recipe $RECIPE"; docker image inspect --format '{{.Id}}' "$PYTHON_BASE"; echo "$VLLM_INSTALL"; } \
             | sha256sum | cut -c1-16)
VLLM_BASE_CTR=qscore-test-images-vllm-base-$RUN_ID
build_vllm_base() {
  local ctr=$VLLM_BASE_CTR
  mkdir -p "$VLLM_WHEELS"
  docker run --name "$ctr" -v "$VLLM_WHEELS:/wheels" "$PYTHON_BASE" bash -c "$VLLM_INSTALL"
  docker commit \
    --change 'ENTRYPOINT ["vllm", "serve"]' --change 'CMD []' \
    --change "LABEL org.qscore.stand-in=$VLLM_KEY" \
    --change "LABEL org.opencontainers.image.description=\"Debian $SUITE python3 with vllm==$VLLM_VERSION from PyPI: stand-in for $VLLM_FROM in make test-images\"" \
    "$ctr" "$VLLM_BASE"
  docker rm "$ctr" >/dev/null
  echo "wheelhouse: $(find "$VLLM_WHEELS" -name '*.whl' | wc -l) wheels, $(du -sh "$VLLM_WHEELS" | cut -f1)"
}
if [[ $(label_of "$VLLM_BASE") = "$VLLM_KEY" ]]; then
  say "$VLLM_BASE: cached in Docker's store"
  TIMES+=("$(printf '%-22s %7s' build-vllm-base cached)")
else
  CONTAINERS+=("$VLLM_BASE_CTR")  # here: step runs the function in a subshell
  step build-vllm-base build_vllm_base
  say "$VLLM_BASE: $(grep -E '^vllm==\S+ torch==' "$WORK/logs/build-vllm-base.log" | tail -n 1); $(tail -n 1 "$WORK/logs/build-vllm-base.log")"
fi

# --- 3. the project's images, with its own targets ------------------------------------------------------------
step image-aggregate clean_make "$WORK/build.home" "$ROOT" image-aggregate IMAGE_PREFIX=$PREFIX TAG="$TAG"
step image-quantize clean_make "$WORK/build.home" "$ROOT" image-quantize IMAGE_PREFIX=$PREFIX TAG="$TAG" QUANTIZE_BASE="$TORCH_BASE"
step image-vllm clean_make "$WORK/build.home" "$ROOT" image-vllm IMAGE_PREFIX=$PREFIX TAG="$TAG" VLLM_BASE="$VLLM_BASE"
for alias in "${ALIASES[@]}"; do docker rmi "$alias" >/dev/null; done
ALIASES=()
# older builds of these images, left untagged by the new ones (only images with the project's labels)
docker image prune -f --filter label=org.opencontainers.image.vendor=qscore >/dev/null
docker image prune -f --filter label=org.qscore.stand-in >/dev/null

# --- 4. the demo, locally and in the containers -------------------------------------------------------------
copy_project() {  # a fresh copy of what the pipeline reads (not .env: the user's settings stay out)
  mkdir -p "$1"
  (cd "$ROOT" && tar -c --exclude=__pycache__ Makefile pyproject.toml .env.example jobs data requirements \
    tests/fixtures) | tar -x -C "$1"
}
copy_project "$WORK/local"
copy_project "$WORK/docker"
# The demo's settings, as its recipe passes them to the sub-makes: `make -n demo` prints that line with
# DEMO_VARS expanded (make -n still runs a $(MAKE) line, whose own commands it only prints).
demo_settings() {
  local line words w
  line=$(clean_make "$WORK/local.home" "$WORK/local" -n demo RUNNER=local VENV="$VENV_DIR" \
         | grep -E '^\S*make .* MODELS=.* RUNNER=local ' | head -n 1)
  [[ -n $line ]] || die "make -n demo prints no sub-make with MODELS=: cannot read the demo's settings"
  line=${line%\\}  # a recipe line continued with a backslash: the continuation is not this sub-make's
  eval "words=($line)"
  for w in "${words[@]}"; do [[ ! $w =~ ^[A-Z][A-Z0-9_]*= ]] || printf '%s\0' "$w"; done
}
mapfile -d '' DEMO_SETTINGS < <(demo_settings)
RESULTS=""
for v in "${DEMO_SETTINGS[@]}"; do [[ $v != RESULTS_DIR=* ]] || RESULTS=${v#RESULTS_DIR=}; done
[[ -n $RESULTS ]] || die "make -n demo names no RESULTS_DIR: cannot tell where the demo writes"

step demo-local clean_make "$WORK/local.home" "$WORK/local" demo VENV="$VENV_DIR"
step demo-docker clean_make "$WORK/docker.home" "$WORK/docker" demo DEMO_RUNNER=docker VENV="$VENV_DIR" IMAGE_PREFIX=$PREFIX TAG="$TAG" \
  DOCKER_ARGS="--network none --label qscore.test-images=$RUN_ID"
# what ran where: make prints every command it runs (the fixtures are made by the venv, not in an image)
for stage in quantize validate score; do
  grep -q "docker run .* $PREFIX-quantize:$TAG $stage " "$WORK/logs/demo-docker.log" \
    || die "the docker demo ran no $stage container (see $WORK/logs/demo-docker.log)"
done
grep -q "docker run .* $PREFIX-aggregate:$TAG aggregate " "$WORK/logs/demo-docker.log" \
  || die "the docker demo ran no aggregate container (see $WORK/logs/demo-docker.log)"
! grep -q -e '--gpus' "$WORK/logs/demo-docker.log" || die "the docker demo asked for a GPU (see $WORK/logs/demo-docker.log)"
! grep 'docker run' "$WORK/logs/demo-docker.log" | grep -v -q -F -e "-u $CTR_USER " \
  || die "a container of the docker demo did not run as $CTR_USER (see $WORK/logs/demo-docker.log)"

# --- 5. the comparison -----------------------------------------------------------------------------------------
say "comparing $WORK/local and $WORK/docker"
if ! "$PY" "$HERE/compare.py" --local "$WORK/local" --docker "$WORK/docker" --results "$RESULTS" \
    | tee "$WORK/logs/compare.log"; then
  die "the containers' outputs differ from the local run's (see above)"
fi

# --- 6. the vLLM image: its command lines, and the demo's scoring in it -------------------------------------------
VLLM_IMAGE=$PREFIX-vllm:$TAG
[[ $(docker image inspect --format '{{.Config.User}}' "$VLLM_IMAGE") =~ ^[1-9][0-9]*(:[0-9]+)?$ ]] \
  || die "$VLLM_IMAGE does not run as a non-root uid"
UID_GID=$( [[ $EUID -eq 0 ]] && echo 1000:1000 || echo "$(id -u):$(id -g)")  # not the image's own user
vllm_cli() {
  local run=(docker run --rm --network none --label "qscore.test-images=$RUN_ID") got
  # as the image's own user, then as the uid make passes
  "${run[@]}" "$VLLM_IMAGE" --help | tee "$WORK/tmp/help.txt"
  grep -q -E '^  score ' "$WORK/tmp/help.txt"
  "${run[@]}" -u "$UID_GID" "$VLLM_IMAGE" validate --help | tee "$WORK/tmp/help.txt"
  grep -q -e '--backend' "$WORK/tmp/help.txt"
  # `make serve`'s entrypoint, vLLM's CLI. `vllm --version` itself stops on a host without a GPU in this release
  # (it builds serve's parser first, whose defaults need a device: "Failed to infer device type"); `vllm bench`
  # switches to the CPU platform, then builds every subcommand's parser, serve's too. The version is the
  # package's, which is what --version prints.
  "${run[@]}" -u "$UID_GID" --entrypoint vllm "$VLLM_IMAGE" bench --help | tee "$WORK/tmp/help.txt"
  grep -q '^usage: vllm bench' "$WORK/tmp/help.txt"
  got=$("${run[@]}" -u "$UID_GID" --entrypoint python3 "$VLLM_IMAGE" -c \
        'import importlib.metadata as m; print(m.version("vllm"))')
  echo "vllm $got"
  [[ $got = "$VLLM_VERSION" ]] || { echo "vllm $got in $VLLM_IMAGE, but its base is $VLLM_FROM"; return 1; }
}
step vllm-cli vllm_cli

# A third copy of the project, with the checkpoints the containers made (hard links: the same files, mounted
# read-only), and `make score` of each model of the demo with the demo's settings (make -n demo), in the vLLM
# image
copy_project "$WORK/vllm"
cp -al "$WORK/docker/models" "$WORK/vllm/models"
DEMO_MODELS=""
for v in "${DEMO_SETTINGS[@]}"; do [[ $v != MODELS=* ]] || DEMO_MODELS=${v#MODELS=}; done
[[ -n $DEMO_MODELS ]] || die "make -n demo names no MODELS: cannot tell which models the demo scores"
SCORE_SETTINGS=()  # the runner and its image are this step's own
for v in "${DEMO_SETTINGS[@]}"; do [[ $v = RUNNER=* || $v = VLLM_IMAGE=* ]] || SCORE_SETTINGS+=("$v"); done
serve_line=$(clean_make "$WORK/vllm.home" "$WORK/vllm" -n serve "${SCORE_SETTINGS[@]}" RUNNER=docker \
             SERVE_MODEL=models/tiny-qwen3 IMAGE_PREFIX=$PREFIX TAG="$TAG" | grep -F -e '--entrypoint vllm' || true)
[[ $serve_line =~ --entrypoint\ vllm\ (.*\ )?$PREFIX-vllm:$TAG\ serve\  ]] \
  || die "make serve does not run vllm through --entrypoint vllm in $VLLM_IMAGE: ${serve_line:-no such command}"
score_in_vllm_image() {
  local m
  for m in $DEMO_MODELS; do
    clean_make "$WORK/vllm.home" "$WORK/vllm" score "${SCORE_SETTINGS[@]}" RUNNER=docker MODEL="${m#*=}" LABEL="${m%%=*}" \
      NVFP4_COMPUTE=declared IMAGE_PREFIX=$PREFIX TAG="$TAG" \
      DOCKER_ARGS="--network none --label qscore.test-images=$RUN_ID"
  done
}
step score-vllm-image score_in_vllm_image
for m in $DEMO_MODELS; do
  grep -q -E "docker run .* -u $CTR_USER_RE .*-v \S+:/hf:ro .*-v $WORK/vllm/models:/models:ro .* $VLLM_IMAGE score --model \S+ --label ${m%%=*} " \
    "$WORK/logs/score-vllm-image.log" \
    || die "${m%%=*} was not scored in $VLLM_IMAGE as $CTR_USER with models/ and the HF cache read-only (see $WORK/logs/score-vllm-image.log)"
done
! grep -q -e '--gpus' "$WORK/logs/score-vllm-image.log" || die "the vLLM image's scoring asked for a GPU"
say "images:"
# docker trims the format's leading blanks, so the indent is added after the match
docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' \
  | grep -E "^($PREFIX-(aggregate|quantize|vllm):$TAG|$TORCH_BASE|$VLLM_BASE|${PYTHON_BASE})  " | sed 's/^/  /' || true
LABELS=$(for m in $DEMO_MODELS; do printf '%s,' "${m%%=*}"; done)
say "comparing the vLLM image's scoring ($WORK/vllm) with $WORK/local"
if ! "$PY" "$HERE/compare.py" --local "$WORK/local" --docker "$WORK/vllm" --results "$RESULTS" \
    --labels "${LABELS%,}" --vllm-image | tee "$WORK/logs/compare-vllm.log"; then
  # rows that differ may be another arithmetic: NVFP4 scored weight-only where W4A4 was declared
  for m in $DEMO_MODELS; do
    [[ -d $WORK/local/$RESULTS/logprobs/model=${m%%=*}-w4a16 ]] || continue
    mkdir -p "$WORK/w4a16/$RESULTS/logprobs" "$WORK/w4a16/models"
    cp -al "$WORK/local/$RESULTS/logprobs/model=${m%%=*}-w4a16" "$WORK/w4a16/$RESULTS/logprobs/model=${m%%=*}"
    if "$PY" - "$WORK/w4a16/$RESULTS/logprobs/model=${m%%=*}" "$WORK/vllm/$RESULTS/logprobs/model=${m%%=*}" <<'EOF'
import sys, pathlib, pyarrow.parquet as pq
a, b = map(pathlib.Path, sys.argv[1:])
parts = sorted(p.relative_to(a) for p in a.rglob("*.parquet"))
sys.exit(0 if parts and all((b / p).exists() and pq.read_table(a / p).select(["logprob", "topk_ids"]).equals(
    pq.read_table(b / p).select(["logprob", "topk_ids"])) for p in parts) else 1)
EOF
    then
      say "${m%%=*}: the vLLM image's rows, scored with NVFP4 as declared (W4A4), are the local demo's ${m%%=*}-w4a16 rows: its stack computed weight-only arithmetic"
    fi
  done
  die "the vLLM image's scoring differs from the local run's (see above)"
fi

say "times:"
printf '  %s\n' "${TIMES[@]}"
STATUS=0
say "OK: the aggregate and quantize images reproduce the local demo, and the vLLM image its scoring"
