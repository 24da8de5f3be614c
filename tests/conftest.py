"""Shared fixtures: the tiny model and its quantized copies, built once per test session."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "data"
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub, here or in CI
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _hermetic_environment() -> None:
    """Drop every variable a stage option reads: `make test` exports the pipeline's settings (TOKENIZER,
    DATASETS, …) and a user's shell may hold more; tests must not pick them up."""
    import click

    from jobs.cli import main

    cmds = [main, *main.commands.values()]
    for name in {p.envvar for c in cmds for p in c.params if isinstance(p, click.Option) and p.envvar}:
        os.environ.pop(name, None)
    for name in ("WIKITEXT_SOURCE", "WIKITEXT_DOC_SOURCE", "ULTRACHAT_SOURCE"):
        os.environ.pop(name, None)


_hermetic_environment()


def cli(*args: str, env: dict | None = None):
    """Run ``python -m jobs`` in-process; returns click's Result (exit_code, stdout, stderr)."""
    from jobs.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], env=env, catch_exceptions=False)


def cli_subprocess(*args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def fixtures_subprocess(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the fixtures' command line (tests/fixtures/cli.py: build-tiny, export-modelopt)."""
    return subprocess.run([sys.executable, str(ROOT / "tests" / "fixtures" / "cli.py"), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    """Built once (about a minute on 2 cores) into .cache/, reused while the recipe and data are unchanged."""
    from fixtures.tinymodel import build_tiny_model

    return Path(build_tiny_model(ROOT / ".cache" / "tiny-qwen3"))


@pytest.fixture(scope="session")
def tiny_nvfp4(tiny_model, models_dir) -> Path:
    out = models_dir / "tiny-nvfp4"
    r = cli("quantize", "--model-id", tiny_model, "--output", out, "--scheme", "NVFP4",
            "--calibration-dataset", DATA / "calib_mini.jsonl", "--num-calibration-samples", 32,
            "--max-sequence-length", 128)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="session")
def tiny_modelopt(tiny_model, models_dir) -> Path:
    out = models_dir / "tiny-modelopt"
    # its own process: nvidia-modelopt patches torch and transformers when it quantizes
    r = fixtures_subprocess("export-modelopt", "--model", tiny_model, "--output", out)
    assert r.returncode == 0, r.stderr[-2000:]
    return out


@pytest.fixture(scope="session")
def gpu_checkpoints(tmp_path_factory) -> Path:
    """The GPU tests' checkpoints: QSCORE_GPU_FIXTURES where carried, else built once for the session
    (both GPU test files use them)."""
    from gpu_fixtures import given_or_built

    return given_or_built(tmp_path_factory)


@pytest.fixture(scope="session")
def eval_files() -> str:
    return f"wiki={DATA / 'wiki_mini.txt'},chat={DATA / 'chat_mini.jsonl'}"
