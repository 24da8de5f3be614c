"""tests/images/compare.py, the judge of `make test-images`: equal runs pass, container paths and the
fields it excludes are not differences, and anything else that differs fails it."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import save_file

from jobs.checkpoints import checkpoint

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("images_compare", ROOT / "tests" / "images" / "compare.py")
compare = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = compare  # dataclasses look their module up there
_spec.loader.exec_module(compare)

PART = "results/demo/logprobs/model=bf16/dataset=wiki/part-00000.parquet"


def _meta(prefix: str, results: str, created: str, content_hash: str) -> dict:
    return {"command": f"python -m jobs score --model {prefix}models/tiny --results-dir {results}",
            "created": created,
            "model": {"label": "bf16", "path": f"{prefix}models/tiny-nvfp4", "content_hash": content_hash},
            "dataset": {"dataset": f"{prefix}data/wiki.txt", "sha256": "ab"},
            "runtime": {"torch": "2.13.0+cpu", "device": "cpu"}}


def _run(root: Path, docker: bool, logprobs=(-1.5, -0.25, -3.0)) -> Path:
    """A miniature of what `make demo` leaves: a checkpoint with its provenance, one Parquet part, a report."""
    prefix = "/" if docker else ""
    ckpt = root / "models" / "tiny-nvfp4"
    ckpt.mkdir(parents=True)
    save_file({"w": np.arange(4, dtype=np.float32)}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text('{"architectures": ["Qwen3ForCausalLM"]}\n')
    (ckpt / "qscore.json").write_text(json.dumps({
        "scheme": "NVFP4", "model_id": f"{prefix}models/tiny", "versions": {"torch": "2.13.0+cpu"},
        "wall_time_s": 14.2 if docker else 12.9, "created": "2026-11-25T21:1%dZ" % docker,
        "phases_s": {"load_model": 6.7 if docker else 10.9, "save": 0.1},
        "host": {"hostname": "0f3c2a" if docker else "vm", "python": "3.11.2" if docker else "3.11.7"},
        "command": f"python -m jobs quantize --output {prefix}models/tiny-nvfp4"}, indent=2))
    content_hash = checkpoint.inspect(ckpt).content_hash  # covers qscore.json: differs between the runs
    (root / "models" / ".stamps" / "build-tiny").mkdir(parents=True)
    (root / "models" / ".stamps" / "build-tiny" / "x.ok").write_text("")
    table = pa.table({"sample_id": pa.array([0, 0, 0], pa.int32()), "position": pa.array([0, 1, 2], pa.int32()),
                      "logprob": pa.array(logprobs, pa.float32()),
                      "kld": pa.array([float("nan"), 0.5, 0.25], pa.float64())})  # NaN equals NaN here
    meta = _meta(prefix, "/results" if docker else "results/demo", "2026-11-25T21:2%dZ" % docker, content_hash)
    meta["set_fingerprint"] = "ca93a830adaccb4f" if docker else "29be2f4b6a4b58dc"  # hashes the set's path
    part = root / PART
    part.parent.mkdir(parents=True)
    pq.write_table(table.replace_schema_metadata({"qscore": json.dumps(meta)}), part)
    report = root / "results" / "demo" / "report"
    report.mkdir(parents=True)
    (report / "summary.json").write_text(json.dumps({"models": {"bf16": {"ppl": 4.3, "kld_lo": float("nan")}}, "provenance": {
        "bf16": {"model": f"{prefix}models/tiny-nvfp4", "content_hash": content_hash[:12]}}}))
    (report / "report.md").write_text(f"| bf16 | {prefix}models/tiny-nvfp4 | {content_hash[:12]} | 4.3 |\n")
    (report / "score.png").write_bytes(b"\x89PNG-same")
    # a stage's lock file names the process that held it: another pid and time in every run
    (root / "results" / "demo" / ".report.lock").write_text(f"pid {100 + docker} on {'0f3c2a' if docker else 'vm'}\n")
    return root


@pytest.fixture
def runs(tmp_path) -> tuple[Path, Path]:
    return _run(tmp_path / "local", docker=False), _run(tmp_path / "docker", docker=True)


def judge(local: Path, docker: Path, capsys) -> tuple[int, str]:
    rc = compare.main(["--local", str(local), "--docker", str(docker), "--results", "results/demo"])
    return rc, capsys.readouterr().out


def test_equal_runs_pass_and_excluded_differences_are_shown(runs, capsys):
    rc, out = judge(*runs, capsys)
    assert rc == 0, out
    assert "identical  models/tiny-nvfp4/model.safetensors  (sha256 " in out
    assert f"equal      {PART}  (3 rows equal, metadata equal but for:)" in out
    # container paths are the same directories; what differs legitimately is printed, not hidden
    assert "equal      results/demo/report/summary.json" in out and "equal      results/demo/report/report.md" in out
    assert "excluded host.python: '3.11.7' (local) vs '3.11.2' (docker)" in out
    assert "  qscore.json: host.python: Debian's python3 (3.11.2) in the stand-in base image" in out
    assert "excluded created: '2026-11-25T21:20Z' (local) vs '2026-11-25T21:21Z' (docker)" in out
    assert "  parquet: created: when the part was written" in out
    assert "excluded phases_s.load_model: 10.9 (local) vs 6.7 (docker)" in out and "phases_s.save" not in out
    assert "  qscore.json: phases_s.*: how long each phase" in out
    assert "excluded set_fingerprint: '29be2f4b6a4b58dc' (local) vs 'ca93a830adaccb4f' (docker)" in out
    assert ".ok" not in out and ".lock" not in out  # make's stamps and the stages' locks are not outputs
    assert "0 differ, 0 missing" in out
    # the checkpoints' content hashes differ (they cover qscore.json) and are shown, then read as what they name
    local_hash, docker_hash = (checkpoint.inspect(r / "models/tiny-nvfp4").content_hash[:12] for r in runs)
    assert local_hash != docker_hash
    assert f"content hash of models/tiny-nvfp4: {local_hash} (local), {docker_hash} (docker); it covers" in out


@pytest.mark.parametrize("change, expected", [
    (lambda d: save_file({"w": np.arange(1, 5, dtype=np.float32)}, str(d / "models/tiny-nvfp4/model.safetensors")),
     "differs    models/tiny-nvfp4/model.safetensors  (sha256 "),
    # a content hash that is not the hash of the run's own checkpoint
    (lambda d: _rewrite_part(d, meta={"model": {"label": "bf16", "path": "/models/tiny-nvfp4",
                                                "content_hash": checkpoint.inspect(
                                                    d.parent / "local/models/tiny-nvfp4").content_hash}}),
     "metadata model.content_hash: '<content hash of models/tiny-nvfp4>' (local) vs "),
    (lambda d: _rewrite_part(d, logprobs=(-1.5, -0.25, -3.0001)), "rows differ in logprob"),
    (lambda d: _rewrite_part(d, kld=(0.0, 0.5, 0.25)), "rows differ in kld"),
    (lambda d: _rewrite_part(d, meta={"runtime": {"torch": "2.12.0", "device": "cpu"}}),
     "metadata runtime.torch: '2.13.0+cpu' (local) vs '2.12.0' (docker)"),
    (lambda d: _rewrite_part(d, meta={"model": {**_part_meta(d)["model"], "path": "/elsewhere/tiny"}}),
     "metadata model.path: 'models/tiny-nvfp4' (local) vs '/elsewhere/tiny' (docker)"),
    (lambda d: _edit_json(d / "models/tiny-nvfp4/qscore.json", versions={"torch": "2.13.0+cu130"}),
     "versions.torch: '2.13.0+cpu' (local) vs '2.13.0+cu130' (docker)"),
    (lambda d: _edit_json(d / "results/demo/report/summary.json", models={"bf16": {"ppl": 4.31, "kld_lo": None}}),
     "models.bf16.ppl: 4.3 (local) vs 4.31 (docker)"),
    (lambda d: _edit_json(d / "results/demo/report/summary.json", models={"bf16": {"ppl": 4.3, "kld_lo": 0.1}}),
     "models.bf16.kld_lo: nan (local) vs 0.1 (docker)"),
    (lambda d: _edit_json(d / "models/tiny-nvfp4/qscore.json", phase_s={"load_model": 1.0}),
     "phase_s.load_model: '<absent>' (local) vs 1.0 (docker)"),
    (lambda d: (d / "results/demo/report/report.md").write_text("| bf16 | /models/tiny-nvfp4 | 4.4 |\n"),
     "differs    results/demo/report/report.md  (line 1: "),
    (lambda d: (d / "results/demo/report/score.png").unlink(),
     "missing    results/demo/report/score.png  (only in the local run)"),
    (lambda d: (d / "models/.tiny-nvfp4.tmp-1234").mkdir() or (d / "models/.tiny-nvfp4.tmp-1234/x").write_text(""),
     "missing    models/.tiny-nvfp4.tmp-1234/x  (only in the docker run)"),
])
def test_any_other_difference_fails(runs, capsys, change, expected):
    change(runs[1])
    rc, out = judge(*runs, capsys)
    assert rc == 1 and expected in out, out


def test_nothing_to_compare_fails(tmp_path, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    rc = compare.main(["--local", str(tmp_path / "a"), "--docker", str(tmp_path / "b")])
    assert rc == 1 and "no checkpoint or no Parquet file" in capsys.readouterr().err


def test_container_paths_only_at_the_mount_points(tmp_path):
    assert compare.host_paths("/models/x and /data/y.txt") == "models/x and data/y.txt"
    assert compare.host_paths(f"{tmp_path}/models/x", tmp_path) == "models/x"  # a path inside the run
    assert compare.host_paths(f"{tmp_path}/models/x", tmp_path / "other") == f"{tmp_path}/models/x"
    assert compare.host_paths("--results-dir /results --x /results/y", results="res/demo") == \
        "--results-dir res/demo --x res/demo/y"
    assert compare.host_paths("/results2 /work/results", results="res") == "/results2 /work/results"
    assert compare.host_paths({"a": ["/models/x"]}) == {"a": ["models/x"]}
    for kept in ("/work/models/x", "/mnt/host/data/x", "./models/x", "/models", "/datasets/x"):
        assert compare.host_paths(kept) == kept


def _rewrite_part(root: Path, logprobs=None, meta=None, kld=None):
    path = root / PART
    table = pq.read_table(path)
    old = json.loads(table.schema.metadata[b"qscore"])
    if logprobs is not None:
        table = table.set_column(2, "logprob", pa.array(logprobs, pa.float32()))
    if kld is not None:
        table = table.set_column(3, "kld", pa.array(kld, pa.float64()))
    table = table.replace_schema_metadata({"qscore": json.dumps({**old, **(meta or {})})})
    pq.write_table(table, path)


def _part_meta(root: Path) -> dict:
    return json.loads(pq.read_schema(root / PART).metadata[b"qscore"])


def _edit_json(path: Path, **fields):
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_fixture_is_what_the_script_compares(tmp_path):
    """Both fixtures are complete copies (a guard for the tests above: a mutation must hit a real file)."""
    a, b = _run(tmp_path / "a", False), _run(tmp_path / "b", True)
    names = lambda r: sorted(str(p.relative_to(r)) for p in r.rglob("*") if p.is_file())  # noqa: E731
    assert names(a) == names(b)
    shutil.rmtree(a)


# --- the vLLM image's scoring: --labels, --vllm-image ---------------------------------------------------------

def judge_scoring(local: Path, docker: Path, capsys, *extra: str) -> tuple[int, str, str]:
    rc = compare.main(["--local", str(local), "--docker", str(docker), "--results", "results/demo", *extra])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _vllm_stack(root: Path):
    """The part as the vLLM image writes it: vLLM's own torch and transformers, the same rows."""
    _rewrite_part(root, meta={"runtime": {"torch": "2.11.0", "device": "cpu", "vllm": "0.26.0",
                                          "transformers": "5.24.0"}})


def test_vllm_image_scoring_compares_the_labels_rows_with_its_versions_left_out(runs, capsys):
    local, docker = runs
    _vllm_stack(docker)
    # only what scoring bf16 wrote: the report and the checkpoint are not the vLLM image's outputs
    (docker / "results/demo/report/score.png").unlink()
    save_file({"w": np.arange(1, 5, dtype=np.float32)}, str(docker / "models/tiny-nvfp4/model.safetensors"))
    rc, out, _ = judge_scoring(local, docker, capsys, "--labels", "bf16", "--vllm-image")
    assert rc == 0, out
    assert f"equal      {PART}  (3 rows equal, metadata equal but for:)" in out
    assert "excluded runtime.torch: '2.13.0+cpu' (local) vs '2.11.0' (docker)" in out
    assert "excluded runtime.vllm: '<absent>' (local) vs '0.26.0' (docker)" in out
    assert "  parquet: runtime.torch: torch's release: vLLM's own pin in the vLLM image" in out
    assert "report" not in out and "safetensors" not in out and "1 files: 0 identical bytes, 1 equal" in out
    # without --vllm-image another torch is a difference
    rc, out, _ = judge_scoring(local, docker, capsys, "--labels", "bf16")
    assert rc == 1 and "metadata runtime.torch: '2.13.0+cpu' (local) vs '2.11.0' (docker)" in out


def test_vllm_image_scoring_still_needs_the_same_rows_and_every_label(runs, capsys):
    local, docker = runs
    _vllm_stack(docker)
    _rewrite_part(docker, logprobs=(-1.5, -0.25, -3.0001))
    rc, out, _ = judge_scoring(local, docker, capsys, "--labels", "bf16", "--vllm-image")
    assert rc == 1 and "rows differ in logprob" in out
    rc, _, err = judge_scoring(local, docker, capsys, "--labels", "bf16,nvfp4", "--vllm-image")
    assert rc == 1 and "no Parquet file of nvfp4 under" in err


def test_vllm_image_w4a4_rows_may_move_within_the_w4a4_path_noise_and_no_further(runs, capsys):
    """W4A4 computed by the vLLM image's torch and compressed-tensors is another path: its rows may move by
    W4A4's path noise (0.08 nats per token on average), never more, and no other arithmetic may move."""
    local, docker = runs
    w4a4 = {"runtime": {"torch": "2.13.0+cpu", "device": "cpu", "arithmetic": "W4A4 (emulated)"}}
    _rewrite_part(local, meta=w4a4)
    _rewrite_part(docker, logprobs=(-1.5, -0.30, -3.05), meta={"runtime": {**w4a4["runtime"], "torch": "2.11.0"}})
    rc, out, _ = judge_scoring(local, docker, capsys, "--labels", "bf16", "--vllm-image")
    assert rc == 0 and "W4A4 within its path noise (mean |Δ logprob| 0.0333" in out, out
    _rewrite_part(docker, logprobs=(-1.5, -0.25, -3.5))  # 0.167 per token on average: beyond it
    rc, out, _ = judge_scoring(local, docker, capsys, "--labels", "bf16", "--vllm-image")
    assert rc == 1 and "rows differ in logprob" in out
    rc, out, _ = judge_scoring(local, docker, capsys, "--labels", "bf16")  # the images' own demo: exact rows
    assert rc == 1 and "rows differ in logprob" in out
