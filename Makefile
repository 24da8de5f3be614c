# qscore: the map of the pipeline.
#
#   quantize ──> validate
#       │
#       └──────> eval (one scoring job per model, every set through one engine) ──> report
#
# The scoring jobs come from `python3 -m jobs.plan` (MODELS, DATASETS, WEIGHT_ONLY, SHARDS and the
# scoring settings, parsed by the same code the stages use); `make plan` prints them, `make k8s` and
# `make slurm` hand the same jobs to a cluster.
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
#   score      $(RESULTS_DIR)/.stamps/score/<label>/<set>.<sum>.ok, one per (model, set), all written by
#              that model's one job, which renames each $(RESULTS_DIR)/logprobs/model=<label>/dataset=<set>/
#              into place; a set added to DATASETS is the only one scored (the stage skips the others)
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
BASELINE_MODEL = $(patsubst $(BASELINE)=%,%,$(filter $(BASELINE)=%,$(MODELS)))
$(call default,TOKENIZER,$(BASELINE_MODEL))
## BACKEND: auto | vllm | transformers (validate and score)
$(call default,BACKEND,auto)
## TOPK: candidates kept per position (top-K ids and logprobs for KL divergence and top-k agreement; 1 = top-1 only)
$(call default,TOPK,20)
## NVFP4_COMPUTE: NVFP4 arithmetic: declared (W4A4 as the checkpoint says) or weight-only (W4A16)
$(call default,NVFP4_COMPUTE,declared)
## WEIGHT_ONLY: labels of NVFP4 models in MODELS to score again in weight-only arithmetic, as <label>-w4a16
WEIGHT_ONLY ?=
## SHARDS: split each model's sets into this many jobs (one GPU each; the report merges them)
$(call default,SHARDS,1)
## TENSOR_PARALLEL_SIZE: GPUs per scoring job (vLLM tensor parallelism); empty: 1
TENSOR_PARALLEL_SIZE ?=
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
## GPUS: GPUs the jobs may use: all, device=0, '"device=0,1"' or 0,1; each scoring job takes its own (make -j); empty: none
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
## K8S_PVC: `make k8s`: the PersistentVolumeClaim holding models/, data/ and results/ (mounted at /workspace)
$(call default,K8S_PVC,qscore-workspace)
## K8S_REGISTRY: `make k8s`: registry prefix of the images, e.g. registry.example.com/team/ (empty: none)
K8S_REGISTRY ?=
## K8S_HF_SECRET: `make k8s`: Secret whose key `token` is the Hugging Face token (optional in the pods)
$(call default,K8S_HF_SECRET,hf-token)
## SLURM_PREFIX: `make slurm`: launcher before each job, e.g. srun --container-image=qscore-vllm.sqsh (empty: the local venv)
SLURM_PREFIX ?=
## VENV: local venv (RUNNER=local and the demo), made by `make setup`
$(call default,VENV,.venv)
## VLLM_VENV: local venv with vLLM for validate/score/serve when RUNNER=local (`make setup-vllm`); if absent, VENV is used
$(call default,VLLM_VENV,.venv-vllm)
## DEMO_RESULTS_DIR: where `make demo` writes its logprobs and report
$(call default,DEMO_RESULTS_DIR,results/demo)
## DEMO_RUNNER: where `make demo` runs its stages: local, or docker (the images, on the CPU: `make test-images`)
$(call default,DEMO_RUNNER,local)
## NOISE_LABEL: `make noise-floor`: label of the baseline scored a second time (the report's noise-floor row); default <BASELINE>~noise
$(call default,NOISE_LABEL,$(BASELINE)~noise)
## NOISE_BACKEND: `make noise-floor`: backend of that second scoring (the other path than vLLM's)
$(call default,NOISE_BACKEND,transformers)
## NOISE_ARGS: `make noise-floor`: extra `jobs score` options for it (e.g. --dtype float32, --max-batch-tokens 2048)
NOISE_ARGS ?=

# --- task accuracy (lm-evaluation-harness): `make tasks` ------------------------------------------
## TASKS: lm-eval tasks, groups or tags `make tasks` runs for every model of MODELS (qscore_local: the bundled offline tasks)
$(call default,TASKS,gsm8k arc_challenge)
## LIMIT: `make tasks`: first N documents of each task, a quick look not comparable with full runs (empty: all)
LIMIT ?=
## NUM_FEWSHOT: `make tasks`: few-shot examples per prompt (empty: each task's own, gsm8k 5)
NUM_FEWSHOT ?=
## CHAT_TEMPLATE: `make tasks`: none (plain prompts, as llm-compressor's CI), default (the tokenizer's) or a template's name
$(call default,CHAT_TEMPLATE,none)
## RECOVERY_MIN: task accuracy recovery (model / baseline) below which the report marks a task failed (empty: 0.95)
RECOVERY_MIN ?=
## TASKS_ARGS: extra options for `jobs tasks` (e.g. --no-add-bos-token, --num-fewshot 0)
TASKS_ARGS ?=
export TASKS LIMIT NUM_FEWSHOT CHAT_TEMPLATE RECOVERY_MIN TASKS_ARGS

VLLM_VERSION := 0.26.0
PYTHON3 ?= python3

export MODEL_ID NVIDIA_MODEL SCHEME QUANT_OUTPUT CALIBRATION_DATASET CALIBRATION_SPLIT \
  NUM_CALIBRATION_SAMPLES MAX_SEQUENCE_LENGTH QUANTIZE_ARGS MODELS DATASETS N_WIKITEXT N_ULTRACHAT \
  MAX_MODEL_LEN BASELINE TOKENIZER BACKEND TOPK GPU_MEMORY_UTILIZATION SCORE_ARGS SERVE_MODEL PORT \
  NVFP4_COMPUTE WEIGHT_ONLY SHARDS TENSOR_PARALLEL_SIZE K8S_PVC K8S_REGISTRY K8S_HF_SECRET SLURM_PREFIX \
  RESULTS_DIR REPORT_DIR RUNNER GPUS HF_HOME HF_TOKEN CACHE_DIR TAG IMAGE_PREFIX QUANTIZE_BASE \
  DOCKER_ARGS VENV VLLM_VENV DEMO_RESULTS_DIR DEMO_RUNNER MODEL LABEL OVERWRITE NOISE_LABEL NOISE_BACKEND NOISE_ARGS

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

# docker run for a stage: $(1)=image, $(2)=what the stage is: gpu or slot, a model stage (models/, data/, the
# caches, and the GPUs of GPUS unless GPUS is empty; slot: the GPUs jobs.slots hands this job), cpu-models (the
# same mounts, never a GPU: build-tiny) or cpu (aggregate: the results, and models/ and the HF cache read-only,
# where the baseline's tokenizer is that decodes the worst tokens' context); $(3)=models mount mode (rw|ro),
# $(4)=extra mounts. CACHE_DIR=/cache: every compile/JIT cache goes there.
docker_run = $(strip mkdir -p models $(RESULTS_DIR) $(HF_HOME) $(if $(call model_stage,$(2)),$(CACHE_DIR)) && \
  $(if $(filter slot,$(2)),$(slot))docker run --rm --pull never \
  $(if $(and $(filter gpu slot,$(2)),$(strip $(GPUS))),--gpus $(if $(filter slot,$(2)),{gpus},'$(GPUS)')) \
  $(if $(filter gpu slot,$(2)),--ipc=host) $(if $(ENV_FILE),--env-file $(ENV_FILE)) $(if $(call model_stage,$(2)),$(HF_ENV)) \
  -u $(or $(strip $(DOCKER_USER)),$$(id -u):$$(id -g)) \
  $(if $(call model_stage,$(2)),-e HF_HOME=/hf -v $(HF_HOME):/hf -e CACHE_DIR=/cache -v $(CACHE_DIR):/cache \
  -v $(CURDIR)/models:/models$(if $(filter ro,$(3)),:ro) -v $(CURDIR)/data:/data:ro,-v $(CURDIR)/models:/models:ro \
  -v $(HF_HOME):/hf:ro) -v $(abspath $(RESULTS_DIR)):/results $(4) $(DOCKER_ARGS) $(1))
model_stage = $(filter gpu slot cpu-models,$(1))
# passed by name, so only where set: the token, and offline mode (`make demo` runs offline; the stages load
# differently, and transformers records local_files_only in a tokenizer it saves, when offline)
HF_ENV = -e HF_TOKEN -e HF_HUB_OFFLINE -e HF_DATASETS_OFFLINE -e TRANSFORMERS_OFFLINE
# a scoring job on GPUs of its own: waits until jobs.slots holds them (one job per GPU under make -j)
slot = $(if $(strip $(GPUS)),$(PYTHON3) -m jobs.slots --gpus '$(GPUS)' --per-job $(or $(TENSOR_PARALLEL_SIZE),1) -- )
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
# $(1)=translation, $(2)=model path, $(3)=label, $(4)=comma-separated --datasets value, $(5)=set words,
# $(6)=job options (--nvfp4-compute, --shard) from the plan
score_args = $(strip --model $(call $(1),$(2)) --label $(3) --datasets $(4)$(if $(TOKENIZER), --tokenizer $(call $(1),$(TOKENIZER))) \
  --max-model-len $(MAX_MODEL_LEN) --backend $(BACKEND) --topk $(TOPK) --results-dir $(if $(filter ctr_path,$(1)),/results,$(RESULTS_DIR)) \
  $(if $(filter wikitext2,$(5)),--n-wikitext $(N_WIKITEXT) )$(if $(filter ultrachat,$(5)),--n-ultrachat $(N_ULTRACHAT) )$(if \
  $(GPU_MEMORY_UTILIZATION),--gpu-memory-utilization $(GPU_MEMORY_UTILIZATION) )$(if $(filter-out 1,$(or $(TENSOR_PARALLEL_SIZE),1)),--tensor-parallel-size \
  $(TENSOR_PARALLEL_SIZE) )$(6) $(SCORE_ARGS))
# a plan job's own options: $(1)=job id
job_opts = $(if $(filter-out declared,$(QS.$(1).mode)),--nvfp4-compute $(QS.$(1).mode) )$(if $(QS.$(1).shard),--shard $(QS.$(1).shard))
aggregate_args = --results-dir $(results_tp) --baseline $(BASELINE) --report-dir $(report_tp)$(if $(RECOVERY_MIN), --recovery-min $(RECOVERY_MIN))
aggregate_args_local = --results-dir $(RESULTS_DIR) --baseline $(BASELINE) --report-dir $(REPORT_DIR)$(if $(RECOVERY_MIN), --recovery-min $(RECOVERY_MIN))

ifeq ($(RUNNER),docker)
run_quantize = $(call docker_run,$(IMG_QUANTIZE),gpu,rw,$(call ctr_mount,$(MODEL_ID)) $(call ctr_mount,$(CALIBRATION_DATASET))) quantize $(call quant_args,ctr_path)$(overwrite_flag)
run_validate = $(call docker_run,$(IMG_VLLM),gpu,ro) validate $(call validate_args,ctr_path)
# $(1)=model path, $(2)=label, $(3)=set words, $(4)=job options, $(5)=--overwrite or nothing
run_score = $(call docker_run,$(IMG_VLLM),slot,ro,$(call ctr_mount,$(1)) $(call ctr_mount,$(TOKENIZER)) $(foreach d,$(3),$(call ctr_mount,$(call ds_path,$(d))))) \
  score $(call score_args,ctr_path,$(1),$(2),$(call commas,$(foreach d,$(3),$(call ds_arg,$(d),ctr_path))),$(3),$(4))$(5)
run_aggregate = $(if $(report_mount),mkdir -p $(REPORT_DIR) && )$(call docker_run,$(IMG_AGGREGATE),cpu,,$(report_mount)) aggregate $(aggregate_args)
run_serve = $(call docker_run,$(IMG_VLLM),gpu,ro,$(call ctr_mount,$(SERVE_MODEL)) -p $(PORT):$(PORT) --entrypoint vllm) \
  serve $(call ctr_path,$(SERVE_MODEL)) --host 0.0.0.0 --port $(PORT) --max-model-len $(MAX_MODEL_LEN)
else
run_quantize = $(PY) -m jobs quantize $(call quant_args,lp)$(overwrite_flag)
run_validate = $(VLLM_PY) -m jobs validate $(call validate_args,lp)
run_score = $(slot)$(VLLM_PY) -m jobs score $(call score_args,lp,$(1),$(2),$(call commas,$(foreach d,$(3),$(call ds_arg,$(d),lp))),$(3),$(4))$(5)
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

# --- tasks: lm-eval task accuracy of one model ------------------------------------------------------
# $(1)=translation, $(2)=model path, $(3)=label. In a container the bundled tasks are /data/tasks.
tasks_arg = $(call commas,$(foreach t,$(TASKS),$(if $(call is_local,$(t)),$(call $(1),$(t)),$(t))))
tasks_args = $(strip --model $(call $(1),$(2)) --label $(3) --tasks $(call tasks_arg,$(1)) --backend $(BACKEND) \
  --max-model-len $(MAX_MODEL_LEN) --chat-template $(CHAT_TEMPLATE) --results-dir $(if $(filter ctr_path,$(1)),/results --include-path /data/tasks,$(RESULTS_DIR)) \
  $(if $(LIMIT),--limit $(LIMIT) )$(if $(NUM_FEWSHOT),--num-fewshot $(NUM_FEWSHOT) )$(if \
  $(GPU_MEMORY_UTILIZATION),--gpu-memory-utilization $(GPU_MEMORY_UTILIZATION) )$(TASKS_ARGS))
ifeq ($(RUNNER),docker)
run_tasks = $(call docker_run,$(IMG_VLLM),gpu,ro,$(call ctr_mount,$(1)) $(foreach t,$(TASKS),$(call ctr_mount,$(t)))) \
  tasks $(call tasks_args,ctr_path,$(1),$(2))$(overwrite_flag)
else
run_tasks = $(VLLM_PY) -m jobs tasks $(call tasks_args,lp,$(1),$(2))$(overwrite_flag)
endif

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

# The scoring jobs, from the job plan: one per model (or per model and shard), each writing one stamp
# per (model, set) as a grouped target. The plan runs with the host's python3 (standard library only).
define newline


endef
shq = '$(subst ','\'',$(1))'
PLAN_ENV = $(foreach v,MODELS DATASETS WEIGHT_ONLY SHARDS RESULTS_DIR TOKENIZER MAX_MODEL_LEN BACKEND TOPK N_WIKITEXT \
  N_ULTRACHAT GPU_MEMORY_UTILIZATION NVFP4_COMPUTE TENSOR_PARALLEL_SIZE SCORE_ARGS,$(v)=$(call shq,$($(v))))
PLAN_OUT := $(shell $(PLAN_ENV) $(PYTHON3) -m jobs.plan --format make 2>&1; echo "@@QS_STATUS_$$?")
ifneq ($(filter %@@QS_STATUS_0,$(lastword $(PLAN_OUT))),)
$(eval $(subst @@,$(newline),$(subst @@QS_STATUS_0,,$(PLAN_OUT))))
else ifneq ($(filter eval report plan k8s slurm demo,$(MAKECMDGOALS)),)
$(error $(subst @@QS_STATUS_$(lastword $(subst _, ,$(lastword $(PLAN_OUT)))),,$(PLAN_OUT)))
endif

# $(1)=job id. The job's own stamp (named after all its settings) runs it; each (model, set) stamp follows
# from it. (Not a grouped target: GNU make 4.3's `make -n` then skips what depends on them.)
# --overwrite when a prerequisite (checkpoint, tokenizer, data file) is newer than the job's stamp: its
# results are stale. A job run only because an output is missing (FORCE) resumes or skips what it has.
job_stamp = $(STAMPS)/score/$(call san,$(QS.$(1).label))/_job$(if $(QS.$(1).shard),.shard-$(subst /,-of-,$(QS.$(1).shard))).$(call \
  hash,$(QS.$(1).stamps)).ok
define score_job
$(call job_stamp,$(1)): $(call model_dep,$(QS.$(1).model)) $(call model_dep,$(TOKENIZER)) $(foreach d,$(QS.$(1).sets),$(call \
  file_dep,$(call ds_path,$(d)))) $(foreach o,$(QS.$(1).outputs),$(call FORCE_IF_MISSING,$(o))) $(call NEEDS_VENV,$(VLLM_PY))
	@mkdir -p $$(@D)
	$$(call run_score,$(QS.$(1).model),$(QS.$(1).label),$(QS.$(1).sets),$(call job_opts,$(1)),$$(if $$(or $$(filter \
	  1 yes true,$$(OVERWRITE)),$$(and $$(wildcard $$@),$$(filter-out FORCE,$$?))), --overwrite))
	@touch $$@
$(QS.$(1).stamps): $(call job_stamp,$(1))
	@touch $$@
endef
$(foreach j,$(QS_JOBS),$(eval $(call score_job,$(j))))
JOB_STAMPS := $(foreach j,$(QS_JOBS),$(call job_stamp,$(j)))
EVAL_STAMPS := $(foreach j,$(QS_JOBS),$(QS.$(j).stamps))

# `make score MODEL=... LABEL=...`: one job over every set in DATASETS
SCORE_STAMP := $(STAMPS)/score/$(call san,$(LABEL))/_score.$(call hash,$(call score_args,lp,$(MODEL),$(LABEL),$(call commas,$(foreach d,$(DATASETS),$(call ds_arg,$(d),lp))),$(DATASETS))).ok
SCORE_MISSING := $(strip $(foreach d,$(DATASETS),$(call FORCE_IF_MISSING,$(call ds_dir,$(LABEL),$(call ds_name,$(d))))))

# One tasks job per model of MODELS: $(1)=label=path. Its stamp is $(STAMPS)/tasks/<label>.<sum>.ok; the
# job renames each finished $(RESULTS_DIR)/tasks/model=<label>/task=<task>/ into place (delete the
# model=<label> directory to redo them). An edited bundled task redoes the job, replacing its results.
define tasks_job
$(eval _l := $(call m_label,$(1)))
$(eval _p := $(call m_path,$(1)))
$(eval _s := $(STAMPS)/tasks/$(call san,$(_l)).$(call hash,$(call tasks_args,lp,$(_p),$(_l))).ok)
$(eval TASKS_STAMPS += $(_s))
$(eval $(_s): T_MODEL := $(_p))
$(eval $(_s): T_LABEL := $(_l))
$(eval $(_s): $(call model_dep,$(_p)) $(foreach t,$(TASKS),$(call file_dep,$(t))) $(wildcard data/tasks/*.yaml data/tasks/*.jsonl data/tasks/*.py) $(call FORCE_IF_MISSING,$(RESULTS_DIR)/tasks/model=$(_l)) $(call NEEDS_VENV,$(VLLM_PY)))
endef
TASKS_STAMPS :=
$(foreach m,$(MODELS),$(call tasks_job,$(m)))
# the report shows task results: after `make tasks` when both are asked for, and whenever one is newer
$(REPORT_STAMP): $(if $(filter tasks,$(MAKECMDGOALS)),$(TASKS_STAMPS)) $(wildcard $(RESULTS_DIR)/tasks/model=*/task=*)

# ---------------------------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------------------------
.PHONY: help setup setup-vllm demo test test-images images image-quantize image-vllm image-aggregate quantize \
  validate eval score tasks noise-floor report aggregate serve clean FORCE plan k8s slurm

help: ## show this help (the default target)
	@printf 'qscore: quantize a model, check that vLLM loads it, score checkpoints token by token, report.\n\n'
	@printf 'Usage: make [TARGET ...] [VAR=value ...]      (RUNNER=%s; variables also from .env)\n\nTargets:\n' '$(RUNNER)'
	@awk -F':.*## ' '/^[a-z][a-z0-9%-]*:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(firstword $(MAKEFILE_LIST))
	@printf '\nVariables (current value in brackets):\n'
	@awk '/^## [A-Z0-9_]+: / {n=$$2; sub(/:$$/, "", n); d=$$0; sub(/^## [A-Z0-9_]+: /, "", d); print n "\t" d}' $(firstword $(MAKEFILE_LIST)) | \
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

DEMO_VARS = RUNNER=local \
	  VLLM_VENV=$(VENV) MODEL_ID=$(DEMO_BASE) QUANT_OUTPUT=$(DEMO_QUANT) SCHEME=NVFP4 \
	  CALIBRATION_DATASET=data/calib_mini.jsonl NUM_CALIBRATION_SAMPLES=64 MAX_SEQUENCE_LENGTH=256 QUANTIZE_ARGS= \
	  MODELS="bf16=$(DEMO_BASE) llmc-nvfp4=$(DEMO_QUANT) modelopt-nvfp4=$(DEMO_MODELOPT)" \
	  WEIGHT_ONLY="llmc-nvfp4 modelopt-nvfp4" NVFP4_COMPUTE=declared SHARDS=1 TENSOR_PARALLEL_SIZE= GPUS= \
	  DATASETS="wiki_mini=data/wiki_mini.txt chat_mini=data/chat_mini.jsonl wikitext2_doc=data/wiki_mini.txt" \
	  BASELINE=bf16 TOKENIZER=$(DEMO_BASE) BACKEND=transformers MAX_MODEL_LEN=256 TOPK=20 \
	  NOISE_LABEL=bf16~noise NOISE_BACKEND=transformers NOISE_ARGS="--dtype bfloat16" \
	  GPU_MEMORY_UTILIZATION= SCORE_ARGS= RESULTS_DIR=$(DEMO_RESULTS_DIR) REPORT_DIR=$(DEMO_RESULTS_DIR)/report \
	  TASKS=qscore_local LIMIT= NUM_FEWSHOT= CHAT_TEMPLATE=none RECOVERY_MIN= TASKS_ARGS=

# DEMO_RUNNER=docker: the same jobs in the images, on the CPU (GPUS=): build-tiny, quantize, validate and
# score (transformers backend) in the quantize image, which has what they need (the vLLM image needs a GPU),
# and the report in the aggregate image. Made by the venv either way: the ModelOpt fixture (nvidia-modelopt is
# in no image) and the task accuracy (lm-eval is in the vLLM image only).
DEMO_DOCKER = $(if $(filter docker,$(DEMO_RUNNER)),RUNNER=docker IMG_VLLM=$(IMG_QUANTIZE))
DEMO_ENV = HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

demo: $(SETUP_STAMP) ## the whole pipeline on a tiny Qwen3 (and the bundled tasks), CPU, offline -> DEMO_RESULTS_DIR/report (DEMO_RUNNER)
	$(DEMO_ENV) $(MAKE) --no-print-directory $(DEMO_VARS) $(DEMO_DOCKER) validate eval $(if $(DEMO_DOCKER),,tasks )noise-floor
	$(if $(DEMO_DOCKER),$(DEMO_ENV) $(MAKE) --no-print-directory $(DEMO_VARS) tasks)
	$(DEMO_ENV) $(MAKE) --no-print-directory $(DEMO_VARS) $(DEMO_DOCKER) report

$(DEMO_BASE_STAMP): $(call FORCE_IF_MISSING,$(DEMO_BASE)/config.json) $(call NEEDS_VENV,$(PY))
	@mkdir -p $(@D)
	$(run_build_tiny)
	@touch $@

$(DEMO_MODELOPT_STAMP): $(DEMO_BASE_STAMP) $(call FORCE_IF_MISSING,$(DEMO_MODELOPT)/config.json) | $(SETUP_STAMP)
	@mkdir -p $(@D)
	$(PY) -m jobs export-modelopt --model $(DEMO_BASE) --output $(DEMO_MODELOPT)
	@touch $@

images: image-quantize image-vllm image-aggregate ## build the three images (TAG, IMAGE_PREFIX, QUANTIZE_BASE, VLLM_BASE)
BUILD_ARGS = --build-arg VERSION=$(shell sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml 2>/dev/null) \
  --build-arg REVISION=$(shell git rev-parse --short HEAD 2>/dev/null || echo unknown)
image-quantize: ## build IMAGE_PREFIX-quantize:TAG (llm-compressor on CUDA PyTorch)
	docker build -f docker/quantize.Dockerfile -t $(IMG_QUANTIZE) $(BUILD_ARGS)$(if $(QUANTIZE_BASE), --build-arg BASE_IMAGE=$(QUANTIZE_BASE)) .
image-vllm: ## build IMAGE_PREFIX-vllm:TAG (vllm/vllm-openai:v0.26.0 + jobs)
	docker build -f docker/vllm.Dockerfile -t $(IMG_VLLM) $(BUILD_ARGS)$(if $(VLLM_BASE), --build-arg BASE_IMAGE=$(VLLM_BASE)) .
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

eval: $(EVAL_STAMPS) ## score every model in MODELS on every set in DATASETS: one job per model (GPUS: one per GPU under make -j)

plan: ## print the scoring jobs of MODELS x DATASETS (JSON lines: id, command, outputs)
	@$(PLAN_ENV) $(PYTHON3) -m jobs.plan

CLUSTER_ENV = $(PLAN_ENV) BASELINE=$(call shq,$(BASELINE)) TAG=$(call shq,$(TAG)) IMAGE_PREFIX=$(call shq,$(IMAGE_PREFIX)) \
  K8S_PVC=$(call shq,$(K8S_PVC)) K8S_REGISTRY=$(call shq,$(K8S_REGISTRY)) K8S_HF_SECRET=$(call shq,$(K8S_HF_SECRET)) \
  SLURM_PREFIX=$(call shq,$(SLURM_PREFIX))
k8s: ## render the plan as a Kubernetes Indexed Job + aggregate Job: RESULTS_DIR/cluster/qscore-k8s.yaml
	@mkdir -p $(RESULTS_DIR)/cluster
	$(CLUSTER_ENV) $(PYTHON3) -m jobs.plan --format k8s > $(RESULTS_DIR)/cluster/qscore-k8s.yaml.tmp
	@mv $(RESULTS_DIR)/cluster/qscore-k8s.yaml.tmp $(RESULTS_DIR)/cluster/qscore-k8s.yaml
	@echo "kubectl apply -f $(RESULTS_DIR)/cluster/qscore-k8s.yaml"

slurm: ## render the plan as a Slurm job array: RESULTS_DIR/cluster/qscore.sbatch
	@mkdir -p $(RESULTS_DIR)/cluster
	$(CLUSTER_ENV) $(PYTHON3) -m jobs.plan --format slurm > $(RESULTS_DIR)/cluster/qscore.sbatch.tmp
	@mv $(RESULTS_DIR)/cluster/qscore.sbatch.tmp $(RESULTS_DIR)/cluster/qscore.sbatch
	@echo 'jid=$$(sbatch --parsable $(RESULTS_DIR)/cluster/qscore.sbatch) && sbatch --dependency=afterok:$$jid $(RESULTS_DIR)/cluster/qscore.sbatch --aggregate'

score: $(if $(filter score,$(MAKECMDGOALS)),$(SCORE_STAMP)) ## score one checkpoint: make score MODEL=path-or-id LABEL=name (one job, every set in DATASETS, nothing else)
ifneq ($(filter score,$(MAKECMDGOALS)),)
ifeq ($(and $(strip $(MODEL)),$(strip $(LABEL))),)
$(error make score needs MODEL=<hub id or local path> LABEL=<name>)
endif
$(SCORE_STAMP): $(call file_dep,$(MODEL)/config.json) $(foreach d,$(DATASETS),$(call file_dep,$(call ds_path,$(d)))) $(SCORE_MISSING) $(call NEEDS_VENV,$(VLLM_PY))
	@mkdir -p $(@D)
	$(call run_score,$(MODEL),$(LABEL),$(DATASETS),$(if $(filter-out declared,$(NVFP4_COMPUTE)),--nvfp4-compute $(NVFP4_COMPUTE)),$(overwrite_flag))
	@touch $@
endif

tasks: $(TASKS_STAMPS) ## task accuracy (lm-eval TASKS) of every model in MODELS: one job per model, per-sample Parquet
ifneq ($(strip $(TASKS_STAMPS)),)
$(TASKS_STAMPS):
	@mkdir -p $(@D)
	$(call run_tasks,$(T_MODEL),$(T_LABEL))
	@touch $@
endif

# The noise floor: the baseline scored again through another path (backend, dtype or batch layout). The
# aggregate stage shows <BASELINE>~<anything> as the size of a difference that means "no difference".
noise-floor: ## score BASELINE again with NOISE_BACKEND and NOISE_ARGS as NOISE_LABEL: the report's noise-floor row
	$(if $(BASELINE_MODEL),,$(error BASELINE '$(BASELINE)' is not a label of MODELS: no model to score again))
	$(MAKE) --no-print-directory score MODEL=$(BASELINE_MODEL) LABEL=$(NOISE_LABEL) BACKEND=$(NOISE_BACKEND) \
	  SCORE_ARGS="$(strip $(SCORE_ARGS) $(NOISE_ARGS))"

report: $(REPORT_STAMP) ## aggregate every result in RESULTS_DIR against BASELINE into REPORT_DIR (runs eval first)
$(REPORT_STAMP): $(EVAL_STAMPS) $(REPORT_INPUTS) $(call FORCE_IF_MISSING,$(REPORT_DIR)/summary.json) $(call NEEDS_VENV,$(PY))
	@mkdir -p $(@D)
	$(run_aggregate)
	@touch $@

aggregate: $(call NEEDS_VENV,$(PY)) ## aggregate what RESULTS_DIR holds now, without scoring anything first
	$(run_aggregate)

serve: $(call model_dep,$(SERVE_MODEL)) ## serve SERVE_MODEL (default QUANT_OUTPUT) with vLLM on PORT
	$(run_serve)

clean: ## delete results (logprobs, task results, report, stamps) and the demo's models; keeps other models and caches
	rm -rf $(RESULTS_DIR)/logprobs $(REPORT_DIR) $(STAMPS) $(DEMO_RESULTS_DIR) $(RESULTS_DIR)/tasks \
	  $(DEMO_BASE) $(DEMO_QUANT) $(DEMO_MODELOPT) $(MSTAMPS)/build-tiny $(MSTAMPS)/export-modelopt

FORCE:
