"""Quantize at several calibration batch sizes: wall times, and how far each checkpoint's scales are from the first's.

    python3 bench/quantize_batch.py --model DIR --out DIR --batch-sizes 1,16 \\
        [--scheme NVFP4] [any other `jobs quantize` option, e.g. --num-calibration-samples 1024]

Each batch size is one `python -m jobs quantize` process (a fresh CUDA context, so peak memory and
times are its own) writing OUT/bs<N>; a batch size given twice (1,1,16) is run twice (OUT/bs1-2): the
run-to-run noise beside the batch size's effect. Options this script does not know go to every run.
It prints one `BENCH ` JSON line per run: the manifest's phases (load, data, calibrate + quantize,
save), wall time, peak GPU memory, padding tokens, and, for every run after the first, the largest
relative difference per tensor kind from the first run's checkpoint (`jobs.checkpoints.batching.drift`:
``input_global_scale`` is the one calibration sets; weight scales come from the weights alone).
"""
from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model to quantize (local directory or hub id)")
    ap.add_argument("--out", required=True, help="directory for the checkpoints (OUT/bs<N>)")
    ap.add_argument("--batch-sizes", default="1,16", help="comma-separated; the first is the reference")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (default: only the first and the last)")
    args, extra = ap.parse_known_args()
    from jobs.checkpoints import batching

    sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: list[Path] = []
    for n, bs in enumerate(sizes):
        again = sizes[:n].count(bs)
        dest = out / (f"bs{bs}" + (f"-{again + 1}" if again else ""))
        cmd = [sys.executable, "-m", "jobs", "quantize", "--model-id", args.model, "--output", str(dest),
               "--calibration-batch-size", str(bs), "--overwrite", *extra]
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT)
        wall = time.time() - t0
        if r.returncode != 0:
            print(f"BENCH {json.dumps({'batch_size': bs, 'error': r.returncode})}", flush=True)
            return r.returncode
        m = json.loads((dest / "qscore.json").read_text())
        calib = m.get("calibration") or {}
        row = {"batch_size": bs, "run": dest.name, "process_s": round(wall, 1), "stage_s": m["wall_time_s"],
               **m["phases_s"], "peak_gpu_gib": m.get("peak_gpu_gib"), "pipeline": calib.get("pipeline"),
               "batches": calib.get("batches"), "padding_tokens": calib.get("padding_tokens"),
               "gpu": m.get("gpu_name")}
        if runs:
            row["drift_vs"] = runs[0].name
            row["max_rel_diff"] = {k: float(f"{v:.3g}") for k, v in batching.drift(runs[0], dest).items()}
            a, b = sorted(runs[0].glob("*.safetensors")), sorted(dest.glob("*.safetensors"))
            row["identical_bytes"] = [x.name for x in a] == [y.name for y in b] and all(
                filecmp.cmp(x, y, shallow=False) for x, y in zip(a, b))
        print(f"BENCH {json.dumps(row)}", flush=True)
        runs.append(dest)
        if not args.keep and len(runs) > 2:
            shutil.rmtree(runs[-2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
