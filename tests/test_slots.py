"""Shared GPUs (jobs.runs.slots): the memory estimate (pure), the ledger, and scheduling on fake GPUs.

Scheduling is proven without clocks: each job marks that it runs, then waits (with a timeout that only
bounds the test) for the other's mark. Jobs that ran together saw each other; jobs run one after the other
never did.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.runs import plan, slots

ROOT = Path(__file__).resolve().parent.parent
GIB = 1 << 30
QWEN3_14B = {"hidden_size": 5120, "intermediate_size": 17408, "num_attention_heads": 40, "num_key_value_heads": 8,
             "head_dim": 128, "num_hidden_layers": 40, "vocab_size": 151936, "torch_dtype": "bfloat16"}


# -- the estimate -------------------------------------------------------------------------------------------
def test_kv_bytes_per_token_from_the_config():
    assert slots.kv_bytes_per_token(QWEN3_14B) == 2 * 40 * 8 * 128 * 2  # K and V, 40 layers, 8 heads of 128, bf16
    no_head_dim = {k: v for k, v in QWEN3_14B.items() if k != "head_dim"}
    assert slots.kv_bytes_per_token(no_head_dim) == 2 * 40 * 8 * (5120 // 40) * 2
    assert slots.kv_bytes_per_token({"text_config": {**QWEN3_14B, "torch_dtype": "float32"}}) == 2 * 40 * 8 * 128 * 4


def test_the_kv_cache_holds_every_step_of_a_scoring_run():
    """A step's new tokens, a request cut at the previous step beside them, a block's rounding per request and
    vLLM's null block: never fewer than one full batch plus one whole context."""
    assert slots.kv_tokens(2048, 16384, 1024) == 16384 + 2048 + 1025 * 16
    assert slots.kv_tokens(4096, 512, 1024) == 512 + 4096 + 513 * 16  # no more requests than tokens in a step
    need = slots.memory_need(28 * GIB, QWEN3_14B, max_model_len=2048)
    assert need.kv_tokens >= slots.DEFAULT_BATCHED_TOKENS + 2048
    assert need.kv == need.kv_tokens * slots.kv_bytes_per_token(QWEN3_14B)
    assert need.footprint == need.weights + slots.OVERHEAD + need.activations + need.kv + need.extra
    assert need.extra == 2048 * 151936 * slots.LOGPROB_BYTES  # prompt logprobs of one request


def test_the_estimate_grows_with_what_the_engine_holds():
    base = slots.memory_need(9 * GIB, QWEN3_14B, max_model_len=2048)
    assert slots.memory_need(9 * GIB, QWEN3_14B, max_model_len=4096).kv > base.kv
    bigger_steps = slots.memory_need(9 * GIB, QWEN3_14B, max_model_len=2048, batched_tokens=32768)
    assert bigger_steps.activations > base.activations
    assert slots.memory_need(9 * GIB, QWEN3_14B, max_model_len=2048, batched_tokens=4096).footprint < base.footprint
    emulated = slots.memory_need(9 * GIB, QWEN3_14B, max_model_len=2048, w4a4_emulated=True)
    assert emulated.activations > base.activations and emulated.kv == base.kv


def test_shares_are_fractions_of_the_gpu_rounded_up():
    need = slots.Need(weights=30 * GIB, activations=5 * GIB, kv=5 * GIB, kv_tokens=1, extra=4 * GIB)
    assert slots.share_of(need, 100 * GIB) == 0.46  # (30+2+5+5+4)/100
    assert slots.share_of(slots.Need(1, 0, 0, 0, 0), 3 * GIB) == pytest.approx(0.67)  # 2 GiB + 1 byte of 3


def test_the_three_14b_models_fit_one_h200_together():
    """The measured case: bf16 (28 GB), NVFP4 emulated as W4A4 and NVFP4 as W4A16 (about 9.5 GB each)."""
    total = 141 * 10**9
    needs = [slots.memory_need(28 * 10**9, QWEN3_14B, max_model_len=2048),
             slots.memory_need(int(9.5e9), QWEN3_14B, max_model_len=2048, w4a4_emulated=True),
             slots.memory_need(int(9.5e9), QWEN3_14B, max_model_len=2048)]
    entries = {}
    for i, need in enumerate(needs):
        share = slots.share_of(need, total)
        assert slots.fits(entries, share, False)
        entries[str(i)] = {"share": share, "exclusive": False}


# -- the checkpoint -----------------------------------------------------------------------------------------
def _checkpoint(path: Path, quant: dict | None = None, weights: int = 1000) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({**QWEN3_14B, **({"quantization_config": quant} if quant else {})}))
    (path / "model-00001.safetensors").write_bytes(b"\0" * weights)
    (path / "model-00002.safetensors").write_bytes(b"\0" * weights)
    (path / "tokenizer.json").write_text("{}")
    return path


def test_the_checkpoint_local_or_in_the_hub_cache(tmp_path):
    local = _checkpoint(tmp_path / "m")
    assert slots.find_checkpoint(str(local), None) == local and slots.weight_bytes(local) == 2000
    hub = tmp_path / "hf" / "hub" / "models--org--m"
    _checkpoint(hub / "snapshots" / "abc123", weights=10)
    (hub / "refs").mkdir()
    (hub / "refs" / "main").write_text("abc123\n")
    found = slots.find_checkpoint("org/m", str(tmp_path / "hf"))
    assert found == hub / "snapshots" / "abc123" and slots.weight_bytes(found) == 20
    assert slots.find_checkpoint("org/absent", str(tmp_path / "hf")) is None


def test_which_checkpoints_declare_w4a4(tmp_path):
    fp4 = {"num_bits": 4, "type": "float", "group_size": 16}
    w4a4 = _checkpoint(tmp_path / "a", {"config_groups": {"group_0": {"weights": fp4, "input_activations": fp4}}})
    w4a16 = _checkpoint(tmp_path / "b", {"config_groups": {"group_0": {"weights": fp4}}})
    modelopt = _checkpoint(tmp_path / "c", {"quant_method": "modelopt", "quant_algo": "NVFP4"})
    assert slots.declares_w4a4(w4a4) and slots.declares_w4a4(modelopt)
    assert not slots.declares_w4a4(w4a16) and not slots.declares_w4a4(_checkpoint(tmp_path / "d"))


# -- the ledger ---------------------------------------------------------------------------------------------
def test_who_may_join_a_gpu():
    run = lambda share, **kw: {"share": share, "exclusive": False, **kw}  # noqa: E731
    assert slots.fits({}, 0.9, False) and slots.fits({}, 1.0, True)
    assert slots.fits({"1": run(0.5)}, 0.47, False) and not slots.fits({"1": run(0.5)}, 0.48, False)
    assert not slots.fits({"1": run(1.0, exclusive=True)}, 0.01, False)
    assert not slots.fits({"1": run(0.1)}, 1.0, True)  # a whole-GPU job waits for an empty GPU


def test_a_dead_or_reused_pid_holds_nothing():
    gone = subprocess.Popen(["true"])
    gone.wait()
    me = str(os.getpid())
    entries = {str(gone.pid): {"started": "1"}, me: {"started": slots._started(os.getpid())}}
    assert list(slots.alive(entries)) == [me]
    assert slots.alive({me: {"started": "not-when-it-started"}}) == {}  # another process under a reused pid


# -- scheduling on fake GPUs --------------------------------------------------------------------------------
def _job(d: Path, me: str, other: str) -> str:
    """Mark that ``me`` runs, wait up to 3 s for ``other``'s mark, record whether it came, the share and the KV
    cache given; having seen it, keep the mark until ``other`` has recorded too (or 3 s passed)."""
    wait = lambda path: f"i=0; while [ ! -e {path} ] && [ $i -lt 60 ]; do sleep 0.05; i=$((i+1)); done; "  # noqa: E731
    return (f'touch {d}/run-{me}; {wait(f"{d}/run-{other}")}if [ -e {d}/run-{other} ]; then w=seen; '
            f'else w=alone; fi; echo "$w ${{GPU_MEMORY_UTILIZATION:-none}} $CUDA_VISIBLE_DEVICES '
            f'${{KV_CACHE_MEMORY_BYTES:-none}}" > {d}/{me}.tmp; '
            f'mv {d}/{me}.tmp {d}/{me}.out; [ $w = alone ] || {{ {wait(f"{d}/{other}.out")}}}; rm {d}/run-{me}')


def _slots(tmp_path: Path, *args: str, cmd: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jobs.runs.slots", "--lock-dir", str(tmp_path / "locks"),
                             "--poll", "0.05", "--gpu-memory", "80", *args, "--", "sh", "-c", cmd], cwd=ROOT)


def _run_two(tmp_path, a_args, b_args):
    d = tmp_path / "marks"
    d.mkdir()
    a = _slots(tmp_path, *a_args, cmd=_job(d, "a", "b"))
    while not (d / "run-a").exists():  # b is asked for once a holds its share
        assert a.poll() is None
        time.sleep(0.02)
    b = _slots(tmp_path, *b_args, cmd=_job(d, "b", "a"))
    assert [a.wait(timeout=60), b.wait(timeout=60)] == [0, 0]
    return (d / "a.out").read_text().split(), (d / "b.out").read_text().split()


def test_two_jobs_share_a_gpu_when_their_shares_fit(tmp_path):
    a, b = _run_two(tmp_path, ["--gpus", "0", "--share", "0.45"], ["--gpus", "0", "--share", "0.5"])
    assert a == ["seen", "0.45", "0", "none"] and b == ["seen", "0.50", "0", "none"]


def test_two_jobs_run_one_after_the_other_when_their_shares_do_not_fit(tmp_path):
    a, b = _run_two(tmp_path, ["--gpus", "0", "--share", "0.5"], ["--gpus", "0", "--share", "0.5"])
    assert a[0] == "alone" and b[0] == "alone"


def test_a_job_without_a_share_takes_the_whole_gpu(tmp_path):
    a, b = _run_two(tmp_path, ["--gpus", "0", "--share", "0.1"], ["--gpus", "0"])
    assert a[0] == "alone" and b == ["alone", "none", "0", "none"]  # no share given: vLLM's own defaults


def test_shares_on_two_gpus_and_whole_gpus_side_by_side(tmp_path):
    a, b = _run_two(tmp_path, ["--gpus", "0,1"], ["--gpus", "0,1"])
    assert a[0] == b[0] == "seen" and {a[2], b[2]} == {"0", "1"}


def test_the_estimate_from_a_checkpoint_reaches_the_job(tmp_path):
    model = _checkpoint(tmp_path / "m", weights=GIB)
    d = tmp_path / "marks"
    d.mkdir()
    r = subprocess.run([sys.executable, "-m", "jobs.runs.slots", "--lock-dir", str(tmp_path / "locks"), "--gpu-memory",
                        "141", "--gpus", "0", "--model", str(model), "--max-model-len", "2048", "--",
                        "sh", "-c", _job(d, "a", "nobody")], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    need = slots.memory_need(2 * GIB, QWEN3_14B, max_model_len=2048)
    share = slots.share_of(need, 141 * GIB)
    assert (d / "a.out").read_text().split() == ["alone", f"{share:.2f}", "0", str(need.kv)]
    assert f"share {share:.2f}, KV cache" in r.stderr


def test_a_killed_holder_frees_its_share(tmp_path):
    d = tmp_path / "marks"
    d.mkdir()
    holder = _slots(tmp_path, "--gpus", "0", "--share", "0.6",
                    cmd=f"echo $$ > {d}/pid; exec sleep 60")
    while not (d / "pid").exists():
        time.sleep(0.02)
    ledger = json.loads((tmp_path / "locks" / "gpu0.json").read_text())
    assert list(ledger) == [str(holder.pid)]
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    os.kill(int((d / "pid").read_text()), signal.SIGKILL)  # its command, orphaned
    r = subprocess.run([sys.executable, "-m", "jobs.runs.slots", "--lock-dir", str(tmp_path / "locks"), "--poll",
                        "0.05", "--gpus", "0", "--share", "0.6", "--", "true"], cwd=ROOT, timeout=30)
    assert r.returncode == 0


# -- the plan -----------------------------------------------------------------------------------------------
ENV = {"MODELS": "a=models/a b=org/b", "MAX_MODEL_LEN": "1024", "GPUS": "all"}


def _slot_args(job: plan.Job, runner: str = "local") -> list[str]:
    import shlex

    words = shlex.split(job.commands[runner].split(" && ")[-1])
    return words[words.index("slots") + 1:words.index("--")] if "slots" in words else []


def test_the_plan_gives_slots_what_the_estimate_needs():
    jobs = {j.id: j for j in plan.build({**ENV, "NVFP4_COMPUTE": "weight-only", "MAX_NUM_BATCHED_TOKENS": "8192"})}
    assert _slot_args(jobs["score.a"]) == ["--gpus", "all", "--per-job", "1", "--model", "models/a", "--max-model-len",
                                           "1024", "--max-num-batched-tokens", "8192", "--weight-only"]
    assert _slot_args(jobs["score.a"], "docker")[4:6] == ["--model", "models/a"]  # the host's path, not /models/a
    assert _slot_args(jobs["score.b"], "docker")[4:6] == ["--model", "org/b"]
    assert "-e GPU_MEMORY_UTILIZATION -e KV_CACHE_MEMORY_BYTES" in jobs["score.b"].commands["docker"]
    assert _slot_args(jobs["validate"])[4:6] == ["--model", "models/Qwen3-14B-NVFP4"]
    for jid in ("tasks.a", "noise.a~noise"):  # lm-eval generates; the transformers backend has no vLLM budget
        assert _slot_args(jobs[jid]) == ["--gpus", "all", "--per-job", "1"]
        assert "GPU_MEMORY_UTILIZATION" not in jobs[jid].commands["docker"]


@pytest.mark.parametrize("env", [{"TENSOR_PARALLEL_SIZE": "2"}, {"GPU_MEMORY_UTILIZATION": "0.5"},
                                 {"BACKEND": "transformers"}, {"SCORE_ARGS": "--gpu-memory-utilization 0.4"}])
def test_jobs_the_estimate_does_not_cover_take_whole_gpus(env):
    job = next(j for j in plan.build({**ENV, **env}) if j.id == "score.a")
    assert "--model" not in _slot_args(job) and "-e GPU_MEMORY_UTILIZATION" not in job.commands["docker"]


# -- make ---------------------------------------------------------------------------------------------------
def test_make_eval_runs_its_jobs_together_on_a_shared_gpu(tmp_path):
    """`make eval`, no -j typed, one GPU (a stand-in nvidia-smi of 80 GiB): the two scoring jobs' shares,
    estimated by slots from their checkpoints, fit together, and the stand-in stages saw each other run."""
    import shutil

    from test_make import Repo

    if shutil.which("make") is None:
        pytest.skip("GNU make is not installed")
    repo = Repo(tmp_path / "repo")
    for label in ("a", "b"):
        _checkpoint(repo.path / "models" / label, weights=GIB // 4)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "nvidia-smi").write_text("#!/bin/sh\necho 81920\n")  # MiB
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".qscore-setup").touch()
    marks = tmp_path / "marks"
    marks.mkdir()
    stage = _job(marks, "$label", "$other")
    (venv / "bin" / "python").write_text(
        '#!/bin/bash\nargs=("$@"); for ((i=0;i<$#;i++)); do\n  [ "${args[i]}" = --label ] && label=${args[i+1]}\n'
        '  [ "${args[i]}" = --results-dir ] && r=${args[i+1]}\ndone\nother=$([ "$label" = a ] && echo b || echo a)\n'
        f'{stage}\nmkdir -p "$r/logprobs/model=$label/dataset=mini"\n')
    for f in (fake / "nvidia-smi", venv / "bin" / "python"):
        f.chmod(0o755)
    repo.make(f"VENV={venv}", "GPUS=0", "MODELS=a=models/a b=models/b", "DATASETS=mini=data/mini.txt", "eval",
              env={"PATH": f"{fake}:{repo.env['PATH']}", "XDG_RUNTIME_DIR": str(tmp_path)})
    outs = [(marks / f"{label}.out").read_text().split() for label in ("a", "b")]
    need = slots.memory_need(GIB // 2, QWEN3_14B, max_model_len=slots.DEFAULT_MAX_MODEL_LEN)
    assert [o[0] for o in outs] == ["seen", "seen"]
    assert [o[1:] for o in outs] == [[f"{slots.share_of(need, 80 * GIB):.2f}", "0", str(need.kv)]] * 2


def test_quantize_waits_for_every_gpu_of_gpus(tmp_path):
    """It runs beside nothing: llm-compressor spreads a model over the GPUs it sees, and make runs it
    together with the scoring jobs that do not need its checkpoint."""
    job = next(j for j in plan.build({**ENV, "GPUS": "0,1"}) if j.id == "quantize")
    assert _slot_args(job) == ["--gpus", "0,1", "--per-job", "all"]
    assert "--gpus '{gpus}'" in job.commands["docker"]
    d = tmp_path / "marks"
    d.mkdir()
    r = subprocess.run([sys.executable, "-m", "jobs.runs.slots", "--lock-dir", str(tmp_path / "locks"), "--gpus", "0,1",
                        "--per-job", "all", "--", "sh", "-c", f"echo $CUDA_VISIBLE_DEVICES > {d}/seen"], cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0 and (d / "seen").read_text().strip() == "0,1"
