"""validate's "sane text" check: the probe's NLL must be well below a uniform guess's ln(vocabulary)."""
import math
import shutil

import pytest

from conftest import cli
from jobs.core.errors import ValidationError
from jobs.stages.validate import SANE_NLL_FRACTION, check_sane


def test_check_sane_by_hand():
    check_sane(2.93, 1024, "m")  # the tiny model
    check_sane(0.6 * math.log(1024), 1024, "m")  # at the limit
    for nll in (6.98, 0.61 * math.log(1024), float("nan")):  # a random model (issue #21), just above, NaN
        with pytest.raises(ValidationError, match=r"m: probe NLL .* not well below ln\(vocabulary 1024\) = 6.93"):
            check_sane(nll, 1024, "m")
    check_sane(9.0, None, "m")  # no vocabulary size in the config: nothing to compare with
    assert SANE_NLL_FRACTION < 1


@pytest.fixture(scope="module")
def random_model(tiny_model, tmp_path_factory):
    """The tiny model's architecture and tokenizer with random weights (an untrained model)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("random")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model))
    model.save_pretrained(out)
    for f in tiny_model.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "generation_config")):
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.slow
def test_validate_refuses_a_random_weight_model(random_model):
    r = cli("validate", "--model", random_model, "--max-model-len", 256)
    assert r.exit_code == 1, r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "probe NLL" in last and "uniform guess" in last, r.stderr


@pytest.mark.slow
def test_validate_passes_the_trained_tiny_model(tiny_model):
    r = cli("validate", "--model", tiny_model, "--max-model-len", 256)
    assert r.exit_code == 0, r.stderr
    assert '"probe_nll"' in r.stdout
