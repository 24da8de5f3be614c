#!/usr/bin/env bash
# One visit to the lent GPU machine (vLLM's and llm-compressor's runtimes carried there in parts), in calls
# that follow each other within the machine's 30 s of grace:
#   bash bench/gpu_visit.sh start      unpack what has arrived; in the background (setsid, it outlives the
#                                      call): the reference sets, a 14B checkpoint and its quantization on
#                                      GPU 0, 1.7B and 8B checkpoints on the test GPU (with two GPUs)
#   bash bench/gpu_visit.sh status     what the background has done
#   bash bench/gpu_visit.sh tests      the gpu-marked tests on the test GPU (ARGS: pytest's, e.g. -k ...)
#   bash bench/gpu_visit.sh tasks      the tasks stage's gpu tests on the test GPU (ARGS: pytest's)
#   bash bench/gpu_visit.sh serving    the bench stage's gpu tests on the test GPU (ARGS: pytest's)
#   bash bench/gpu_visit.sh rehearsal  14B eval cold and warm (GPU 0), then the 1.7B restart (two GPUs)
#   bash bench/gpu_visit.sh quantbatch after start's background: the 14B quantized at batch 1 and 16 on an
#                                      idle GPU 0, in the background (bench/quantize_batch.py; status shows it)
# The test GPU is GPU 1 where there are two (GPU 0 may still be quantizing), else GPU 0, shared with the
# background's quantize: the tests' tiny models need little of it, but its timings are then not alone.
#   bash bench/gpu_visit.sh calibration where calibration's time goes (bench/calibration_profile.py on GPU 0; ARGS
#                                      its own, default the 14B shape's 40 layers, batch 1 and 16)
#   bash bench/gpu_visit.sh sweep      in the background: the 14B base (in BASE_DIR, /dev/shm where it fits) and a
#                                      recipe sweep on GPU 0 (bench/rehearsal.sh sweep); status shows it. With
#                                      SWEEP_WAIT=FILE its eval waits for FILE (the serving tests' end, below)
#   bash bench/gpu_visit.sh multigpu   bench/multi_gpu.sh 8B on both GPUs, then the 8B emulation bench
# Results under $OUT (the device tool's output folder) and /tmp/rehearsal/out.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export W=/tmp/rehearsal; mkdir -p "$W/out"
q=$(bash .gpu-carry/unpack.sh quantize 2>/dev/null) || q=
v=$(bash .gpu-carry/unpack.sh vllm 2>/dev/null) || v=
extra=/tmp/site-extra
if [ -d .whl ] && [ ! -f "$extra/.done" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$extra" .whl/*.whl && touch "$extra/.done"
fi
printf '#!/bin/sh\nPYTHONPATH=%s:%s:%s exec python3 "$@"\n' "$q" "$extra" "$PWD" > /tmp/pyq
printf '#!/bin/sh\nPYTHONPATH=%s:%s:%s VLLM_LOGGING_STREAM=ext://sys.stderr exec python3 "$@"\n' "$v" "$extra" "$PWD" > /tmp/pyv
chmod +x /tmp/pyq /tmp/pyv
export PY_QUANT=/tmp/pyq PY_VLLM=/tmp/pyv PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export TOKENIZER_DIR=$PWD/.gpu-fixtures/tiny-bf16
ngpu=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | wc -l)
TEST_GPU=$(( ngpu > 1 ? 1 : 0 ))
copy_out() { cp "$W/out/"*.jsonl "$W/out/"sweep-* "$W/out/"deploy_*.png "$OUT/" 2>/dev/null; cp "$W/bg.log" "$OUT/" 2>/dev/null; true; }
case ${1:-status} in
  start)
    nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/gpus.txt"
    [ -n "$q" ] || { echo "quantize runtime missing"; exit 3; }
    small="(GPU=1 OUT=$W/out bash bench/rehearsal.sh prep 1.7B; GPU=1 OUT=$W/out bash bench/rehearsal.sh prep 8B) &"
    [ "$ngpu" -gt 1 ] || small=
    setsid nohup bash -c "GPU=0 OUT=$W/out bash bench/rehearsal.sh prep 14B && { $small GPU=0 OUT=$W/out bash bench/rehearsal.sh quantize 14B; \
      wait; }; echo BACKGROUND-DONE" > "$W/bg.log" 2>&1 < /dev/null &
    sleep 5; tail -3 "$W/bg.log";;
  sweep)
    nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/gpus.txt"; df -h /tmp /dev/shm . | tee "$OUT/disk.txt"
    [ -n "$q" ] && [ -n "$v" ] || { echo "a runtime is missing"; exit 3; }
    shm=$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -1); bd=$W; [ "${shm:-0}" -gt 40 ] && bd=/dev/shm
    setsid nohup bash -c "export BASE_DIR=$bd; GPU=0 OUT=$W/out bash bench/rehearsal.sh prep 14B && \
      SWEEP_WAIT=\${SWEEP_WAIT:-} GPU=0 OUT=$W/out bash bench/rehearsal.sh sweep 14B; echo BACKGROUND-DONE" > "$W/bg.log" 2>&1 < /dev/null &
    sleep 5; tail -3 "$W/bg.log";;
  status) tail -5 "$W/bg.log"; grep -h "^REHEARSAL" "$W/bg.log" | tail -4; grep -h "^BENCH\|QB-DONE\|rror" "$W/qb.log" 2>/dev/null; cp "$W/qb.log" "$OUT/" 2>/dev/null
    copy_out;;
  quantbatch)
    until grep -q "BACKGROUND-DONE\|FAILED" "$W/bg.log"; do sleep 5; done
    setsid nohup bash -c "CUDA_VISIBLE_DEVICES=0 $PY_QUANT bench/quantize_batch.py --model $W/qwen3-14B --out $W/qb \
      --batch-sizes 1,16 --calibration-dataset $W/sets/calib.jsonl --num-calibration-samples 1024 \
      --max-sequence-length 2048; echo QB-DONE" > "$W/qb.log" 2>&1 < /dev/null &
    sleep 5; tail -3 "$W/qb.log";;
  calibration)
    [ -n "$q" ] || { echo "quantize runtime missing"; exit 3; }
    [ $# -gt 1 ] || set -- "$1" --layers 40 --samples 128 --batch-sizes 1,16 --no-forward --seed-spread
    CUDA_VISIBLE_DEVICES=0 $PY_QUANT bench/calibration_profile.py --shape 14B --tokenizer "$TOKENIZER_DIR" "${@:2}" \
      > "$OUT/calibration-profile.log" 2>&1; grep "^BENCH\|Error" "$OUT/calibration-profile.log";;
  tests)
    [ -n "$v" ] || { echo "vLLM runtime missing"; exit 3; }
    CUDA_VISIBLE_DEVICES=$TEST_GPU QSCORE_GPU_FIXTURES=$PWD/.gpu-fixtures OUT=$OUT timeout 540 \
      bash tests/gpu_session.sh tests "${@:2}"
    tail -3 "$W/bg.log"; copy_out;;
  tasks|serving)  # the tasks stage's or the bench stage's gpu tests (ARGS: pytest's); DONE_FILE touched after
    CUDA_VISIBLE_DEVICES=$TEST_GPU QSCORE_GPU_FIXTURES=$PWD/.gpu-fixtures OUT=$OUT timeout "${LIMIT_S:-540}" \
      bash tests/gpu_session.sh "$1" "${@:2}"
    [ -z "${DONE_FILE:-}" ] || touch "$DONE_FILE"
    tail -3 "$W/bg.log"; copy_out;;
  rehearsal)
    until grep -q "BACKGROUND-DONE\|FAILED" "$W/bg.log"; do sleep 5; done; grep FAILED -A 20 "$W/bg.log" && exit 1
    GPU=0 OUT=$W/out bash bench/rehearsal.sh eval 14B cold && GPU=0 OUT=$W/out bash bench/rehearsal.sh eval 14B warm
    [ "$ngpu" -lt 2 ] || GPU=1 OUT=$W/out bash bench/rehearsal.sh restart 1.7B
    OUT=$W/out bash bench/rehearsal.sh table > "$OUT/rehearsal-table.txt"; cat "$OUT/rehearsal-table.txt" | tail -12
    copy_out; cp "$W/out/summary-"* "$OUT/" 2>/dev/null;;
  multigpu)
    bash bench/multi_gpu.sh 8B; copy_out
    CUDA_VISIBLE_DEVICES=0 /tmp/pyv bench/bench_score.py --shape 8B --formats nvfp4-w4a4 --no-hf --no-enforce-eager \
      --out "$OUT/bench-emulation.jsonl" 2>&1 | grep -E "^BENCH|Error|error";;
  *) echo "unknown call $1"; exit 2;;
esac
