# qscore: the map of the pipeline.
#
#   quantize ──> validate                       (make sweep: one quantize per recipe of SWEEP and seed)
#       └──────> eval (one scoring job per model), tasks, bench (what it costs to serve) ──> report
#
# Every job and its command come from the job plan, `python3 -m jobs plan` (jobs/runs/plan.py): it reads
# the variables below, checks them, and writes the rules make runs into $TMPDIR/qscore-plan-<uid>/jobs-<sum>.mk,
# included here. `make plan` prints each job with its command for both runners; `make -n TARGET` prints
# what would run; `make k8s` and `make slurm` hand the same scoring jobs to a cluster.
#
# `make` (= `make help`) lists every target and variable with its current value. Variables come from,
# strongest first: the command line, the environment, `.env` (see .env.example). Empty means the default,
# which lives in one place: the stage's option (`python -m jobs <stage> --help`), the plan for what the
# pipeline derives (MODELS, QUANT_OUTPUT, ...), or below for make's own. RUNNER: docs/cuda-host.md.
#
# Stamps: every job's target is a file, so `make quantize eval report` redoes only what is missing or stale,
# and parallel jobs (up to JOBS at once; GPU jobs wait for their share of a GPU: jobs.runs.slots) never write
# one file twice. quantize: <QUANT_OUTPUT>/qscore.json, written last, never redone while it exists; others:
# $(RESULTS_DIR)/.stamps/<job id>.<checksum of its arguments>.ok (validate: .log), written once it succeeded,
# ignored when an output it vouches for is gone. A job redone because an input changed replaces its output
# (--overwrite); else the stage skips work done, resumes, and keeps other settings' results unless OVERWRITE=1.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
.SUFFIXES:
MAKEFLAGS += --no-builtin-rules --no-builtin-variables

# .env: plain KEY=value lines; every one reaches the stages (exported), locally as in containers
-include .env
export $(shell sed -n 's/^[[:space:]]*\([A-Za-z_][A-Za-z0-9_]*\)[[:space:]]*=.*/\1/p' .env 2>/dev/null)

## MODEL_ID: model to quantize (Hugging Face id or local path) [default Qwen/Qwen3-14B]
## NVIDIA_MODEL: vendor NVFP4 checkpoint scored beside it [default nvidia/Qwen3-14B-NVFP4]
## SCHEME: llm-compressor quantization scheme (quantize --scheme)
## QUANT_OUTPUT: where quantize writes (under models/) [default models/<name of MODEL_ID>-<SCHEME>]
## CALIBRATION_DATASET: calibration data: hub dataset id or local .jsonl/.parquet/.txt
## CALIBRATION_SPLIT: split of a hub calibration dataset (not passed for a local file)
## NUM_CALIBRATION_SAMPLES: calibration samples
## MAX_SEQUENCE_LENGTH: calibration sequence length (tokens)
## QUANTIZE_ARGS: extra options for `jobs quantize` (e.g. --spinquant, --ignore lm_head)
## SWEEP: `make sweep`: recipes of MODEL_ID, SCHEME[+spinquant][@SAMPLES] or LABEL=PATH (e.g. NVFP4 NVFP4+spinquant FP8_DYNAMIC W4A16)
## SWEEP_SEEDS: `make sweep`: calibration seeds; a recipe that calibrates is quantized once per seed, as <recipe>.s<seed>
## BENCH_ARGS: extra options for `jobs bench` (e.g. --input-len 1024 --loaded-concurrency 32)
## MODELS: label=path pairs to score [default bf16=MODEL_ID llmc-<scheme>=QUANT_OUTPUT nvidia-<scheme>=NVIDIA_MODEL]
## DATASETS: evaluation sets: wikitext2, ultrachat, NAME=PATH or PATH (.txt/.jsonl/.parquet) [default wikitext2 ultrachat]
## N_WIKITEXT: WikiText-2 texts kept
## N_ULTRACHAT: UltraChat texts kept
## MAX_MODEL_LEN: context for validate, scoring and tasks; longer texts are cut to MAX_MODEL_LEN-8 tokens
## BASELINE: label the report compares against [default the first label of MODELS]
## TOKENIZER: `make eval`: one tokenizer for every model [default the BASELINE model's]; `make score`: the model's own
## BACKEND: auto | vllm | transformers (validate, score, tasks)
## TOPK: candidates kept per position (KL divergence, top-k agreement; 1 = top-1 only)
## NVFP4_COMPUTE: NVFP4 arithmetic: declared (W4A4 as the checkpoint says) or weight-only (W4A16)
## WEIGHT_ONLY: labels of NVFP4 models in MODELS to score again in weight-only arithmetic, as <label>-w4a16
## SHARDS: split each model's sets into this many jobs (one GPU each; the report merges them) [default 1]
## TENSOR_PARALLEL_SIZE: GPUs per scoring job (vLLM tensor parallelism)
## GPU_MEMORY_UTILIZATION: vLLM's share of GPU memory
## SCORE_ARGS: extra options for `jobs score` (e.g. --enforce-eager)
## OVERWRITE: 1 = quantize/score/tasks may replace an output made with other settings (they refuse otherwise)
## MODEL: `make score`: the checkpoint to score (hub id or local path)
## LABEL: `make score`: its label; `make compare`: the labels compared with BASE
## BASE: `make compare`: the baseline label of a report of BASE and LABEL only
## SERVE_MODEL: `make serve`: model to serve [default QUANT_OUTPUT]
## PORT: `make serve`: port of the OpenAI-compatible server [default 8000]
## RESULTS_DIR: per-token logprobs (Parquet), task results, stamps [default results]
## REPORT_DIR: summary.json, summary.csv, report.md, plots [default RESULTS_DIR/report]
## RUNNER: local | docker: where stages run [default local; set it in .env to keep it]
## GPUS: GPUs the jobs may use: all, device=0, '"device=0,1"' or 0,1; scoring jobs share one where they fit; empty: none
GPUS ?= all
## JOBS: jobs make runs at once (make -jN wins); GPU jobs also wait for their GPU share [default 8 with GPUs, 1 on a CPU host]
JOBS ?= $(if $(and $(GPUS),$(shell nvidia-smi -L 2>/dev/null)),8,1)
## HF_HOME: Hugging Face cache on the host (mounted at /hf in containers)
HF_HOME ?= $(HOME)/.cache/huggingface
## HF_TOKEN: Hugging Face token for gated models (passed to containers by name, never printed)
## CACHE_DIR: host cache for vLLM/Triton compile caches (mounted at /cache)
CACHE_DIR ?= $(HOME)/.cache/qscore
## TAG: tag of the three images
TAG ?= latest
## IMAGE_PREFIX: image names: <prefix>-quantize, <prefix>-vllm, <prefix>-aggregate
IMAGE_PREFIX ?= qscore
## QUANTIZE_BASE: `make images`: another CUDA PyTorch base for the quantize image (empty: the Dockerfile's)
## VLLM_BASE: `make images`: another base for the vLLM image (empty: the Dockerfile's vllm/vllm-openai:v0.26.0)
## DOCKER_ARGS: extra `docker run` options (e.g. --shm-size 16g)
## DOCKER_USER: uid:gid the containers run as [default yours; the images' user 10001 when you are root]
## K8S_PVC: `make k8s`: the PersistentVolumeClaim holding models/, data/ and results/ [default qscore-workspace]
## K8S_REGISTRY: `make k8s`: registry prefix of the images, e.g. registry.example.com/team/
## K8S_HF_SECRET: `make k8s`: Secret whose key `token` is the Hugging Face token [default hf-token]
## SLURM_PREFIX: `make slurm`: launcher before each job, e.g. srun --container-image=qscore-vllm.sqsh
## VENV: local venv (RUNNER=local and the demo), made by `make setup`
VENV ?= .venv
## VLLM_VENV: local venv with vLLM for validate/score/tasks/serve when RUNNER=local; VENV if absent
VLLM_VENV ?= .venv-vllm
## DEMO_RESULTS_DIR: where `make demo` writes its logprobs and report
DEMO_RESULTS_DIR ?= results/demo
## DEMO_RUNNER: where `make demo` runs its stages: local, or docker (the images, on the CPU: `make test-images`)
DEMO_RUNNER ?= local
## NOISE_MODELS: `make noise-floor`: labels of MODELS scored again through another path as <label>~noise [default BASELINE]
## NOISE_LABEL: `make noise-floor`: label of the baseline scored a second time [default <BASELINE>~noise]
## NOISE_BACKEND: `make noise-floor`: backend of that second scoring [default transformers]
## NOISE_ARGS: `make noise-floor`: extra `jobs score` options for it (e.g. --dtype float32)
## TASKS: `make tasks`: lm-eval tasks, groups or tags (qscore_local: the bundled offline tasks)
## LIMIT: `make tasks`: first N documents of each task, a quick look not comparable with full runs
## NUM_FEWSHOT: `make tasks`: few-shot examples per prompt [default each task's own, gsm8k 5]
## CHAT_TEMPLATE: `make tasks`: none (plain prompts), default (the tokenizer's) or a template's name
## RECOVERY_MIN: task accuracy recovery (model / baseline) in (0, 1] below which a task fails
## TASKS_ARGS: extra options for `jobs tasks` (e.g. --no-add-bos-token)
VLLM_VERSION := 0.26.0
PYTHON3 ?= python3
export GPUS HF_HOME CACHE_DIR TAG IMAGE_PREFIX VENV VLLM_VENV PYTHON3
PY := $(VENV)/bin/python
SETUP_STAMP := $(VENV)/.qscore-setup
VLLM_SETUP_STAMP := $(VLLM_VENV)/.qscore-setup-vllm
# --overwrite when a job is redone because an input is newer than its stamp (its output is stale); not
# when it only runs because an output is missing (FORCE): the stage resumes or skips what it has
STALE = $(if $(and $(wildcard $@),$(filter-out FORCE,$?)), --overwrite)

# The plan: checked and written on every run (it is quick); a bad variable stops every target but these.
# GNU make 4.3's $(shell) sees only the environment make started with: the variables go by name (the
# documented ones, .env's, and a few more), and HF_TOKEN never (the plan passes it to containers by name).
NO_PLAN := help setup setup-vllm test test-images images image-quantize image-vllm image-aggregate demo
MAKEFLAGS += $(if $(filter 0,$(MAKELEVEL)),$(if $(filter-out $(NO_PLAN),$(MAKECMDGOALS)),-j$(JOBS)))
PLAN_VARS := $(filter-out HF_TOKEN,$(sort $(shell sed -n 's/^## \([A-Z0-9_]*\): .*/\1/p' $(firstword $(MAKEFILE_LIST))) \
  $(shell sed -n 's/^[[:space:]]*\([A-Za-z_][A-Za-z0-9_]*\)[[:space:]]*=.*/\1/p' .env 2>/dev/null) \
  PYTHON3 VLLM_IMAGE QUANTIZE_IMAGE AGGREGATE_IMAGE HF_HUB_OFFLINE K8S_NAME K8S_PARALLELISM SLURM_SBATCH \
  SLURM_PYTHON SLURM_AGGREGATE_PYTHON SLURM_QUANTIZE_PREFIX CALIBRATION_BATCH_SIZE CALIBRATION_SEED))
shq = '$(subst ','\'',$(1))'
PLAN_ENV = $(foreach v,$(PLAN_VARS),$(if $(filter undefined,$(origin $(v))),,$(v)=$(call shq,$($(v)))))
PLAN := env $(PLAN_ENV) $(PYTHON3) -m jobs plan
PLAN_MK := $(shell $(PLAN) --format make 2>&1)
ifeq ($(.SHELLSTATUS),0)
include $(PLAN_MK)
else ifneq ($(filter-out $(NO_PLAN),$(or $(MAKECMDGOALS),help)),)
$(error $(PLAN_MK))
endif

.PHONY: help setup setup-vllm demo test test-images images image-quantize image-vllm image-aggregate quantize \
  validate eval score tasks bench sweep noise-floor report aggregate compare serve clean FORCE plan k8s slurm

help: ## show this help (the default target)
	@printf 'qscore: quantize a model, check that vLLM loads it, score checkpoints token by token, report.\n\n'
	@printf 'Usage: make [TARGET ...] [VAR=value ...]      (RUNNER=%s; variables also from .env)\n\nTargets:\n' '$(or $(RUNNER),local)'
	@awk -F':.*## ' '/^[a-z][a-z0-9-]*:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(firstword $(MAKEFILE_LIST))
	@printf '\nVariables [current value]:\n'
	@$(PLAN) --format vars > /tmp/qscore-vars-$$$$ 2>/dev/null || true; \
	awk '/^## [A-Z0-9_]+: / {n=$$2; sub(/:$$/, "", n); d=$$0; sub(/^## [A-Z0-9_]+: /, "", d); print n "\t" d}' \
	  $(firstword $(MAKEFILE_LIST)) | while IFS=$$'\t' read -r name desc; do \
	  val="$$(sed -n "s/^$$name=//p" /tmp/qscore-vars-$$$$)"; val="$${val:-$${!name:-}}"; \
	  [ "$$name" = HF_TOKEN ] && val=$$([ -n "$${HF_TOKEN:-}" ] && echo set || echo empty); \
	  printf '  %-24s %s\n  %-24s   [%s]\n' "$$name" "$$desc" "" "$$val"; done; rm -f /tmp/qscore-vars-$$$$
	@printf '\nExamples:\n  make demo    # the whole pipeline on a tiny model, CPU, offline\n  make images quantize validate eval report\n  make sweep SWEEP="NVFP4 FP8_DYNAMIC W4A16" SWEEP_SEEDS="1 2"\n  make score MODEL=org/new LABEL=new && make compare BASE=bf16 LABEL=new\n'

setup: $(SETUP_STAMP) ## create the local venv VENV from requirements/dev.txt (once)
$(SETUP_STAMP): requirements/dev.txt requirements/torch-cpu.txt requirements/quantize.txt
	$(PYTHON3) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements/dev.txt
	touch $@

setup-vllm: $(VLLM_SETUP_STAMP) ## create VLLM_VENV with vllm==0.26.0 + requirements/vllm.txt (RUNNER=local on a CUDA host)
$(VLLM_SETUP_STAMP): requirements/vllm.txt
	$(PYTHON3) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install vllm==$(VLLM_VERSION) transformers==5.17.0 -r requirements/vllm.txt
	touch $@

test: $(SETUP_STAMP) ## run the CPU test suite (pytest -m "not gpu") in VENV
	$(PY) -m pytest -m "not gpu"

test-images: $(SETUP_STAMP) ## build the three images on CPU stand-in bases, run the demo and the vLLM image's scoring in them, compare with the local demo
	bash tests/images/test-images.sh

# The demo: a tiny BF16 Qwen3 and its ModelOpt NVFP4 copy (test fixtures, built with the venv: no image has
# nvidia-modelopt), then the pipeline on them.
DEMO_BASE     := models/tiny-qwen3
DEMO_QUANT    := models/tiny-qwen3-nvfp4
DEMO_MODELOPT := models/tiny-qwen3-modelopt-nvfp4
FIXTURES      := $(PY) tests/fixtures/cli.py
DEMO_VARS = VLLM_VENV=$(VENV) MODEL_ID=$(DEMO_BASE) QUANT_OUTPUT=$(DEMO_QUANT) SCHEME=NVFP4 \
	  CALIBRATION_DATASET=data/calib_mini.jsonl CALIBRATION_SPLIT= NUM_CALIBRATION_SAMPLES=64 MAX_SEQUENCE_LENGTH=256 \
	  QUANTIZE_ARGS= MODELS="bf16=$(DEMO_BASE) llmc-nvfp4=$(DEMO_QUANT) modelopt-nvfp4=$(DEMO_MODELOPT)" \
	  WEIGHT_ONLY="llmc-nvfp4 modelopt-nvfp4" NVFP4_COMPUTE=declared SHARDS=1 TENSOR_PARALLEL_SIZE= GPUS= \
	  DATASETS="wiki_mini=data/wiki_mini.txt chat_mini=data/chat_mini.jsonl wikitext2_doc=data/wiki_mini.txt" \
	  BASELINE=bf16 TOKENIZER=$(DEMO_BASE) BACKEND=transformers MAX_MODEL_LEN=256 TOPK=20 \
	  NOISE_LABEL=bf16~noise NOISE_BACKEND=transformers NOISE_ARGS="--dtype bfloat16" MODEL= LABEL= BASE= \
	  GPU_MEMORY_UTILIZATION= SCORE_ARGS= RESULTS_DIR=$(DEMO_RESULTS_DIR) REPORT_DIR=$(DEMO_RESULTS_DIR)/report \
	  TASKS=qscore_local LIMIT= NUM_FEWSHOT= CHAT_TEMPLATE=none RECOVERY_MIN= TASKS_ARGS= OVERWRITE= \
	  HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# DEMO_RUNNER=docker: quantize, validate, score (transformers) in the quantize image (the vLLM image needs a
# GPU), the report in the aggregate image; tasks locally (lm-eval is in the vLLM image only).
DEMO_DOCKER = $(if $(filter docker,$(DEMO_RUNNER)),RUNNER=docker VLLM_IMAGE=$(IMAGE_PREFIX)-quantize:$(TAG),RUNNER=local)

demo: $(SETUP_STAMP) $(DEMO_BASE)/config.json $(DEMO_MODELOPT)/config.json ## the whole pipeline on a tiny Qwen3 (and the bundled tasks), CPU, offline -> DEMO_RESULTS_DIR/report (DEMO_RUNNER)
	$(MAKE) --no-print-directory $(DEMO_VARS) $(DEMO_DOCKER) validate eval $(if $(filter docker,$(DEMO_RUNNER)),,tasks )noise-floor \
	  && $(MAKE) --no-print-directory $(DEMO_VARS) $(DEMO_DOCKER) noise-floor NOISE_MODELS=llmc-nvfp4 NOISE_ARGS='--dtype float32'
	$(if $(filter docker,$(DEMO_RUNNER)),$(MAKE) --no-print-directory $(DEMO_VARS) RUNNER=local tasks)
	$(MAKE) --no-print-directory $(DEMO_VARS) $(DEMO_DOCKER) report

$(DEMO_BASE)/config.json: | $(SETUP_STAMP)
	HF_HUB_OFFLINE=1 $(FIXTURES) build-tiny --output $(DEMO_BASE)
$(DEMO_MODELOPT)/config.json: $(DEMO_BASE)/config.json | $(SETUP_STAMP)
	HF_HUB_OFFLINE=1 $(FIXTURES) export-modelopt --model $(DEMO_BASE) --output $(DEMO_MODELOPT)$(if $(wildcard $@), --overwrite)

images: image-quantize image-vllm image-aggregate ## build the three images (TAG, IMAGE_PREFIX, QUANTIZE_BASE, VLLM_BASE)
BUILD_ARGS = --build-arg VERSION=$(shell sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml 2>/dev/null) --build-arg REVISION=$(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
image-quantize: ## build IMAGE_PREFIX-quantize:TAG (llm-compressor on CUDA PyTorch)
	docker build -f docker/quantize.Dockerfile -t $(IMAGE_PREFIX)-quantize:$(TAG) $(BUILD_ARGS)$(if $(QUANTIZE_BASE), --build-arg BASE_IMAGE=$(QUANTIZE_BASE)) .
image-vllm: ## build IMAGE_PREFIX-vllm:TAG (vllm/vllm-openai:v0.26.0 + jobs)
	docker build -f docker/vllm.Dockerfile -t $(IMAGE_PREFIX)-vllm:$(TAG) $(BUILD_ARGS)$(if $(VLLM_BASE), --build-arg BASE_IMAGE=$(VLLM_BASE)) .
image-aggregate: ## build IMAGE_PREFIX-aggregate:TAG (python slim, no torch)
	docker build -f docker/aggregate.Dockerfile -t $(IMAGE_PREFIX)-aggregate:$(TAG) $(BUILD_ARGS) .

quantize: $(QS_quantize) ## quantize MODEL_ID with SCHEME into QUANT_OUTPUT (once: the stage writes QUANT_OUTPUT/qscore.json last)
validate: $(QS_validate) ## check that QUANT_OUTPUT loads (BACKEND), is quantized as SCHEME says, and generates text
eval: $(QS_eval) ## score every model in MODELS on every set in DATASETS: one job per model, JOBS at once, sharing GPUs where they fit
bench: $(QS_bench) ## what every model in MODELS costs to serve (size, GPU memory, KV cache, speed): one job per model, alone on a GPU
sweep: $(QS_quantize) $(QS_eval) $(QS_tasks) $(QS_bench) $(QS_report) ## quantize every recipe of SWEEP (per seed), then eval, tasks, bench and the report's deploy table
tasks: $(QS_tasks) ## task accuracy (lm-eval TASKS) of every model in MODELS: one job per model, per-sample Parquet
score: $(QS_score) ## score one checkpoint: make score MODEL=path-or-id LABEL=name (one job, every set in DATASETS, nothing else)
	$(if $(QS_score),@:,$(error make score needs MODEL=<hub id or local path> LABEL=<name>))
noise-floor: $(QS_noise) ## score NOISE_MODELS again with NOISE_BACKEND and NOISE_ARGS: noise floor and path noise
	$(if $(QS_noise),@:,$(error BASELINE is not a label of MODELS: no model to score again))
report: $(QS_report) ## aggregate every result in RESULTS_DIR against BASELINE into REPORT_DIR (runs eval first)

aggregate: ## aggregate what RESULTS_DIR holds now against BASELINE, without scoring anything first
	$(QS_CMD_aggregate)

compare: ## a report of BASE and LABEL only: make compare BASE=bf16 LABEL=new -> RESULTS_DIR/compare/BASE-vs-LABEL
	$(if $(QS_CMD_compare),$(QS_CMD_compare),$(error make compare needs BASE=<label> (and LABEL=<labels>)))

serve: ## serve SERVE_MODEL (default QUANT_OUTPUT) with vLLM on PORT
	$(QS_CMD_serve)

plan: ## print every job of the plan (JSON lines: id, stage, commands for local and docker, inputs, outputs, stamp)
	@$(PLAN)

k8s: ## render the scoring jobs as a Kubernetes Indexed Job + aggregate Job: RESULTS_DIR/cluster/qscore-k8s.json
	@mkdir -p '$(QS_RESULTS)/cluster'
	@$(PLAN) --format k8s > '$(QS_RESULTS)/cluster/qscore-k8s.json.tmp'
	@mv '$(QS_RESULTS)/cluster/qscore-k8s.json.tmp' '$(QS_RESULTS)/cluster/qscore-k8s.json'
	@echo "kubectl apply -f $(QS_RESULTS)/cluster/qscore-k8s.json"

slurm: ## render the scoring jobs as a Slurm job array: RESULTS_DIR/cluster/qscore.sbatch (the report: its own job)
	@mkdir -p '$(QS_RESULTS)/cluster'
	@$(PLAN) --format slurm > '$(QS_RESULTS)/cluster/qscore.sbatch.tmp'
	@mv '$(QS_RESULTS)/cluster/qscore.sbatch.tmp' '$(QS_RESULTS)/cluster/qscore.sbatch'
	@$(PLAN) --format slurm-submit

clean: ## delete results (logprobs, task results, report, stamps) and the demo's models; keeps other models and caches
	rm -rf $(addprefix $(QS_RESULTS)/,logprobs tasks report .stamps) $(DEMO_RESULTS_DIR) $(DEMO_BASE) $(DEMO_QUANT) $(DEMO_MODELOPT)

FORCE:
