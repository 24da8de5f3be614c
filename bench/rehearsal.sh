#!/usr/bin/env bash
# The reference run, rehearsed at full size on one GPU host: random-weight Qwen3 checkpoints of a real
# shape written to disk, the reference token volumes (bench/synthetic_sets.py), and the project's own
# `make quantize validate eval report RUNNER=local`, cold (empty CACHE_DIR, fresh HOME) and warm (the same
# CACHE_DIR, a fresh HOME again: a new container). Every stage's wall time and each engine's start-up
# breakdown go to $OUT/rehearsal.jsonl; `bench/rehearsal.sh table` prints them.
#
#   bash bench/rehearsal.sh prep 14B        sets + checkpoints (bf16 written by save_pretrained)
#   bash bench/rehearsal.sh quantize 14B    make quantize (NVFP4, 1024 x 2048 calibration tokens)
#   bash bench/rehearsal.sh eval 14B cold   make validate eval report (3 models x 2 sets), cold
#   bash bench/rehearsal.sh eval 14B warm   the same again, warm
#   bash bench/rehearsal.sh restart 1.7B    one scoring job twice, fresh HOME each time, one cache dir
#   bash bench/rehearsal.sh sweep 14B       a recipe sweep (SWEEP, SWEEP_SEEDS below): make -k quantize, then
#                                           make -k sweep (eval, tasks, bench, report); the deploy table in
#                                           $OUT/sweep-report.md
#
# Environment: PY_VLLM / PY_QUANT, the interpreters with vLLM and with llm-compressor (each may be a
# wrapper that sets PYTHONPATH); W, the work directory (default /tmp/rehearsal); GPU, the device (0).
set -euo pipefail
step=${1:?step}; shape=${2:-14B}; mode=${3:-warm}
W=${W:-/tmp/rehearsal}; OUT=${OUT:-$W/out}; GPU=${GPU:-0}
mkdir -p "$W" "$OUT"
export CUDA_VISIBLE_DEVICES=$GPU  # this step's GPU (a scoring job's own comes from jobs.runs.slots, GPUS=$GPU)
root=$(cd "$(dirname "$0")/.." && pwd)
tok=${TOKENIZER_DIR:-$root/.gpu-fixtures/tiny-bf16}
venvs() {  # make's RUNNER=local wants VENV/bin/python: wrappers around the two interpreters
  for v in q:$PY_QUANT v:$PY_VLLM; do
    d=$W/venv-${v%%:*}; mkdir -p "$d/bin"; printf '#!/bin/sh\nexec %s "$@"\n' "${v#*:}" > "$d/bin/python"
    chmod +x "$d/bin/python"; touch "$d/.qscore-setup" "$d/.qscore-setup-vllm"
  done
}
record() { printf '%s\n' "$1" >> "$OUT/rehearsal.jsonl"; echo "REHEARSAL $1"; }
base=${BASE_DIR:-$W}/qwen3-$shape; quant=$W/qwen3-$shape-NVFP4  # BASE_DIR: e.g. /dev/shm when disk is short
MK=(make --no-print-directory -C "$root" RUNNER=local VENV="$W/venv-q" VLLM_VENV="$W/venv-v" GPUS="$GPU"
    MODEL_ID="$base" QUANT_OUTPUT="$quant" SCHEME=NVFP4 CALIBRATION_DATASET="$W/sets/calib.jsonl"
    NUM_CALIBRATION_SAMPLES=1024 MAX_SEQUENCE_LENGTH=2048 QUANTIZE_ARGS=
    MODELS="bf16=$base llmc-nvfp4=$quant" WEIGHT_ONLY=llmc-nvfp4 BASELINE=bf16 TOKENIZER="$base"
    DATASETS="wikitext2=$W/sets/wikitext2.txt ultrachat=$W/sets/ultrachat.jsonl" MAX_MODEL_LEN=2048
    BACKEND=vllm TOPK=${TOPK:-20} GPU_MEMORY_UTILIZATION= SCORE_ARGS= SHARDS=1)
timed() {  # timed NAME CMD...: wall seconds of one command, recorded
  local name=$1; shift; local t0; t0=$(date +%s.%N)
  "$@" > "$OUT/$name.log" 2>&1 || { echo "FAILED $name (tail of $OUT/$name.log):"; tail -25 "$OUT/$name.log"; return 1; }
  record "{\"step\": \"$name\", \"shape\": \"$shape\", \"wall_s\": $(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $t0}")}"
}
starts() {  # each scored dataset's engine start-up and scoring speed, from the Parquet metadata and logs
  "$PY_VLLM" - "$1" "$2" <<'PY' | while read -r line; do record "$line"; done
import json, sys, glob, re, pyarrow.parquet as pq
results, tag = sys.argv[1], sys.argv[2]
for part in sorted(glob.glob(f"{results}/logprobs/model=*/dataset=*/part-00000.parquet")):
    m = json.loads(pq.read_schema(part).metadata[b"qscore"])
    rt = m["runtime"]
    print(json.dumps({"step": tag, "model": m["model"]["label"], "dataset": m["dataset"]["name"],
                      "arithmetic": rt.get("arithmetic"), "kernel": rt.get("kernel_path", "")[:60],
                      "compile": rt.get("compile_reason"), "engine_start": rt.get("engine_start"),
                      "rows": m["counts"]["rows_total"]}))
PY
  # each job's phases (jobs.core.phases: its last log line), as one record per job
  grep -ho "phases [A-Za-z0-9._+~-]* {.*}" "$OUT"/eval-*"$2"*.log "$OUT/$2"-*.log 2>/dev/null | while read -r _ label json; do
    record "{\"step\": \"phases-$2\", \"model\": \"$label\", \"phases\": $json}"; done || true
  grep -ho "dataset=[a-z0-9_]* ([0-9]* parts, [0-9]* rows): [0-9]* tokens scored in [0-9.]* s, [0-9]* tokens/s" \
    "$OUT"/eval-*"$2"*.log "$OUT/$2"-*.log 2>/dev/null | sed 's/^/SPEED /' || true
}
case $step in
  prep)
    venvs
    [ -f "$W/sets/calib.jsonl" ] || "$PY_QUANT" "$root/bench/synthetic_sets.py" --tokenizer "$tok" --out "$W/sets"
    CUDA_VISIBLE_DEVICES=$GPU timed "write-$shape" "$PY_VLLM" "$root/bench/random_checkpoint.py" --shape "$shape" \
      --out "$base" --tokenizer "$tok";;
  quantize)
    venvs; rm -rf "$quant"
    timed "quantize-$shape" "${MK[@]}" quantize
    "$PY_QUANT" -c "import json,sys; m=json.load(open('$quant/qscore.json')); print(json.dumps({'step': 'quantize-manifest', 'wall_time_s': m['wall_time_s'], 'phases_s': m['phases_s'], 'calibration': m['calibration'], 'peak_gpu_gib': m['peak_gpu_gib']}))" | while read -r line; do record "$line"; done;;
  eval)
    venvs
    [ "$mode" = cold ] && rm -rf "$W/cache"
    export CACHE_DIR=$W/cache HOME; HOME=$(mktemp -d)  # a new container: nothing under HOME survives
    rm -rf "$W/results-$mode"
    # random weights generate no readable text, which validate rightly refuses: timed, not required
    timed "validate-$shape-$mode" "${MK[@]}" RESULTS_DIR="$W/results-$mode" validate || true
    timed "eval-$shape-$mode" "${MK[@]}" RESULTS_DIR="$W/results-$mode" eval
    timed "report-$shape-$mode" "${MK[@]}" RESULTS_DIR="$W/results-$mode" report
    starts "$W/results-$mode" "$mode"
    cp "$W/results-$mode/report/summary.json" "$OUT/summary-$shape-$mode.json";;
  restart)
    venvs; rm -rf "$W/cache-restart"
    export CACHE_DIR=$W/cache-restart
    for run in first second; do
      HOME=$(mktemp -d) CUDA_VISIBLE_DEVICES=$GPU timed "restart-$shape-$run" "$PY_VLLM" -m jobs score --model "$base" \
        --label "r-$run" --datasets "wikitext2=$W/sets/wikitext2.txt" --tokenizer "$base" --backend vllm \
        --results-dir "$W/results-restart"
    done
    starts "$W/results-restart" restart;;
  sweep)
    venvs
    export CACHE_DIR=$W/cache HOME; HOME=$(mktemp -d)
    SW=(SWEEP="${SWEEP:-NVFP4@256 NVFP4A16 FP8_DYNAMIC W4A16}" SWEEP_SEEDS="${SWEEP_SEEDS:-1 2}" MODELS=
        WEIGHT_ONLY= RESULTS_DIR="$W/results-sweep" BENCH_ARGS="${BENCH_ARGS:---num-prompts-b1 6 --num-prompts 128}"
        TASKS=qscore_local LIMIT="${LIMIT:-16}" TASKS_ARGS=--enforce-eager)
    # lm-eval's bundled tasks on random weights are plumbing, not accuracy: LIMIT documents each, eager (a
    # compiled generation engine is a minute of start-up per job here)
    timed "sweep-quantize-$shape" "${MK[@]}" "${SW[@]}" -k quantize || true
    # SWEEP_WAIT: a file whose existence lets the rest go on (a GPU test sharing this GPU has finished; at
    # most 10 min); not timed
    for _ in $(seq 300); do [ -z "${SWEEP_WAIT:-}" ] || [ -e "$SWEEP_WAIT" ] && break; sleep 2; done
    timed "sweep-rest-$shape" "${MK[@]}" "${SW[@]}" -k sweep || true
    # a failed job leaves the report unmade: aggregate what is there
    [ -f "$W/results-sweep/report/report.md" ] || timed "sweep-aggregate-$shape" "${MK[@]}" "${SW[@]}" aggregate
    for m in "$W"/qwen3-"$shape"-*/qscore.json; do
      "$PY_QUANT" -c "import json,sys; m=json.load(open('$m')); print(json.dumps({'step': 'sweep-quantize-manifest', 'model': '$m', 'scheme': m['scheme'], 'wall_time_s': m['wall_time_s'], 'phases_s': m['phases_s'], 'seed': (m['calibration'] or {}).get('seed')}))" | while read -r line; do record "$line"; done
    done
    starts "$W/results-sweep" sweep
    cp "$W/results-sweep/report/report.md" "$OUT/sweep-report.md"; cp "$W/results-sweep/report/summary.json" "$OUT/sweep-summary.json"
    cp "$W/results-sweep/report/deploy_"*.png "$OUT/" 2>/dev/null || true
    "$PY_VLLM" -c "import pyarrow.parquet as pq, glob, json
for f in sorted(glob.glob('$W/results-sweep/bench/model=*/bench.parquet')): print(json.dumps({'step': 'sweep-bench', **pq.read_table(f).to_pylist()[0]}))" \
      | while read -r line; do record "$line"; done;;
  table)  # every record, then each job's phases as a table: where the wall time went, fixed cost = wall - score
    cat "$OUT/rehearsal.jsonl"
    python3 - "$OUT/rehearsal.jsonl" <<'PY'
import json, sys
lines = (ln.removeprefix("REHEARSAL ") for ln in open(sys.argv[1]))  # older files kept the log's prefix
rows = [r for r in map(json.loads, lines) if r.get("step", "").startswith("phases-")]
cols = ["startup", "read", "engine_start", "score", "write", "shutdown", "other", "wall"]
print(f"{'run':<12}{'job':<22}" + "".join(f"{c:>13}" for c in cols) + f"{'fixed':>9}")
for r in rows:
    p = r["phases"]
    print(f"{r['step'][7:]:<12}{r['model']:<22}" + "".join(f"{p.get(c, 0):>13.1f}" for c in cols)
          + f"{p['wall'] - p.get('score', 0):>9.1f}")
PY
    ;;
  *) echo "unknown step $step"; exit 2;;
esac
