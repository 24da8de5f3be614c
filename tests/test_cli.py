"""Every CLI option reads the environment variable of its own name, shows it in --help, and .env.example
names it; `plan` and `slots` run without click (the host's python3 before any venv exists)."""
import re
import subprocess
import sys

import click
import pytest

from conftest import ROOT, cli
from jobs.cli import main

STAGES = sorted(main.commands)


def options():
    for name, cmd in main.commands.items():
        for p in cmd.params:
            if isinstance(p, click.Option) and p.name != "help":
                yield name, p
    for p in main.params:
        yield "", p


def test_every_option_has_the_environment_variable_of_its_name_documented_in_env_example():
    example = (ROOT / ".env.example").read_text()
    for stage, p in options():
        long_name = next(o for o in p.opts if o.startswith("--"))
        assert p.envvar == long_name[2:].replace("-", "_").upper(), f"{stage} {long_name} reads {p.envvar}"
        assert re.search(rf"^#{p.envvar}=", example, re.M), f"{p.envvar} missing from .env.example"
        assert p.help, f"{stage} {long_name} has no help"


def test_env_example_only_documents():
    lines = (ROOT / ".env.example").read_text().splitlines()
    assert not [ln for ln in lines if re.match(r"^[A-Z][A-Z0-9_]*=", ln)], "a default set in .env.example"


@pytest.mark.parametrize("stage", sorted(set(STAGES) - {"plan", "slots"}))
def test_help_shows_env_vars(stage):
    r = cli(stage, "--help")
    assert r.exit_code == 0 and "env var:" in r.stdout


def test_env_var_is_read(tmp_path):
    r = cli("score", "--label", "x", env={"MODEL": str(tmp_path / "missing")})
    assert r.exit_code == 1 and "model directory not found" in r.stderr


@pytest.mark.parametrize("value", ["7", "0", "-0.5"])
def test_recovery_threshold_is_a_share_of_the_baseline(value, tmp_path):
    r = cli("aggregate", "--results-dir", tmp_path, "--recovery-min", value)
    assert r.exit_code == 2 and "--recovery-min" in r.stderr and "0<x<=1" in r.stderr.replace(" ", "")


def test_plan_and_slots_run_without_click_or_numpy(tmp_path):
    """`python -m jobs plan` / `slots` with the modules a venv brings made unimportable."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nclass B:\n    def find_spec(self, name, *a):\n"
                       "        if name.split('.')[0] in ('click', 'numpy', 'pyarrow', 'torch'):\n"
                       "            raise ImportError('no ' + name)\nsys.meta_path.insert(0, B())\n")
    env = {"PYTHONPATH": f"{tmp_path}:{ROOT}", "PATH": "/usr/bin:/bin", "MODELS": "a=org/a b=org/b"}
    r = subprocess.run([sys.executable, "-m", "jobs", "plan"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert '"id": "score.b"' in r.stdout
    r = subprocess.run([sys.executable, "-m", "jobs", "slots", "--gpus", "", "--", "true"], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert cli("plan", "--format", "vars").exit_code == 0  # and through click, as listed in --help
