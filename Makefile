# qscore: the map of the pipeline.
#
#   quantize ──> validate
#       │
#       └──────> eval (one scoring job per model × evaluation set) ──> report
#
# `make` (= `make help`) lists every target and variable with its current value.
# Variables come from, strongest first: the command line, `.env` (copy .env.example), the
# environment, the defaults below (which match .env.example). An empty value means the default
# (except GPUS, where it means no GPU).
# Each stage runs either in its container (RUNNER=docker, the default when a Docker engine answers)
# or in a local venv (RUNNER=local). See docs/cuda-host.md.
#
# Stamps: every stage target is a file, so `make quantize eval report` redoes only what is missing
# or stale, and `make -j` never has two recipes write the same file.
#   quantize   <QUANT_OUTPUT>/qscore.json, written by the stage when the checkpoint is complete. It is
#              never redone while it exists (hours of GPU): use another QUANT_OUTPUT, or delete it.
#   validate   $(RESULTS_DIR)/.stamps/validate/<model>.<sum>.log (what the stage printed)
#   score      $(RESULTS_DIR)/.stamps/score/<label>/<set>.<sum>.ok, one per (model, set); the job
#              finishes by renaming $(RESULTS_DIR)/logprobs/model=<label>/dataset=<set>/ into place
#   report     $(RESULTS_DIR)/.stamps/report/<dir>.<sum>.ok, beside $(REPORT_DIR)/summary.json
#   demo       models/.stamps/{build-tiny,export-modelopt}/... for its two fixtures
# <sum> is a checksum of the stage's arguments: changing one (N_WIKITEXT, MAX_MODEL_LEN, BACKEND, ...)
# names a new stamp, so the job runs again. A stamp is written only after its job succeeded and is
# ignored when the output it vouches for is gone: delete an output to redo it. A job redone because a
# prerequisite changed (a new quantized checkpoint, an edited data file) replaces its old output
# (--overwrite); otherwise the stage itself skips work already done with the same inputs, resumes an
# interrupted run, and refuses to replace results made with other settings unless OVERWRITE=1.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
.SUFFIXES:
MAKEFLAGS += --no-builtin-rules --no-builtin-variables

-include .env

# $(call default,NAME,VALUE): NAME keeps a non-empty value from the command line, .env or the
# environment; otherwise it gets VALUE.
default = $(if $(strip $($(1))),,$(eval override $(1) := $(2)))
lc = $(shell printf '%s' '$(1)' | tr '[:upper:]' '[:lower:]')

## MODEL_ID: model to quantize (Hugging Face id or local path)
$(call default,MODEL_ID,Qwen/Qwen3-14B)
## NVIDIA_MODEL: vendor NVFP4 checkpoint scored beside it
$(call default,NVIDIA_MODEL,nvidia/Qwen3-14B-NVFP4)
## SCHEME: llm-compressor quantization scheme
$(call default,SCHEME,NVFP4)
## QUANT_OUTPUT: where quantize writes (under models/); default models/<name of MODEL_ID>-<SCHEME>
$(call default,QUANT_OUTPUT,models/$(notdir $(MODEL_ID))-$(SCHEME))
## CALIBRATION_DATASET: calibration data (hub dataset id or local .jsonl/.parquet/.txt)
$(call default,CALIBRATION_DATASET,HuggingFaceH4/ultrachat_200k)
## CALIBRATION_SPLIT: split of a hub calibration dataset (not passed for a local file)
$(call default,CALIBRATION_SPLIT,train_sft)
## NUM_CALIBRATION_SAMPLES: calibration samples
$(call default,NUM_CALIBRATION_SAMPLES,1024)
## MAX_SEQUENCE_LENGTH: calibration sequence length (tokens)
$(call default,MAX_SEQUENCE_LENGTH,2048)
## QUANTIZE_ARGS: extra options for `jobs quantize` (e.g. --spinquant, --ignore lm_head)
QUANTIZE_ARGS ?=
## MODELS: label=path pairs to score; default bf16=MODEL_ID llmc-<scheme>=QUANT_OUTPUT nvidia-<scheme>=NVIDIA_MODEL
$(call default,MODELS,bf16=$(MODEL_ID) llmc-$(call lc,$(SCHEME))=$(QUANT_OUTPUT) nvidia-$(call lc,$(SCHEME))=$(NVIDIA_MODEL))
## DATASETS: evaluation sets: wikitext2, ultrachat, NAME=PATH or PATH (.txt/.jsonl/.parquet under data/)
$(call default,DATASETS,wikitext2 ultrachat)
## N_WIKITEXT: WikiText-2 texts kept
$(call default,N_WIKITEXT,200)
## N_ULTRACHAT: UltraChat texts kept
$(call default,N_ULTRACHAT,200)
## MAX_MODEL_LEN: context for scoring; longer texts are truncated to MAX_MODEL_LEN-8 tokens
$(call default,MAX_MODEL_LEN,2048)
## BASELINE: label the report compares against; default the first label of MODELS
$(call default,BASELINE,$(firstword $(subst =, ,$(firstword $(MODELS)))))
## TOKENIZER: one tokenizer for every model scored; default the BASELINE model's
$(call default,TOKENIZER,$(patsubst $(BASELINE)=%,%,$(filter $(BASELINE)=%,$(MODELS))))
## BACKEND: auto | vllm | transformers (validate and score)
$(call default,BACKEND,auto)
## TOPK: candidates kept per position (1 = top-1 only)
$(call default,TOPK,1)
## GPU_MEMORY_UTILIZATION: vLLM's share of GPU memory (empty: the CLI's default, 0.85)
GPU_MEMORY_UTILIZATION ?=
## SCORE_ARGS: extra options for `jobs score` (e.g. --tensor-parallel-size 2 --enforce-eager)
SCORE_ARGS ?=
## OVERWRITE: 1 = quantize/score may replace an output made with other settings (they refuse otherwise)
OVERWRITE ?=
## MODEL: `make score`: the checkpoint to score (hub id or local path)
MODEL ?=
## LABEL: `make score`: its label in results and the report
LABEL ?=
## SERVE_MODEL: `make serve`: model to serve; default QUANT_OUTPUT
$(call default,SERVE_MODEL,$(QUANT_OUTPUT))
## PORT: `make serve`: port of the OpenAI-compatible server
$(call default,PORT,8000)
## RESULTS_DIR: per-token logprobs (Parquet) and stamps
$(call default,RESULTS_DIR,results)
## REPORT_DIR: summary.json, summary.csv, report.md, plots
$(call default,REPORT_DIR,$(RESULTS_DIR)/report)
## RUNNER: docker | local; default docker when `docker info` answers, else local
ifeq ($(strip $(RUNNER)),)
override RUNNER := $(shell docker info >/dev/null 2>&1 && echo docker || echo local)
endif
## GPUS: docker --gpus value: all, device=0, or '"device=0,1"'; empty (or none): no GPU, the stages run on the CPU
GPUS ?= all
## HF_HOME: Hugging Face cache on the host (mounted at /hf in containers)
$(call default,HF_HOME,$(HOME)/.cache/huggingface)
## HF_TOKEN: Hugging Face token for gated models (passed to containers by name, never printed)
HF_TOKEN ?=
## CACHE_DIR: host cache for vLLM/Triton compile caches (mounted at /cache)
$(call default,CACHE_DIR,$(HOME)/.cache/qscore)
## TAG: tag of the three images
$(call default,TAG,latest)
## IMAGE_PREFIX: image names: <prefix>-quantize, <prefix>-vllm, <prefix>-aggregate
$(call default,IMAGE_PREFIX,qscore)
## QUANTIZE_BASE: `make images`: another CUDA PyTorch base for the quantize image (empty: the Dockerfile's)
QUANTIZE_BASE ?=
## DOCKER_ARGS: extra `docker run` options (e.g. --shm-size 16g)
DOCKER_ARGS ?=
## DOCKER_USER: uid:gid the containers run as; default yours, so that what they write belongs to you
DOCKER_USER ?=
## VENV: local venv (RUNNER=local and the demo), made by `make setup`
$(call default,VENV,.venv)
## VLLM_VENV: local venv with vLLM for validate/score/serve when RUNNER=local (`make setup-vllm`); if absent, VENV is used
$(call default,VLLM_VENV,.venv-vllm)
## DEMO_RESULTS_DIR: where `make demo` writes its logprobs and report
$(call default,DEMO_RESULTS_DIR,results/demo)
## DEMO_RUNNER: where `make demo` runs its stages: local, or docker (the images, on the CPU: `make test-images`)
$(call default,DEMO_RUNNER,local)

VLLM_VERSION := 0.26.0
PYTHON3 ?= python3

export MODEL_ID NVIDIA_MODEL SCHEME QUANT_OUTPUT CALIBRATION_DATASET CALIBRATION_SPLIT \
  NUM_CALIBRATION_SAMPLES MAX_SEQUENCE_LENGTH QUANTIZE_ARGS MODELS DATASETS N_WIKITEXT N_ULTRACHAT \
  MAX_MODEL_LEN BASELINE TOKENIZER BACKEND TOPK GPU_MEMORY_UTILIZATION SCORE_ARGS SERVE_MODEL PORT \
  RESULTS_DIR REPORT_DIR RUNNER GPUS HF_HOME HF_TOKEN CACHE_DIR TAG IMAGE_PREFIX QUANTIZE_BASE \
  DOCKER_ARGS VENV VLLM_VENV DEMO_RESULTS_DIR DEMO_RUNNER MODEL LABEL OVERWRITE

ifeq ($(filter docker local,$(RUNNER)),)
$(error RUNNER must be docker or local, not '$(RUNNER)')
endif
ifeq ($(filter docker local,$(DEMO_RUNNER)),)
$(error DEMO_RUNNER must be docker or local, not '$(DEMO_RUNNER)')
endif

IMG_QUANTIZE  = $(IMAGE_PREFIX)-quantize:$(TAG)
IMG_VLLM      = $(IMAGE_PREFIX)-vllm:$(TAG)
IMG_AGGREGATE = $(IMAGE_PREFIX)-aggregate:$(TAG)

PY      := $(VENV)/bin/python
VLLM_PY := $(if $(wildcard $(VLLM_VENV)/bin/python),$(VLLM_VENV)/bin/python,$(PY))
ENV_FILE := $(firstword $(wildcard .env .env.example))
STAMPS  := $(RESULTS_DIR)/.stamps
MSTAMPS := models/.stamps
SETUP_STAMP := $(VENV)/.qscore-setup
VLLM_SETUP_STAMP := $(VLLM_VENV)/.qscore-setup-vllm
# RUNNER=local: a stage run with VENV's python first makes VENV (`make setup`), once
NEEDS_VENV = $(if $(and $(filter local,$(RUNNER)),$(filter $(PY),$(1))),| $(SETUP_STAMP))

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
# the first 8 hex digits of the checksum of a string (names a stamp after a stage's arguments)
hash = $(shell printf '%s' '$(subst ','\'',$(strip $(1)))' | cksum | awk '{printf "%08x", $$1}')
# file-name-safe form of a path or label
san = $(subst /,_,$(subst :,_,$(patsubst ./%,%,$(1))))
# local path (vs a hub id): absolute, ./ ../ models/ data/, or existing
is_local = $(or $(filter /% ./% ../% models/% data/%,$(1)),$(wildcard $(1)))
# A path as a container sees it: models/x -> /models/x, data/x -> /data/x, another local path is
# mounted read-only at /mnt/host<absolute path>; a hub id passes through.
ctr_path = $(if $(call is_local,$(1)),$(call ctr_abs,$(abspath $(1))),$(1))
ctr_abs = $(if $(filter $(CURDIR)/models/% $(CURDIR)/data/%,$(1)),$(patsubst $(CURDIR)/%,/%,$(1)),/mnt/host$(1))
ctr_mount = $(if $(filter /mnt/host/%,$(call ctr_path,$(1))),-v $(abspath $(1)):$(call ctr_path,$(1)):ro)
# identity (RUNNER=local)
lp = $(1)
results_tp = $(if $(filter docker,$(RUNNER)),/results,$(RESULTS_DIR))
report_tp = $(if $(filter docker,$(RUNNER)),$(if $(filter $(RESULTS_DIR)/%,$(REPORT_DIR)),/results/$(patsubst $(RESULTS_DIR)/%,%,$(REPORT_DIR)),/report),$(REPORT_DIR))
report_mount = $(if $(filter $(RESULTS_DIR)/%,$(REPORT_DIR)),,-v $(abspath $(REPORT_DIR)):/report)

# MODELS entries: label=path
m_label = $(firstword $(subst =, ,$(1)))
m_path = $(patsubst $(call m_label,$(1))=%,%,$(1))
# DATASETS entries: NAME | NAME=PATH | PATH
ds_is_path = $(or $(findstring /,$(1)),$(findstring .,$(1)))
ds_name = $(if $(findstring =,$(1)),$(firstword $(subst =, ,$(1))),$(if $(call ds_is_path,$(1)),$(basename $(notdir $(1))),$(1)))
ds_path = $(if $(findstring =,$(1)),$(patsubst $(call ds_name,$(1))=%,%,$(1)),$(if $(call ds_is_path,$(1)),$(1)))
# the --datasets value of one set, its paths translated by function $(2)
ds_arg = $(if $(call ds_path,$(1)),$(call ds_name,$(1))=$(call $(2),$(call ds_path,$(1))),$(1))
# a local file a stage reads (a prerequisite), else nothing
file_dep = $(if $(call is_local,$(1)),$(wildcard $(1)))
# what makes a model directory: the stamp of the rule producing it, else its config.json if local
model_dep = $(or $(PRODUCER.$(patsubst ./%,%,$(1))),$(if $(call is_local,$(1)),$(wildcard $(1)/config.json)))
# the dataset directory a score job finishes by renaming into place
ds_dir = $(RESULTS_DIR)/logprobs/model=$(1)/dataset=$(2)
FORCE_IF_MISSING = $(if $(wildcard $(1)),,FORCE)

# docker run for a stage: $(1)=image, $(2)=what the stage is: gpu (a model stage: models/, data/, the caches,
# and the GPUs of GPUS unless GPUS is empty or none), cpu-models (the same mounts, never a GPU: build-tiny)
# or cpu (the results directory only: aggregate); $(3)=models mount mode (rw|ro), $(4)=extra mounts
docker_run = $(strip mkdir -p models $(RESULTS_DIR) $(if $(call model_stage,$(2)),$(HF_HOME) $(CACHE_DIR)) && \
  docker run --rm --pull never \
  $(if $(filter gpu,$(2)),$(if $(gpus),--gpus '$(GPUS)' )--ipc=host) $(if $(ENV_FILE),--env-file $(ENV_FILE)) $(if $(call model_stage,$(2)),$(HF_ENV)) \
  -u $(or $(strip $(DOCKER_USER)),$$(id -u):$$(id -g)) \
  $(if $(call model_stage,$(2)),-e HF_HOME=/hf -v $(HF_HOME):/hf -e XDG_CACHE_HOME=/cache -e TRITON_CACHE_DIR=/cache/triton -v $(CACHE_DIR):/cache \
  -v $(CURDIR)/models:/models$(if $(filter ro,$(3)),:ro) -v $(CURDIR)/data:/data:ro) -v $(abspath $(RESULTS_DIR)):/results \
  $(4) $(DOCKER_ARGS) $(1))
model_stage = $(filter gpu cpu-models,$(1))
# passed by name, so only where set: the token, and offline mode (`make demo` runs offline; the stages load
# differently, and transformers records local_files_only in a tokenizer it saves, when offline)
HF_ENV = -e HF_TOKEN -e HF_HUB_OFFLINE -e HF_DATASETS_OFFLINE -e TRANSFORMERS_OFFLINE
gpus = $(filter-out none,$(strip $(GPUS)))
# build-tiny trains on the bundled text, which jobs.tinymodel reads from data/ beside the package:
# /opt/qscore/data in the images (their WORKDIR and PYTHONPATH)
run_build_tiny_docker = $(call docker_run,$(IMG_QUANTIZE),cpu-models,rw,-v $(CURDIR)/data:/opt/qscore/data:ro) \
  build-tiny --output $(call ctr_path,$(DEMO_BASE))

# ---------------------------------------------------------------------------------------------
# Stage commands (arguments in local form hash the stamps, so a runner switch reruns nothing)
# ---------------------------------------------------------------------------------------------
quant_args = $(strip --model-id $(call $(1),$(MODEL_ID)) --output $(call $(1),$(QUANT_OUTPUT)) --scheme $(SCHEME) \
  --calibration-dataset $(call $(1),$(CALIBRATION_DATASET)) \
  $(if $(call is_local,$(CALIBRATION_DATASET)),,--calibration-split $(CALIBRATION_SPLIT) )--num-calibration-samples $(NUM_CALIBRATION_SAMPLES) \
  --max-sequence-length $(MAX_SEQUENCE_LENGTH) $(QUANTIZE_ARGS))
validate_args = --model $(call $(1),$(QUANT_OUTPUT)) --backend $(BACKEND) --expect-scheme $(SCHEME) --max-model-len $(MAX_MODEL_LEN)$(if \
  $(GPU_MEMORY_UTILIZATION), --gpu-memory-utilization $(GPU_MEMORY_UTILIZATION))
# $(1)=translation, $(2)=model path, $(3)=label, $(4)=comma-separated --datasets value, $(5)=set words
score_args = $(strip --model $(call $(1),$(2)) --label $(3) --datasets $(4)$(if $(TOKENIZER), --tokenizer $(call $(1),$(TOKENIZER))) \
  --max-model-len $(MAX_MODEL_LEN) --backend $(BACKEND) --topk $(TOPK) --results-dir $(if $(filter ctr_path,$(1)),/results,$(RESULTS_DIR)) \
  $(if $(filter wikitext2,$(5)),--n-wikitext $(N_WIKITEXT) )$(if $(filter ultrachat,$(5)),--n-ultrachat $(N_ULTRACHAT) )$(if \
  $(GPU_MEMORY_UTILIZATION),--gpu-memory-utilization $(GPU_MEMORY_UTILIZATION) )$(SCORE_ARGS))
aggregate_args = --results-dir $(results_tp) --baseline $(BASELINE) --report-dir $(report_tp)
aggregate_args_local = --results-dir $(RESULTS_DIR) --baseline $(BASELINE) --report-dir $(REPORT_DIR)

ifeq ($(RUNNER),docker)
run_quantize = $(call docker_run,$(IMG_QUANTIZE),gpu,rw,$(call ctr_mount,$(MODEL_ID)) $(call ctr_mount,$(CALIBRATION_DATASET))) quantize $(call quant_args,ctr_path)$(overwrite_flag)
run_validate = $(call docker_run,$(IMG_VLLM),gpu,ro) validate $(call validate_args,ctr_path)
# $(1)=model path, $(2)=label, $(3)=set words
run_score = $(call docker_run,$(IMG_VLLM),gpu,ro,$(call ctr_mount,$(1)) $(call ctr_mount,$(TOKENIZER)) $(foreach d,$(3),$(call ctr_mount,$(call ds_path,$(d))))) \
  score $(call score_args,ctr_path,$(1),$(2),$(call commas,$(foreach d,$(3),$(call ds_arg,$(d),ctr_path))),$(3))$(overwrite_flag)
run_aggregate = $(if $(report_mount),mkdir -p $(REPORT_DIR) && )$(call docker_run,$(IMG_AGGREGATE),cpu,,$(report_mount)) aggregate $(aggregate_args)
run_serve = $(call docker_run,$(IMG_VLLM),gpu,ro,$(call ctr_mount,$(SERVE_MODEL)) -p $(PORT):$(PORT) --entrypoint vllm) \
  serve $(call ctr_path,$(SERVE_MODEL)) --host 0.0.0.0 --port $(PORT) --max-model-len $(MAX_MODEL_LEN)
else
run_quantize = $(PY) -m jobs quantize $(call quant_args,lp)$(overwrite_flag)
run_validate = $(VLLM_PY) -m jobs validate $(call validate_args,lp)
run_score = $(VLLM_PY) -m jobs score $(call score_args,lp,$(1),$(2),$(call commas,$(foreach d,$(3),$(call ds_arg,$(d),lp))),$(3))$(overwrite_flag)
run_aggregate = $(PY) -m jobs aggregate $(aggregate_args)
run_serve = $(VLLM_VENV)/bin/vllm serve $(SERVE_MODEL) --port $(PORT) --max-model-len $(MAX_MODEL_LEN)
endif
run_build_tiny = $(if $(filter docker,$(RUNNER)),$(run_build_tiny_docker),$(PY) -m jobs build-tiny --output $(DEMO_BASE))
# --overwrite when asked (OVERWRITE=1) or when the target exists, i.e. is redone because it is stale
overwrite_flag = $(if $(or $(filter 1 yes true,$(OVERWRITE)),$(wildcard $@)), --overwrite)
empty :=
space := $(empty) $(empty)
comma := ,
commas = $(subst $(space),$(comma),$(strip $(1)))

# ---------------------------------------------------------------------------------------------
# Stamps
# ---------------------------------------------------------------------------------------------
QUANT_STAMP := $(QUANT_OUTPUT)/qscore.json
PRODUCER.$(patsubst ./%,%,$(QUANT_OUTPUT)) := $(QUANT_STAMP)
VALIDATE_STAMP := $(STAMPS)/validate/$(call san,$(QUANT_OUTPUT)).$(call hash,$(call validate_args,lp)).log
REPORT_STAMP := $(STAMPS)/report/$(call san,$(REPORT_DIR)).$(call hash,$(aggregate_args_local)).ok
# every (model, set) already in RESULTS_DIR, e.g. from `make score`: a newer one redoes the report
REPORT_INPUTS := $(wildcard $(RESULTS_DIR)/logprobs/model=*/dataset=*)

# The demo's fixtures: a tiny BF16 Qwen3 and its ModelOpt-format NVFP4 copy (always local, CPU).
DEMO_BASE     := models/tiny-qwen3
DEMO_QUANT    := models/tiny-qwen3-nvfp4
DEMO_MODELOPT := models/tiny-qwen3-modelopt-nvfp4
DEMO_BASE_STAMP     := $(MSTAMPS)/build-tiny/$(call san,$(DEMO_BASE)).ok
DEMO_MODELOPT_STAMP := $(MSTAMPS)/export-modelopt/$(call san,$(DEMO_MODELOPT)).ok
PRODUCER.$(DEMO_BASE) := $(DEMO_BASE_STAMP)
PRODUCER.$(DEMO_MODELOPT) := $(DEMO_MODELOPT_STAMP)

# One scoring job per (model, evaluation set): $(1)=label=path, $(2)=set word
define score_pair
$(eval _l := $(call m_label,$(1)))
$(eval _p := $(call m_path,$(1)))
$(eval _d := $(call ds_name,$(2)))
$(eval _s := $(STAMPS)/score/$(call san,$(_l))/$(call san,$(_d)).$(call hash,$(call score_args,lp,$(_p),$(_l),$(call ds_arg,$(2),lp),$(2))).ok)
$(eval EVAL_STAMPS += $(_s))
$(eval $(_s): S_MODEL := $(_p))
$(eval $(_s): S_LABEL := $(_l))
$(eval $(_s): S_SETS := $(2))
$(eval $(_s): $(call model_dep,$(_p)) $(call model_dep,$(TOKENIZER)) $(call file_dep,$(call ds_path,$(2))) $(call FORCE_IF_MISSING,$(call ds_dir,$(_l),$(_d))) $(call NEEDS_VENV,$(VLLM_PY)))
endef
EVAL_STAMPS :=
$(foreach m,$(MODELS),$(foreach d,$(DATASETS),$(call score_pair,$(m),$(d))))

# `make score MODEL=... LABEL=...`: one job over every set in DATASETS
SCORE_STAMP := $(STAMPS)/score/$(call san,$(LABEL))/_score.$(call hash,$(call score_args,lp,$(MODEL),$(LABEL),$(call commas,$(foreach d,$(DATASETS),$(call ds_arg,$(d),lp))),$(DATASETS))).ok
SCORE_MISSING := $(strip $(foreach d,$(DATASETS),$(call FORCE_IF_MISSING,$(call ds_dir,$(LABEL),$(call ds_name,$(d))))))

# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
.PHONY: help setup setup-vllm demo test test-images images image-quantize image-vllm image-aggregate quantize \
  validate eval score report aggregate serve clean FORCE

help: ## show this help (the default target)
	@printf 'qscore: quantize a model, check that vLLM loads it, score checkpoints token by token, report.\n\n'
	@printf 'Usage: make [TARGET ...] [VAR=value ...]      (RUNNER=%s; variables also from .env)\n\nTargets:\n' '$(RUNNER)'
	@awk -F':.*## ' '/^[a-z][a-z%-]*:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(firstword $(MAKEFILE_LIST))
	@printf '\nVariables (current value in brackets):\n'
	@awk '/^## [A-Z_]+: / {n=$$2; sub(/:$$/, "", n); d=$$0; sub(/^## [A-Z_]+: /, "", d); print n "\t" d}' $(firstword $(MAKEFILE_LIST)) | \
	while IFS=$$'\t' read -r name desc; do \
	  if [ "$$name" = HF_TOKEN ]; then val=$$([ -n "$${HF_TOKEN:-}" ] && echo set || echo empty); else val="$${!name:-}"; fi; \
	  printf '  %-24s %s\n  %-24s   [%s]\n' "$$name" "$$desc" "" "$$val"; \
	done
	@printf '\nExamples:\n  make demo                               # the whole pipeline on a tiny model, CPU, offline\n'
	@printf '  make images quantize validate eval report\n  make score MODEL=org/new-checkpoint LABEL=new && make report\n'

print-%: ## print a variable, e.g. make print-EVAL_STAMPS
	@printf '%s\n' '$($*)'

setup: $(SETUP_STAMP) ## create the local venv VENV from requirements/dev.txt (once)
$(SETUP_STAMP): requirements/dev.txt requirements/torch-cpu.txt requirements/quantize.txt
	$(PYTHON3) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements/dev.txt
	touch $@

setup-vllm: $(VLLM_SETUP_STAMP) ## create VLLM_VENV with vllm==0.26.0 + requirements/vllm.txt (RUNNER=local on a CUDA host)
$(VLLM_SETUP_STAMP): requirements/vllm.txt
	$(PYTHON3) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install vllm==$(VLLM_VERSION) -r requirements/vllm.txt
	touch $@

test: $(SETUP_STAMP) ## run the CPU test suite (pytest -m "not gpu") in VENV
	$(PY) -m pytest -m "not gpu"

test-images: $(SETUP_STAMP) ## build the aggregate and quantize images on CPU stand-in bases, run the demo in them, compare with the local demo
	bash tests/images/test-images.sh

# DEMO_RUNNER=docker: the same jobs in the images on the CPU (no --gpus), validate and score in the
# quantize image (transformers backend; the vLLM image needs a GPU); the ModelOpt fixture is still made
# locally, as nvidia-modelopt is in no image.
demo: $(SETUP_STAMP) ## the whole pipeline on a tiny Qwen3, CPU, offline -> DEMO_RESULTS_DIR/report (DEMO_RUNNER)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(MAKE) --no-print-directory RUNNER=$(DEMO_RUNNER) \
	  $(if $(filter docker,$(DEMO_RUNNER)),GPUS= IMG_VLLM=$(IMG_QUANTIZE)) \
	  VLLM_VENV=$(VENV) MODEL_ID=$(DEMO_BASE) QUANT_OUTPUT=$(DEMO_QUANT) SCHEME=NVFP4 \
	  CALIBRATION_DATASET=data/calib_mini.jsonl NUM_CALIBRATION_SAMPLES=64 MAX_SEQUENCE_LENGTH=256 QUANTIZE_ARGS= \
	  MODELS="bf16=$(DEMO_BASE) llmc-nvfp4=$(DEMO_QUANT) modelopt-nvfp4=$(DEMO_MODELOPT)" \
	  DATASETS="wiki_mini=data/wiki_mini.txt chat_mini=data/chat_mini.jsonl" \
	  BASELINE=bf16 TOKENIZER=$(DEMO_BASE) BACKEND=transformers MAX_MODEL_LEN=256 TOPK=1 \
	  GPU_MEMORY_UTILIZATION= SCORE_ARGS= RESULTS_DIR=$(DEMO_RESULTS_DIR) REPORT_DIR=$(DEMO_RESULTS_DIR)/report \
	  validate report

$(DEMO_BASE_STAMP): $(call FORCE_IF_MISSING,$(DEMO_BASE)/config.json) $(call NEEDS_VENV,$(PY))
	@mkdir -p $(@D)
	$(run_build_tiny)
	@touch $@

$(DEMO_MODELOPT_STAMP): $(DEMO_BASE_STAMP) $(call FORCE_IF_MISSING,$(DEMO_MODELOPT)/config.json) | $(SETUP_STAMP)
	@mkdir -p $(@D)
	$(PY) -m jobs export-modelopt --model $(DEMO_BASE) --output $(DEMO_MODELOPT)
	@touch $@

images: image-quantize image-vllm image-aggregate ## build the three images (TAG, IMAGE_PREFIX, QUANTIZE_BASE)
BUILD_ARGS = --build-arg VERSION=$(shell sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml 2>/dev/null) \
  --build-arg REVISION=$(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
image-quantize: ## build IMAGE_PREFIX-quantize:TAG (llm-compressor on CUDA PyTorch)
	docker build -f docker/quantize.Dockerfile -t $(IMG_QUANTIZE) $(BUILD_ARGS)$(if $(QUANTIZE_BASE), --build-arg BASE_IMAGE=$(QUANTIZE_BASE)) .
image-vllm: ## build IMAGE_PREFIX-vllm:TAG (vllm/vllm-openai:v0.26.0 + jobs)
	docker build -f docker/vllm.Dockerfile -t $(IMG_VLLM) $(BUILD_ARGS) .
image-aggregate: ## build IMAGE_PREFIX-aggregate:TAG (python slim, no torch)
	docker build -f docker/aggregate.Dockerfile -t $(IMG_AGGREGATE) $(BUILD_ARGS) .

quantize: $(QUANT_STAMP) ## quantize MODEL_ID with SCHEME into QUANT_OUTPUT (once: the stage writes QUANT_OUTPUT/qscore.json last)
$(QUANT_STAMP): $(call model_dep,$(MODEL_ID)) $(call file_dep,$(CALIBRATION_DATASET)) $(call NEEDS_VENV,$(PY))
	$(if $(and $(filter docker,$(RUNNER)),$(filter /mnt/host/%,$(call ctr_path,$(QUANT_OUTPUT)))),$(error QUANT_OUTPUT must be under models/ when RUNNER=docker))
	$(run_quantize)

validate: $(VALIDATE_STAMP) ## check that QUANT_OUTPUT loads (BACKEND), is quantized as SCHEME says, and generates sane text
$(VALIDATE_STAMP): $(QUANT_STAMP) $(call NEEDS_VENV,$(VLLM_PY))
	@mkdir -p $(@D)
	$(run_validate) | tee $@

eval: $(EVAL_STAMPS) ## score every model in MODELS on every set in DATASETS: one job per (model, set)
ifneq ($(strip $(EVAL_STAMPS)),)
$(EVAL_STAMPS):
	@mkdir -p $(@D)
	$(call run_score,$(S_MODEL),$(S_LABEL),$(S_SETS))
	@touch $@
endif

score: $(if $(filter score,$(MAKECMDGOALS)),$(SCORE_STAMP)) ## score one checkpoint: make score MODEL=path-or-id LABEL=name (one job, every set in DATASETS, nothing else)
ifneq ($(filter score,$(MAKECMDGOALS)),)
ifeq ($(and $(strip $(MODEL)),$(strip $(LABEL))),)
$(error make score needs MODEL=<hub id or local path> LABEL=<name>)
endif
$(SCORE_STAMP): $(call file_dep,$(MODEL)/config.json) $(foreach d,$(DATASETS),$(call file_dep,$(call ds_path,$(d)))) $(SCORE_MISSING) $(call NEEDS_VENV,$(VLLM_PY))
	@mkdir -p $(@D)
	$(call run_score,$(MODEL),$(LABEL),$(DATASETS))
	@touch $@
endif

report: $(REPORT_STAMP) ## aggregate every result in RESULTS_DIR against BASELINE into REPORT_DIR (runs eval first)
$(REPORT_STAMP): $(EVAL_STAMPS) $(REPORT_INPUTS) $(call FORCE_IF_MISSING,$(REPORT_DIR)/summary.json) $(call NEEDS_VENV,$(PY))
	@mkdir -p $(@D)
	$(run_aggregate)
	@touch $@

aggregate: $(call NEEDS_VENV,$(PY)) ## aggregate what RESULTS_DIR holds now, without scoring anything first
	$(run_aggregate)

serve: $(call model_dep,$(SERVE_MODEL)) ## serve SERVE_MODEL (default QUANT_OUTPUT) with vLLM on PORT
	$(run_serve)

clean: ## delete results (logprobs, report, stamps) and the demo's models; keeps other models and caches
	rm -rf $(RESULTS_DIR)/logprobs $(REPORT_DIR) $(STAMPS) $(DEMO_RESULTS_DIR) \
	  $(DEMO_BASE) $(DEMO_QUANT) $(DEMO_MODELOPT) $(MSTAMPS)/build-tiny $(MSTAMPS)/export-modelopt

FORCE:
