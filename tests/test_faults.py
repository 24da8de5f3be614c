"""Bad inputs and interrupted runs: a one-line error, a non-zero exit, and nothing partial left to read."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from conftest import DATA, ROOT, cli, fixtures_subprocess
from jobs.archive import logprobs
from jobs.engines.base import SequenceScores

pytestmark = pytest.mark.slow
WIKI = f"wiki={DATA / 'wiki_mini.txt'}"
# Small parts and small batches: many parts to interrupt between. Every run compared row for row uses
# the same settings, since batch shapes move float32 results in the last bits.
SLOW = ("--part-size", "8", "--max-batch-tokens", "256")


def one_line_error(r, *needles):
    assert r.exit_code != 0, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) >= 1 and lines[-1].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[-1], lines[-1]


def no_datasets(results):
    logprobs = results / "logprobs"
    return not logprobs.exists() or not list(logprobs.glob("model=*/dataset=*"))


def score(model, results, *extra, label="m", datasets=WIKI):
    return cli("score", "--model", model, "--label", label, "--datasets", datasets, "--results-dir", results, *extra)


def rows(results, label="m", name="wiki"):
    table, _ = logprobs.read_dataset(logprobs.dataset_dir(results, label, name))
    return table


# -- bad models ---------------------------------------------------------------------------------------
def test_missing_model_directory(tmp_path):
    r = score(tmp_path / "nope", tmp_path / "res")
    one_line_error(r, "model directory not found")
    assert no_datasets(tmp_path / "res")


def test_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    one_line_error(score(tmp_path / "empty", tmp_path / "res"), "no config.json")


def test_unreadable_weights(tiny_model, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    w = bad / "model.safetensors"
    w.write_bytes(w.read_bytes()[:1000])
    one_line_error(score(bad, tmp_path / "res"), "unreadable weights", "model.safetensors")
    assert no_datasets(tmp_path / "res")


def test_hub_id_while_offline_names_what_to_set(tmp_path):
    r = cli("score", "--model", "Qwen/Qwen3-14B", "--label", "x", "--datasets", WIKI, "--results-dir", tmp_path,
            env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    one_line_error(r, "Qwen/Qwen3-14B", "HF_HUB_OFFLINE=1", "HF_HOME")


def test_validate_refuses_a_checkpoint_not_quantized_as_claimed(tiny_model, tiny_nvfp4, tmp_path):
    fake = tmp_path / "fake"
    shutil.copytree(tiny_model, fake)
    cfg = json.loads((fake / "config.json").read_text())
    cfg["quantization_config"] = json.loads((tiny_nvfp4 / "config.json").read_text())["quantization_config"]
    (fake / "config.json").write_text(json.dumps(cfg))
    one_line_error(cli("validate", "--model", fake), "not quantized as its config claims", "unpacked")
    one_line_error(cli("validate", "--model", tiny_nvfp4, "--expect-scheme", "FP8_DYNAMIC"),
                   "config says NVFP4, expected FP8_DYNAMIC")


def test_nan_weights_are_caught_before_anything_is_written(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    t = load_file(broken / "model.safetensors")
    name = next(k for k in t if k.endswith("layers.1.mlp.down_proj.weight"))
    t[name][:] = float("nan")
    save_file(t, broken / "model.safetensors", metadata={"format": "pt"})
    r = score(broken, tmp_path / "res")
    one_line_error(r, "non-finite logprob")
    assert no_datasets(tmp_path / "res")
    assert not list((tmp_path / "res").rglob("part-*.parquet"))
    one_line_error(cli("validate", "--model", broken), "non-finite")


# -- bad evaluation settings ----------------------------------------------------------------------------
def test_unknown_evaluation_set(tiny_model, tmp_path):
    one_line_error(score(tiny_model, tmp_path, datasets="wikitext3"), "unknown evaluation set 'wikitext3'")


def test_set_left_empty_by_the_filters(tiny_model, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a b\nshort line\n\n")
    one_line_error(score(tiny_model, tmp_path / "res", datasets=f"short={short}"), "'short' is empty after filtering")
    assert no_datasets(tmp_path / "res")


def test_max_model_len_below_24(tiny_model, tmp_path):
    one_line_error(score(tiny_model, tmp_path, "--max-model-len", 20), "max_model_len 20 is below 24")


def test_max_model_len_beyond_the_models_context(tiny_model, tmp_path):
    """The tiny model's context is 2048 (max_position_embeddings): more is refused, with the limit named."""
    one_line_error(score(tiny_model, tmp_path, "--max-model-len", 1000000),
                   "--max-model-len 1000000 is beyond", "context of 2048 tokens")
    assert no_datasets(tmp_path)


def test_context_length_follows_rope_scaling():
    from jobs.checkpoints.checkpoint import context_length

    assert context_length({"max_position_embeddings": 40960}) == 40960
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert context_length({"max_position_embeddings": 40960, "rope_scaling": yarn}) == 131072
    assert context_length({"max_position_embeddings": 2048, "rope_parameters": {"rope_type": "linear", "factor": 2.0}}) == 4096
    assert context_length({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}) == 131072
    assert context_length({"text_config": {"max_position_embeddings": 1024}}) == 1024
    assert context_length({}) is None


def test_missing_local_calibration_file_is_named_as_such(tiny_model, tmp_path):
    r = cli("quantize", "--model-id", tiny_model, "--output", tmp_path / "q", "--calibration-dataset",
            tmp_path / "missing.jsonl")
    one_line_error(r, f"calibration file not found: {tmp_path / 'missing.jsonl'}")
    assert "hub" not in r.stderr and not (tmp_path / "q").exists()


def test_topk_above_the_vocabulary_is_refused_before_the_model_loads(tiny_model, tmp_path, monkeypatch):
    from jobs import engines

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engines, "load", no_load)
    one_line_error(score(tiny_model, tmp_path, "--topk", 5000), "--topk 5000 is above the vocabulary", "1024 tokens")
    assert no_datasets(tmp_path)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_binary_evaluation_set_is_named(tiny_model, tmp_path, suffix):
    binary = tmp_path / f"blob{suffix}"
    binary.write_bytes(bytes(range(256)) * 8)
    one_line_error(score(tiny_model, tmp_path / "res", datasets=f"b={binary}"), str(binary), "not UTF-8 text")
    assert no_datasets(tmp_path / "res")


@pytest.mark.parametrize("content", [b"", b"\x00\xff garbage {"], ids=["empty", "unreadable"])
def test_an_empty_or_unreadable_calibration_file_is_named_as_such(tiny_model, tmp_path, content, monkeypatch):
    import transformers

    def no_load(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_load)
    calib = tmp_path / "calib.jsonl"
    calib.write_bytes(content)
    r = cli("quantize", "--model-id", tiny_model, "--output", tmp_path / "q", "--calibration-dataset", calib)
    one_line_error(r, str(calib), "empty file" if not content else "unreadable as .jsonl")
    assert "hub" not in r.stderr.splitlines()[-1] and not (tmp_path / "q").exists()


def test_export_modelopt_names_a_config_that_is_not_json(tiny_model, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    (bad / "config.json").write_text("{not json")
    r = fixtures_subprocess("export-modelopt", "--model", bad, "--output", tmp_path / "out")
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: "), r.stderr
    assert f"{bad / 'config.json'}: unreadable JSON" in r.stderr.strip().splitlines()[-1], r.stderr
    assert not (tmp_path / "out").exists()


# -- bad archives --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_tokenizers(tiny_model, tmp_path_factory):
    """The tiny model scored once with its own tokenizer and once with a differently trained one."""
    from fixtures.tinymodel import train_tokenizer

    other = tmp_path_factory.mktemp("other-tok")
    shutil.copytree(tiny_model, other, dirs_exist_ok=True)
    texts = [l for l in (DATA / "wiki_mini.txt").read_text().splitlines() if l.strip()]
    tok = train_tokenizer(texts[::-1][:60], vocab_size=400)
    for f in other.glob("tokenizer*"):
        f.unlink()
    tok.save_pretrained(other)
    res = tmp_path_factory.mktemp("res-tok")
    assert score(tiny_model, res, label="bf16").exit_code == 0
    assert score(other, res, label="other").exit_code == 0
    return res


def test_different_tokenizers_are_refused_naming_the_first_text(two_tokenizers, tmp_path):
    r = cli("aggregate", "--results-dir", two_tokenizers, "--baseline", "bf16", "--report-dir", tmp_path / "rep")
    one_line_error(r, "other vs bf16 on wiki", "sample_id=")
    assert not (tmp_path / "rep" / "summary.json").exists()


def test_corrupt_parquet_is_named(tiny_model, tmp_path):
    assert score(tiny_model, tmp_path, "--part-size", 40).exit_code == 0
    part = sorted((tmp_path / "logprobs" / "model=m" / "dataset=wiki").glob("part-*.parquet"))[1]
    part.write_bytes(part.read_bytes()[:-100])
    r = cli("aggregate", "--results-dir", tmp_path, "--baseline", "m")
    one_line_error(r, str(part))
    assert not (tmp_path / "report" / "summary.json").exists()


def test_a_null_logprob_at_a_scored_position_is_named(tmp_path):
    import numpy as np
    import pyarrow as pa

    n = 20
    seq = SequenceScores(0, np.arange(n), -np.ones(n), np.ones(n, int), np.arange(n), -np.ones(n))
    table = logprobs.sequences_to_table([seq])
    logprob = table.column("logprob").to_pylist()
    logprob[5] = None  # position 5 is scored: only position 0 may be null
    table = table.set_column(table.schema.get_field_index("logprob"), "logprob", pa.array(logprob, pa.float32()))
    ddir = logprobs.dataset_dir(tmp_path, "m", "wiki")
    logprobs.atomic_write_table(table, ddir / "part-00000.parquet", {"fingerprint": "f"})
    r = cli("aggregate", "--results-dir", tmp_path, "--baseline", "m")
    one_line_error(r, str(ddir), "logprob is null at a scored position")
    assert not (tmp_path / "report" / "summary.json").exists()


# -- interrupted and repeated runs ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clean_run(tiny_model, tmp_path_factory):
    res = tmp_path_factory.mktemp("clean")
    assert score(tiny_model, res, *SLOW).exit_code == 0
    return rows(res)


def test_disk_full_keeps_complete_parts_and_resumes(tiny_model, tmp_path, monkeypatch, clean_run):
    real = pq.write_table
    calls = {"n": 0}

    def fill_up(table, where, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            real(table.slice(0, 3), where, **kw)  # a partial temp file, then the disk is full
            raise OSError(28, "No space left on device", str(where))
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", fill_up)
    r = score(tiny_model, tmp_path, *SLOW)
    one_line_error(r, "no space left on device")
    staging = tmp_path / "logprobs" / "model=m" / ".dataset=wiki.partial"
    assert sorted(p.name for p in staging.glob("*.parquet")) == [f"part-0000{i}.parquet" for i in range(3)]
    assert not list(staging.glob(".*tmp*")) and no_datasets(tmp_path)
    monkeypatch.setattr(pq, "write_table", real)
    r = score(tiny_model, tmp_path, *SLOW)
    assert r.exit_code == 0, r.output
    assert rows(tmp_path).equals(clean_run)
    assert not staging.exists()


def test_kill_mid_run_then_resume_matches_a_clean_run(tiny_model, tmp_path, clean_run):
    """Fault injection: SIGKILL the scoring process once some parts are on disk, rerun, compare rows."""
    args = [sys.executable, "-m", "jobs", "score", "--model", str(tiny_model), "--label", "m", "--datasets", WIKI,
            "--results-dir", str(tmp_path), *SLOW]
    staging = tmp_path / "logprobs" / "model=m" / ".dataset=wiki.partial"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(staging.glob("part-*.parquet"))) < 2 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(staging.glob("part-*.parquet")))
    assert proc.returncode == -signal.SIGKILL and done >= 2, "the run finished before it could be killed"
    assert no_datasets(tmp_path)  # a reader sees nothing until the set is whole
    r = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"resuming, {done} of" in r.stderr
    assert rows(tmp_path).equals(clean_run)


def _stage_three_parts(tiny_model, results, monkeypatch):
    """A run stopped by a full disk after its first three parts: the staging directory a resume reads."""
    real = pq.write_table
    calls = {"n": 0}

    def fill_up(table, where, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError(28, "No space left on device", str(where))
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", fill_up)
    one_line_error(score(tiny_model, results, *SLOW), "no space left on device")
    monkeypatch.setattr(pq, "write_table", real)
    return results / "logprobs" / "model=m" / ".dataset=wiki.partial"


def test_resume_scores_damaged_or_fabricated_staged_parts_again(tiny_model, tmp_path, monkeypatch, clean_run):
    """Fault injection: staged parts changed after they were written are never published."""
    staging = _stage_three_parts(tiny_model, tmp_path, monkeypatch)
    parts = sorted(staging.glob("part-*.parquet"))
    assert len(parts) == 3
    parts[1].write_bytes(parts[0].read_bytes())  # a well-formed part of this run, under another part's name
    parts[2].write_bytes(parts[2].read_bytes()[:-200])  # truncated
    shutil.copy(parts[0], staging / "part-00090.parquet")  # a part this run never writes
    r = score(tiny_model, tmp_path, *SLOW)
    assert r.exit_code == 0, r.output
    assert "resuming, 1 of" in r.stderr
    assert r.stderr.count("scored again") == 3, r.stderr
    assert rows(tmp_path).equals(clean_run)
    assert not staging.exists()


def test_resume_removes_a_killed_writers_temporaries_only(tiny_model, tmp_path, monkeypatch, clean_run):
    staging = _stage_three_parts(tiny_model, tmp_path, monkeypatch)
    dead = staging / ".part-00003.parquet.tmp-999999999-abcdef"  # no such process: a killed run's
    alive = staging / f".part-00004.parquet.tmp-{os.getppid()}-abcdef"  # a live process's work in progress
    dead.write_bytes(b"half")
    alive.write_bytes(b"half")
    from jobs.stages import score as score_stage

    monkeypatch.setattr(score_stage, "write_dataset", lambda *a, **k: None)  # plan only: no part written
    assert score(tiny_model, tmp_path, *SLOW).exit_code == 0
    assert not dead.exists() and alive.exists()


def test_two_runs_of_one_output_one_writes_the_other_stops(tiny_model, tmp_path, clean_run):
    """Fault injection (issue #19): a second run of the same label and set, started while the first has
    parts on disk, stops with one line naming the first; the first's output is whole and identical."""
    args = [sys.executable, "-m", "jobs", "score", "--model", str(tiny_model), "--label", "m", "--datasets", WIKI,
            "--results-dir", str(tmp_path), *SLOW]
    staging = tmp_path / "logprobs" / "model=m" / ".dataset=wiki.partial"
    first = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while not list(staging.glob("part-*.parquet")) and first.poll() is None:
            time.sleep(0.005)
        first.send_signal(signal.SIGSTOP)  # mid-run, with parts on disk, for as long as the second run takes
        assert first.poll() is None, "the first run finished before the second could start"
        second = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    finally:
        first.send_signal(signal.SIGCONT)
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    assert second.returncode == 1, second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and f"being written by pid {first.pid} on " in last, second.stderr
    assert rows(tmp_path).equals(clean_run)
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "already scored" in again.stderr


def test_sigterm_exits_cleanly_and_keeps_parts(tiny_model, tmp_path):
    args = [sys.executable, "-m", "jobs", "score", "--model", str(tiny_model), "--label", "m", "--datasets", WIKI,
            "--results-dir", str(tmp_path), "--part-size", "4", "--max-batch-tokens", "256"]
    staging = tmp_path / "logprobs" / "model=m" / ".dataset=wiki.partial"
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while len(list(staging.glob("part-*.parquet"))) < 1 and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "wiki: interrupted — " in err and "parts kept in" in err and "again to resume" in err, err
    assert list(staging.glob("part-*.parquet")) and not list(staging.glob(".*tmp*"))


def test_rerun_skips_and_other_settings_are_refused(tiny_model, tmp_path):
    r = score(tiny_model, tmp_path)
    assert r.exit_code == 0
    # not a terminal (click's runner): one progress line per part, throttled, with the last always there
    assert re.search(r"m/wiki: (\d+)/\1 parts, [\d,]+ tokens/s, ETA 0:00:00", r.stderr), r.stderr
    first = [p.stat().st_mtime_ns for p in logprobs.part_files(logprobs.dataset_dir(tmp_path, "m", "wiki"))]
    r = score(tiny_model, tmp_path)
    assert r.exit_code == 0 and "already scored" in r.stderr
    assert first == [p.stat().st_mtime_ns for p in logprobs.part_files(logprobs.dataset_dir(tmp_path, "m", "wiki"))]
    one_line_error(score(tiny_model, tmp_path, "--max-model-len", 64), "other settings", "--overwrite")
    r = score(tiny_model, tmp_path, "--max-model-len", 64, "--overwrite")
    assert r.exit_code == 0
    assert rows(tmp_path).column("position").to_numpy().max() == 64 - 8 - 1
