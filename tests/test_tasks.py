"""The tasks stage on the CPU: lm-eval's transformers backend on the bundled tasks, with the tiny model and
its NVFP4 copy; the archive, resume, bad input, the report's task table and validate's task gate."""
import json

import numpy as np
import pyarrow.dataset as pads
import pytest

from conftest import DATA, cli
from jobs.archive import tasks as task_archive
from jobs.core import locks
from jobs.engines import lmeval
from jobs.report import tasks as task_report

pytestmark = pytest.mark.slow
LIMIT = "30"  # documents per task: enough for the statistics, quick on 2 cores


def tasks(model, label, results, *extra):
    return cli("tasks", "--model", model, "--label", label, "--tasks", "qscore_local", "--results-dir", results,
               "--backend", "transformers", "--limit", LIMIT, *extra)


def one_line_error(r, *needles):
    assert r.exit_code == 1, r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), r.stderr
    for n in needles:
        assert n in last, last


@pytest.fixture(scope="module")
def results(tmp_path_factory, tiny_model, tiny_nvfp4):
    out = tmp_path_factory.mktemp("task-results")
    for label, path in (("bf16", tiny_model), ("llmc-nvfp4", tiny_nvfp4)):
        r = tasks(path, label, out)
        assert r.exit_code == 0, r.output
        assert r.stdout.split() == [str(out / "tasks" / f"model={label}" / f"task={t}")
                                    for t in ("qscore_arith", "qscore_cloze")]
    return out


def test_archive_layout_and_columns(results):
    ds = pads.dataset(results / "tasks", format="parquet", partitioning="hive")
    t = ds.to_table()
    assert set(t.column("model").to_pylist()) == {"bf16", "llmc-nvfp4"}
    assert set(t.column("task").to_pylist()) == {"qscore_arith", "qscore_cloze"}
    assert t.num_rows == 2 * 2 * int(LIMIT)  # one filter per bundled task: one row per document
    table, meta = task_archive.read_task(task_archive.task_dir(results, "bf16", "qscore_cloze"))
    assert table.column("doc_id").to_pylist() == list(range(int(LIMIT)))
    row = table.slice(0, 1).to_pylist()[0]
    assert row["filter"] == "none" and len(row["choice_logprobs"]) == 4 and row["raw_response"] is None
    assert row["choice"] == int(np.argmax(row["choice_logprobs"]))
    assert row["correct"] == (row["acc"] == 1.0) == (str(row["choice"]) == row["target"])
    gold = json.loads((DATA / "tasks" / "cloze_mini.jsonl").read_text().splitlines()[0])
    assert row["response"] == gold["choices"][row["choice"]]
    table, _ = task_archive.read_task(task_archive.task_dir(results, "bf16", "qscore_arith"))
    row = table.slice(0, 1).to_pylist()[0]
    assert row["filter"] == "first-number" and row["choice"] is None and isinstance(row["raw_response"], str)
    assert row["target"] == json.loads((DATA / "tasks" / "arith_mini.jsonl").read_text().splitlines()[0])["answer"]


def test_per_sample_values_reproduce_lm_evals_own_scores(results):
    for label in ("bf16", "llmc-nvfp4"):
        for task in ("qscore_arith", "qscore_cloze"):
            table, meta = task_archive.read_task(task_archive.task_dir(results, label, task))
            own = meta["results"]["lm_eval"]
            for (metric, filt), m in task_report.measures(table, meta).items():
                assert m.values.mean() == pytest.approx(own[f"{metric},{filt}"], abs=1e-12)


def test_metadata_records_provenance(results, tiny_nvfp4):
    _, meta = task_archive.read_task(task_archive.task_dir(results, "llmc-nvfp4", "qscore_arith"))
    assert meta["schema_version"] == task_archive.SCHEMA_VERSION and len(meta["fingerprint"]) == 16
    assert meta["model"]["label"] == "llmc-nvfp4" and len(meta["model"]["content_hash"]) == 64
    assert meta["quantization"]["scheme"] == "NVFP4" and meta["quantization"]["method"] == "compressed-tensors"
    assert meta["runtime"]["backend"] == "transformers" and meta["runtime"]["lm_eval"] == "0.4.13"
    assert "dequantized" in meta["runtime"]["kernel_path"]  # the score stage's loader, so its arithmetic
    t = meta["task"]
    assert (t["name"], t["version"], t["output_type"]) == ("qscore_arith", 1.0, "generate_until")
    assert t["num_fewshot"] == t["num_fewshot_used"] == 3 and t["limit"] == int(LIMIT)
    assert t["n_docs"] == int(LIMIT) and t["n_docs_total"] == 60 and len(t["config_hash"]) == 64
    lm = meta["lm_eval"]
    assert (lm["version"], lm["chat_template"], lm["add_bos_token"], lm["fewshot_as_multiturn"]) == (
        "0.4.13", "none", True, False)
    assert meta["metrics"] == [{"name": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                "per_sample": True}]
    assert meta["command"].startswith("python -m jobs tasks --model") and "--limit 30" in meta["command"]
    assert meta["counts"] == {"docs": 30, "rows_total": 30, "parts_total": 1}


def test_the_bundled_cloze_task_is_above_chance_for_the_tiny_model(results):
    table, _ = task_archive.read_task(task_archive.task_dir(results, "bf16", "qscore_cloze"))
    assert np.mean(table.column("acc").to_numpy()) > 0.4  # chance is 0.25: recovery means something


def test_config_hash_ignores_where_the_yaml_was_read(tmp_path, tiny_model):
    """The bundled tasks hash the same in the repository and in a container's /data/tasks."""
    import shutil

    copy = tmp_path / "elsewhere"
    shutil.copytree(DATA / "tasks", copy)
    _, a = lmeval.load_tasks(["qscore_cloze"], DATA / "tasks")
    _, b = lmeval.load_tasks(["qscore_cloze"], copy)
    assert lmeval.config_hash(a["qscore_cloze"]) == lmeval.config_hash(b["qscore_cloze"])


def test_report_has_the_task_table(results, tiny_model, tiny_nvfp4, tmp_path):
    texts = tmp_path / "mini.txt"
    texts.write_text("\n".join((DATA / "wiki_mini.txt").read_text().splitlines()[:20]) + "\n")
    for label, path in (("bf16", tiny_model), ("llmc-nvfp4", tiny_nvfp4)):
        r = cli("score", "--model", path, "--label", label, "--datasets", f"mini={texts}", "--tokenizer", tiny_model,
                "--results-dir", results)
        assert r.exit_code == 0, r.output
    r = cli("aggregate", "--results-dir", results, "--baseline", "bf16", "--bootstrap", 500,
            "--report-dir", tmp_path / "report")
    assert r.exit_code == 0, r.output
    md = (tmp_path / "report" / "report.md").read_text()
    assert "## Task accuracy" in md and "| qscore_cloze | acc (none) | 0 | 30 | bf16 |" in md
    assert md.index("## Task accuracy") < md.index("## Provenance")
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())["tasks"]
    rows = {(r["task"], r["model"]): r for r in summary["rows"]}
    cloze = rows[("qscore_cloze", "llmc-nvfp4")]
    base = rows[("qscore_cloze", "bf16")]
    assert cloze["recovery"] == pytest.approx(cloze["accuracy"] / base["accuracy"])  # same 30 documents
    assert cloze["recovery_lo"] <= cloze["recovery"] <= cloze["recovery_hi"]
    assert cloze["verdict"] == ("pass" if cloze["recovery_lo"] >= 0.95 else "fail" if cloze["recovery_hi"] < 0.95
                                else "inconclusive") and cloze["paired_docs"] == 30  # read off the interval
    assert base["verdict"] == "baseline" and base["accuracy_lo"] <= base["accuracy"] <= base["accuracy_hi"]
    arith = rows[("qscore_arith", "llmc-nvfp4")]
    if rows[("qscore_arith", "bf16")]["accuracy"] == 0:  # the tiny model cannot do arithmetic
        assert arith["recovery"] is None and arith["verdict"] == "undefined"
        assert "undefined (baseline 0)" in md
    csv = (tmp_path / "report" / "tasks.csv").read_text().splitlines()
    assert csv[0].startswith("task,metric,filter,model") and len(csv) == 1 + 4


def test_rerun_skips_and_other_settings_are_refused(results, tiny_model, monkeypatch):
    d = task_archive.task_dir(results, "bf16", "qscore_cloze")
    before = [p.stat().st_mtime_ns for p in d.glob("part-*.parquet")]

    def no_model(*a, **k):
        raise AssertionError("a finished task loaded the model again")

    monkeypatch.setattr(lmeval, "load_lm", no_model)
    r = tasks(tiny_model, "bf16", results)
    assert r.exit_code == 0 and "already evaluated" in r.stderr
    assert before == [p.stat().st_mtime_ns for p in d.glob("part-*.parquet")]
    one_line_error(cli("tasks", "--model", tiny_model, "--label", "bf16", "--tasks", "qscore_cloze",
                       "--results-dir", results, "--backend", "transformers", "--limit", "20"),
                   "other settings", "--overwrite")


def test_interrupted_run_keeps_finished_tasks_and_resumes(tiny_model, tmp_path, monkeypatch):
    calls = []
    real = lmeval.evaluate

    def interrupt_second(lm, tm, task, **kw):
        calls.append(task.task_name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(lm, tm, task, **kw)

    monkeypatch.setattr(lmeval, "evaluate", interrupt_second)
    r = tasks(tiny_model, "m", tmp_path, "--limit", "5")
    assert r.exit_code == 130 and "completed parts are kept" in r.stderr
    assert "interrupted — 1 of 2 tasks kept, run the same command again to resume" in r.stderr
    model_dir = tmp_path / "tasks" / "model=m"
    # nothing partial, nothing hidden but the tasks' lock files (released, unsigned)
    assert sorted(p.name for p in model_dir.iterdir()) == [".task=qscore_arith.lock", ".task=qscore_cloze.lock",
                                                          "task=qscore_arith"]
    task_archive.read_task(model_dir / "task=qscore_arith")
    calls.clear()
    r = tasks(tiny_model, "m", tmp_path, "--limit", "5")
    assert r.exit_code == 0 and calls == ["qscore_cloze"]  # only what was missing
    assert sorted(task_archive.discover(tmp_path)["m"]) == ["qscore_arith", "qscore_cloze"]


def test_a_task_being_written_stops_a_second_run_before_the_model_loads(tiny_model, tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lmeval, "load_lm", no_model)
    with locks.hold(task_archive.task_dir(tmp_path, "m", "qscore_cloze")):
        one_line_error(tasks(tiny_model, "m", tmp_path), "task=qscore_cloze: task is being written by pid")
    assert task_archive.discover(tmp_path) == {}


def test_overwrite_replaces(tiny_model, tmp_path):
    assert tasks(tiny_model, "m", tmp_path, "--limit", "3", "--tasks", "qscore_cloze").exit_code == 0
    r = tasks(tiny_model, "m", tmp_path, "--limit", "4", "--tasks", "qscore_cloze", "--overwrite")
    assert r.exit_code == 0, r.output
    table, meta = task_archive.read_task(task_archive.task_dir(tmp_path, "m", "qscore_cloze"))
    assert table.num_rows == 4 and meta["task"]["limit"] == 4
    hidden = [p.name for p in (tmp_path / "tasks" / "model=m").iterdir() if p.name.startswith(".")]
    assert hidden == [".task=qscore_cloze.lock"]  # no temporary left; the lock file, released and unsigned
    assert locks.holder(task_archive.task_dir(tmp_path, "m", "qscore_cloze")) == {}


# -- bad input --------------------------------------------------------------------------------------------
def test_unknown_task(tiny_model, tmp_path):
    one_line_error(cli("tasks", "--model", tiny_model, "--label", "m", "--tasks", "qscore_nope",
                       "--results-dir", tmp_path, "--include-path", DATA / "tasks"), "unknown task 'qscore_nope'")
    assert not (tmp_path / "tasks").exists()


def test_hub_dataset_while_offline(tiny_model, tmp_path):
    (tmp_path / "hub_task.yaml").write_text(
        "task: hub_task\ndataset_path: qscore-test/no-such-dataset\noutput_type: multiple_choice\n"
        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: 0\ndoc_to_choice: ['a', 'b']\n")
    r = cli("tasks", "--model", tiny_model, "--label", "m", "--tasks", "hub_task", "--results-dir", tmp_path / "r",
            "--include-path", tmp_path, env={"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    one_line_error(r, "not in the Hugging Face cache", "HF_HOME")


@pytest.mark.parametrize("args, needle", [(("--limit", "0"), "--limit must be at least 1"),
                                          (("--label", "a/b"), "bad model label"),
                                          (("--engine-kwargs", "{nope"), "--engine-kwargs is not JSON")])
def test_bad_settings(tiny_model, tmp_path, args, needle):
    r = cli("tasks", "--model", tiny_model, "--label", "m", "--results-dir", tmp_path, "--tasks", "qscore_local", *args)
    one_line_error(r, needle)


def test_missing_model(tmp_path):
    one_line_error(cli("tasks", "--model", tmp_path / "nope", "--label", "m", "--tasks", "qscore_local"),
                   "model directory not found")


# -- validate's task gate ---------------------------------------------------------------------------------
def test_validate_task_gate(results, tiny_nvfp4):
    base = results / "tasks" / "model=bf16"
    ok = cli("validate", "--model", tiny_nvfp4, "--max-new-tokens", 4, "--baseline-tasks", base,
             "--recovery-min", 0.5)
    assert ok.exit_code == 0, ok.output
    gate = json.loads(ok.stdout)["task_gate"]
    measures = {(m["task"], m["metric"]): m for m in gate["measures"]}
    assert measures[("qscore_cloze", "acc")]["verdict"] == "pass"
    assert measures[("qscore_cloze", "acc")]["recovery"]["n"] == int(LIMIT)  # the baseline's documents
    # at 1.0 the model must match the baseline's accuracy beyond doubt: the interval cannot clear it
    bad = cli("validate", "--model", tiny_nvfp4, "--max-new-tokens", 4,
              "--baseline-tasks", base / "task=qscore_cloze", "--recovery-min", 1.0)
    one_line_error(bad, "quality gate: qscore_cloze acc (none) recovery", "1.0")
    seven = cli("validate", "--model", tiny_nvfp4, "--baseline-tasks", base, "--recovery-min", 7)
    assert seven.exit_code == 2 and "'--recovery-min'" in seven.output and "0<x<=1" in seven.output
    one_line_error(cli("validate", "--model", tiny_nvfp4, "--baseline-tasks", results / "nothing"),
                   "holds no task results")


def test_the_task_reader_refuses_what_is_not_one_whole_task_run(tmp_path):
    from jobs.core import errors
    from jobs.archive import logprobs

    rows = [{"doc_id": i, "filter": "none", "correct": bool(i % 2), "acc": float(i % 2)} for i in range(5)]
    table = task_archive.rows_to_table(rows, ["acc"])
    meta = {"schema_version": task_archive.SCHEMA_VERSION, "fingerprint": "f", "metrics": [{"name": "acc"}]}
    good = task_archive.write_task(tmp_path / "good", table, meta, part_rows=2)
    assert task_archive.read_task(good)[0].num_rows == 5
    (good / "part-00002.parquet").unlink()  # a part lost after the run
    with pytest.raises(errors.ArchiveError, match=r"4 rows but the run recorded 5 \(incomplete task\)"):
        task_archive.read_task(good)
    other = tmp_path / "logprobs"
    logprobs.atomic_write_table(table, other / "part-00000.parquet", {**meta, "schema_version": logprobs.SCHEMA_VERSION})
    with pytest.raises(errors.ArchiveError, match=r"not a task file of schema 'tasks-1' \(schema '1'\)"):
        task_archive.read_task(other)
    nometric = task_archive.write_task(tmp_path / "nometric", task_archive.rows_to_table(rows, []),
                                      {**meta, "metrics": [{"name": "exact_match"}]})
    with pytest.raises(errors.ArchiveError, match=r"missing columns \['exact_match'\]"):
        task_archive.read_task(nometric)
    assert errors.first_line(ValueError()) == "ValueError" and errors.first_line(OSError("a\nb")) == "a"
