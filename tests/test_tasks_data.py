"""The bundled lm-eval tasks (data/tasks): reproducible from their generator, apart from the training text,
and loadable by lm-eval offline."""
import importlib.util
import json

from conftest import DATA

TASKS = DATA / "tasks"


def rows(name):
    return [json.loads(line) for line in (TASKS / name).read_text(encoding="utf-8").splitlines()]


def test_files_are_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_tasks", TASKS / "make_tasks.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, text in mod.build().items():
        assert (TASKS / name).read_text(encoding="utf-8") == text, f"{name}: rerun data/tasks/make_tasks.py"


def test_shapes_and_answers():
    arith = rows("arith_mini.jsonl")
    assert [r["split"] for r in arith].count("test") == 60 and [r["split"] for r in arith].count("train") == 10
    assert len({r["question"] for r in arith}) == 70 and all(r["answer"].isdigit() for r in arith)
    cloze = rows("cloze_mini.jsonl")
    assert len(cloze) == 70 and all(len(r["choices"]) == 4 == len(set(r["choices"])) for r in cloze)
    labels = [r["label"] for r in cloze]
    assert all(0 <= k < 4 for k in labels) and len(set(labels)) == 4  # the answer is not always in one place


def test_no_cloze_sentence_is_in_the_tiny_models_training_text():
    train = (DATA / "train_mini.txt").read_text(encoding="utf-8")
    for r in rows("cloze_mini.jsonl"):
        assert f"{r['context']} {r['choices'][r['label']]}" not in train


def test_lm_eval_loads_them_without_the_hub(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from jobs.engines import lmeval

    _, tasks = lmeval.load_tasks(["qscore_local"], TASKS)
    assert sorted(tasks) == ["qscore_arith", "qscore_cloze"]
    assert len(tasks["qscore_arith"].eval_docs) == 60 and tasks["qscore_arith"].config.num_fewshot == 3
    assert tasks["qscore_cloze"].OUTPUT_TYPE == "multiple_choice" and len(tasks["qscore_cloze"].eval_docs) == 60
