#!/usr/bin/env bash
# One visit to the lent GPU machine (vLLM's and llm-compressor's runtimes carried there in parts), in calls
# that follow each other within the machine's 30 s of grace:
#   bash bench/gpu_visit.sh start      unpack what has arrived; in the background (setsid, it outlives the
#                                      call): the reference sets, a 14B checkpoint and its quantization on
#                                      GPU 0, 1.7B and 8B checkpoints on GPU 1
#   bash bench/gpu_visit.sh status     what the background has done
#   bash bench/gpu_visit.sh tests      the gpu-marked tests on GPU 1 (GPU 0 may still be quantizing)
#   bash bench/gpu_visit.sh rehearsal  14B eval cold and warm (GPU 0), then the 1.7B restart
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
copy_out() { cp "$W/out/"*.jsonl "$OUT/" 2>/dev/null; cp "$W/bg.log" "$OUT/" 2>/dev/null; true; }
case ${1:-status} in
  start)
    nvidia-smi --query-gpu=index,name,memory.total --format=csv | tee "$OUT/gpus.txt"
    [ -n "$q" ] || { echo "quantize runtime missing"; exit 3; }
    setsid nohup bash -c "GPU=0 bash bench/rehearsal.sh prep 14B && { (GPU=1 bash bench/rehearsal.sh prep 1.7B; \
      GPU=1 bash bench/rehearsal.sh prep 8B) & GPU=0 bash bench/rehearsal.sh quantize 14B; wait; }; echo BACKGROUND-DONE" \
      > "$W/bg.log" 2>&1 < /dev/null &
    sleep 5; tail -3 "$W/bg.log";;
  status) tail -5 "$W/bg.log"; copy_out;;
  tests)
    [ -n "$v" ] || { echo "vLLM runtime missing"; exit 3; }
    CUDA_VISIBLE_DEVICES=1 QSCORE_GPU_FIXTURES=$PWD/.gpu-fixtures OUT=$OUT timeout 540 bash tests/gpu_session.sh tests
    tail -3 "$W/bg.log"; copy_out;;
  rehearsal)
    until grep -q "BACKGROUND-DONE\|FAILED" "$W/bg.log"; do sleep 5; done; grep FAILED -A 20 "$W/bg.log" && exit 1
    GPU=0 bash bench/rehearsal.sh eval 14B cold && GPU=0 bash bench/rehearsal.sh eval 14B warm
    GPU=1 bash bench/rehearsal.sh restart 1.7B; copy_out; cp "$W/out/summary-"* "$OUT/" 2>/dev/null;;
  multigpu)
    bash bench/multi_gpu.sh 8B; copy_out
    CUDA_VISIBLE_DEVICES=0 /tmp/pyv bench/bench_score.py --shape 8B --formats nvfp4-w4a4 --no-hf --no-enforce-eager \
      --out "$OUT/bench-emulation.jsonl" 2>&1 | grep -E "^BENCH|Error|error";;
  *) echo "unknown call $1"; exit 2;;
esac
