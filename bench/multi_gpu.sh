#!/usr/bin/env bash
# Every GPU of a host busy (nvidia-h100-x2): the project's own `make -j2 eval` on a random-weight
# checkpoint from disk (bench/random_checkpoint.py), as
#   serial    two jobs (two labels, one model) with GPUS=0: jobs.runs.slots runs them one after the other
#   parallel  the same two jobs with GPUS=0,1: one per GPU, side by side
#   sharded   one job split in two shards over both GPUs, against the same job unsharded on one GPU;
#             both with VLLM_BATCH_INVARIANT=1, then compared row for row
# Wall times go to $OUT/multi_gpu.jsonl. Environment as bench/rehearsal.sh (PY_VLLM, PY_QUANT, W).
set -euo pipefail
shape=${1:-8B}
W=${W:-/tmp/rehearsal}; OUT=${OUT:-$W/out}; mkdir -p "$OUT"
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/bench/rehearsal.sh" prep "$shape" >/dev/null
base=$W/qwen3-$shape
MK=(make --no-print-directory -C "$root" -j2 RUNNER=local VENV="$W/venv-q" VLLM_VENV="$W/venv-v" BACKEND=vllm
    TOKENIZER="$base" DATASETS="wikitext2=$W/sets/wikitext2.txt ultrachat=$W/sets/ultrachat.jsonl"
    MAX_MODEL_LEN=2048 TOPK=20 GPU_MEMORY_UTILIZATION=0.85 SCORE_ARGS= WEIGHT_ONLY= NVFP4_COMPUTE=declared)
export CACHE_DIR=$W/cache
run() {  # run NAME MAKE-ARGS...: wall seconds of `make eval` with those settings
  local name=$1; shift; rm -rf "$W/mg-$name"; local t0; t0=$(date +%s.%N)
  "${MK[@]}" RESULTS_DIR="$W/mg-$name" "$@" eval > "$OUT/mg-$name.log" 2>&1 || { tail -30 "$OUT/mg-$name.log"; return 1; }
  local s; s=$(awk "BEGIN {printf \"%.1f\", $(date +%s.%N) - $t0}")
  printf '{"step": "%s", "shape": "%s", "wall_s": %s}\n' "$name" "$shape" "$s" | tee -a "$OUT/multi_gpu.jsonl"
}
run serial GPUS=0 MODELS="a=$base b=$base" SHARDS=1
run parallel GPUS=0,1 MODELS="a=$base b=$base" SHARDS=1
run topk1 GPUS=0 MODELS="a=$base" SHARDS=1 TOPK=1  # the cost of top-20: one job of `serial` with top-1 only
grep -ho "dataset=[a-z0-9_]* ([0-9]* parts, [0-9]* rows): [0-9]* tokens scored in [0-9.]* s, [0-9]* tokens/s" \
  "$OUT"/mg-serial.log "$OUT"/mg-topk1.log | sed 's/^/SPEED /' | tee -a "$OUT/multi_gpu.jsonl" || true
VLLM_BATCH_INVARIANT=1 run unsharded GPUS=0 MODELS="s=$base" SHARDS=1
VLLM_BATCH_INVARIANT=1 run sharded GPUS=0,1 MODELS="s=$base" SHARDS=2
"$PY_VLLM" - "$W" <<'PY' | tee -a "$OUT/multi_gpu.jsonl"
import json, sys
import numpy as np
from jobs import schema
W = sys.argv[1]
for name in ("wikitext2", "ultrachat"):
    a, _ = schema.read_dataset(schema.dataset_dir(f"{W}/mg-unsharded", "s", name))
    b, _ = schema.read_dataset(schema.dataset_dir(f"{W}/mg-sharded", "s", name))
    la = a.column("logprob").to_numpy(zero_copy_only=False); lb = b.column("logprob").to_numpy(zero_copy_only=False)
    same_tokens = a.select(["sample_id", "position", "token_id"]).equals(b.select(["sample_id", "position", "token_id"]))
    d = np.abs(la[1:] - lb[1:]); d = d[~np.isnan(d)]
    print(json.dumps({"step": "shard-identity", "dataset": name, "rows": a.num_rows, "identical": a.equals(b),
                      "same_tokens": same_tokens, "max_abs_logprob_diff": float(d.max()) if d.size else 0.0}))
PY
