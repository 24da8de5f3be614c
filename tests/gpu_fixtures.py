"""Build the GPU tests' checkpoints on any machine (CPU is fine): python tests/gpu_fixtures.py DIR.

The GPU host has no llm-compressor beside vLLM (they pin different compressed-tensors releases), so
the NVFP4 checkpoints are made here and carried there.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def write_report(report: dict, env_var: str) -> None:
    """What a GPU test module observed, for the record: to the JSON file that ``env_var`` names, if set."""
    import json
    import os

    if os.environ.get(env_var):
        Path(os.environ[env_var]).write_text(json.dumps(report, indent=1))


def given_or_built(tmp_path_factory) -> Path:
    """QSCORE_GPU_FIXTURES when set (carried to the GPU machine), else built here."""
    import os

    given = os.environ.get("QSCORE_GPU_FIXTURES")
    return Path(given) if given else build(tmp_path_factory.mktemp("gpu-fixtures"))


def build(out: Path) -> Path:
    from click.testing import CliRunner

    from jobs.cli import main
    from fixtures.tinymodel import GPU_SHAPE, build_tiny_model

    out.mkdir(parents=True, exist_ok=True)
    bf16 = Path(build_tiny_model(out / "tiny-bf16", steps=150, shape=GPU_SHAPE))
    run = CliRunner().invoke
    if not (out / "tiny-nvfp4").exists():
        r = run(main, ["quantize", "--model-id", str(bf16), "--output", str(out / "tiny-nvfp4"), "--scheme", "NVFP4",
                       "--calibration-dataset", str(ROOT / "data" / "calib_mini.jsonl"),
                       "--num-calibration-samples", "64", "--max-sequence-length", "256"])
        assert r.exit_code == 0, r.output
    if not (out / "tiny-modelopt").exists():
        from fixtures.modelopt_export import DEFAULT_CALIBRATION, export_modelopt_nvfp4

        export_modelopt_nvfp4(str(bf16), str(out / "tiny-modelopt"), DEFAULT_CALIBRATION)
    return out


if __name__ == "__main__":
    print(build(Path(sys.argv[1])))
