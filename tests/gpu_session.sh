#!/usr/bin/env bash
# One visit to the GPU machine, once the runtimes' parts have arrived (vLLM's and llm-compressor's, carried
# in parts and unpacked by .gpu-carry/unpack.sh):
#   bash tests/gpu_session.sh wheels             only unpack the wheels in .whl/ (they may travel in another call)
#   bash tests/gpu_session.sh tests              tests/test_gpu.py (fixtures from QSCORE_GPU_FIXTURES)
#   bash tests/gpu_session.sh bench ARGS...      bench/bench_score.py ARGS
#   bash tests/gpu_session.sh tasks              tests/test_gpu_tasks.py (lm-eval: its wheels in .whl/, see the file)
#   bash tests/gpu_session.sh serving            tests/test_gpu_bench.py (the bench stage: vllm serve + vllm bench serve)
# vLLM and llm-compressor pin different compressed-tensors releases: each gets its own PYTHONPATH.
# Packages the machine's image lacks (click, matplotlib, ...) may travel as wheels in .whl/: only
# those not installed there are unpacked, so nothing the image has is shadowed.
# Logs and results go to $OUT (the device tool's output folder), else ./gpu-out.
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
extra=/tmp/site-extra
if [ -d .whl ]; then
  missing=$(python3 - <<'EOF'
import glob, importlib.metadata as md, os
for wheel in sorted(glob.glob(".whl/*.whl")):
    try:
        md.version(os.path.basename(wheel).split("-")[0])
    except md.PackageNotFoundError:
        print(wheel)
EOF
)
  [ -z "$missing" ] || python3 -m pip install -q --no-index --no-deps --no-compile --target "$extra" $missing
fi
[ "${1:-}" != wheels ] || exit 0
site=$(bash .gpu-carry/unpack.sh vllm) || { echo "vLLM runtime not complete"; exit 3; }
qsite=$(bash .gpu-carry/unpack.sh quantize 2>/dev/null) || qsite=
export PYTHONPATH="$site:$extra:$PWD" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
[ -z "$qsite" ] || export QSCORE_QUANTIZE_PYTHONPATH="$qsite:$extra"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
case "${1:-tests}" in
  tests)
    QSCORE_GPU_REPORT=$out/gpu-report.json \
      python3 -m pytest -m gpu -v -p no:cacheprovider tests/test_gpu.py "${@:2}" 2>&1 | tee "$out/pytest-gpu.log"
    rc=${PIPESTATUS[0]};;
  tasks)
    QSCORE_GPU_TASKS_REPORT=$out/gpu-tasks-report.json \
      python3 -m pytest -m gpu -v -s -p no:cacheprovider tests/test_gpu_tasks.py "${@:2}" 2>&1 | tee "$out/pytest-gpu-tasks.log"
    rc=${PIPESTATUS[0]};;
  serving)
    QSCORE_GPU_BENCH_REPORT=$out/gpu-bench-report.json \
      python3 -m pytest -m gpu -v -s -p no:cacheprovider tests/test_gpu_bench.py "${@:2}" 2>&1 | tee "$out/pytest-gpu-bench.log"
    rc=${PIPESTATUS[0]};;
  bench)
    shift; python3 bench/bench_score.py "$@" 2>&1 | tee -a "$out/bench.log" | grep -E "^BENCH|Error|error:|Traceback"
    rc=${PIPESTATUS[0]};;
  *) echo "usage: $0 wheels|tests|tasks|serving|bench [ARGS]"; rc=2;;
esac
echo "exit status $rc"
exit "$rc"
