"""Every CLI option reads an environment variable, shows it in --help, and .env.example names it."""
import re

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


def test_every_option_has_an_env_var_documented_in_env_example():
    example = (ROOT / ".env.example").read_text()
    for stage, p in options():
        assert p.envvar, f"{stage} {p.opts[0]} reads no environment variable"
        assert re.search(rf"^#?{p.envvar}=", example, re.M), f"{p.envvar} missing from .env.example"
        assert p.help, f"{stage} {p.opts[0]} has no help"


@pytest.mark.parametrize("stage", STAGES)
def test_help_shows_env_vars(stage):
    r = cli(stage, "--help")
    assert r.exit_code == 0 and "env var:" in r.stdout


def test_env_var_is_read(tmp_path):
    r = cli("score", "--label", "x", env={"MODEL": str(tmp_path / "missing")})
    assert r.exit_code == 1 and "model directory not found" in r.stderr
