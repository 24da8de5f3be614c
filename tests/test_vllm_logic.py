"""The vLLM backend's pure parts, on the CPU: prompt-logprob parsing and the kernel-path wording."""
from dataclasses import dataclass, field

import numpy as np
import pytest

from jobs.backends.vllm import LogprobLookupError, describe_kernels, parse_prompt_logprobs
from jobs.sampling import Sample


@dataclass
class Logprob:  # the shape of vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class Flat:  # the shape of vllm.logprobs.FlatLogprobs
    start_indices: list = field(default_factory=list)
    end_indices: list = field(default_factory=list)
    token_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    ranks: list = field(default_factory=list)

    def append(self, entries):  # as vLLM's append_fast: the actual token first, then ranks 1..k
        self.start_indices.append(len(self.token_ids))
        for t, lp, r in entries or []:
            self.token_ids.append(t)
            self.logprobs.append(lp)
            self.ranks.append(r)
        self.end_indices.append(len(self.token_ids))

    def __len__(self):
        return len(self.start_indices)


SAMPLE = Sample(3, (10, 11, 12), False)
# position 1: actual token 11 is rank 2 (top-1 is 99); position 2: actual 12 is the top-1
DICTS = [None, {11: Logprob(-1.5, 2), 99: Logprob(-0.4, 1)}, {12: Logprob(-0.1, 1)}]


def flat(k=1):
    f = Flat()
    f.append(None)
    f.append([(11, -1.5, 2), (99, -0.4, 1)] + ([(11, -1.5, 2)] if k > 1 else []))
    f.append([(12, -0.1, 1), (12, -0.1, 1)] + ([(7, -3.0, 2)] if k > 1 else []))
    return f


@pytest.mark.parametrize("pl", [DICTS, flat()], ids=["dict", "flat"])
def test_actual_token_is_looked_up_by_id_not_by_rank(pl):
    s = parse_prompt_logprobs(SAMPLE, pl)
    assert s.sample_id == 3 and s.token_ids.tolist() == [10, 11, 12]
    assert np.isnan(s.logprob[0]) and s.rank[0] == -1
    np.testing.assert_allclose(s.logprob[1:], [-1.5, -0.1])
    assert s.rank[1:].tolist() == [2, 1]
    assert s.top1_id[1:].tolist() == [99, 12]
    np.testing.assert_allclose(s.top1_logprob[1:], [-0.4, -0.1])


def test_reference_run_bug_is_not_reproduced():
    """A rank==0 lookup finds nothing and falls back to the top candidate: NLL 0.25 instead of 0.8."""
    s = parse_prompt_logprobs(SAMPLE, flat())
    assert -np.mean(s.logprob[1:]) == pytest.approx(0.8)
    assert -np.mean(s.top1_logprob[1:]) == pytest.approx(0.25)  # conf_nll: what the reference run reported


def test_topk_columns():
    s = parse_prompt_logprobs(SAMPLE, flat(k=2), topk=2)
    assert s.topk_ids[1].tolist() == [99, 11] and s.topk_ids[2].tolist() == [12, 7]
    np.testing.assert_allclose(s.topk_logprobs[2], [-0.1, -3.0])


def test_missing_or_wrong_entries_are_errors():
    with pytest.raises(LogprobLookupError, match="position 1: token 11 has no entry"):
        parse_prompt_logprobs(SAMPLE, [None, {99: Logprob(-0.4, 1)}, {12: Logprob(-0.1, 1)}])
    bad = flat()
    bad.token_ids[0] = 5
    with pytest.raises(LogprobLookupError, match="position 1: entry is token 5, expected 11"):
        parse_prompt_logprobs(SAMPLE, bad)
    with pytest.raises(LogprobLookupError, match="2 prompt-logprob positions for 3 tokens"):
        parse_prompt_logprobs(SAMPLE, DICTS[:2])


def test_kernel_path_wording():
    hopper = describe_kernels({"ModelOptNvFp4LinearMethod/MarlinNvFp4LinearKernel": 14,
                               "UnquantizedLinearMethod": 1}, "9.0")
    assert hopper.startswith("weight-only FP4 (W4A16) via Marlin") and "sm_90" in hopper and "x14" in hopper
    blackwell = describe_kernels({"CompressedTensorsLinearMethod/CompressedTensorsW4A4Fp4/"
                                  "CutlassNvFp4LinearKernel": 14}, "10.0")
    assert blackwell.startswith("native FP4 (W4A4)") and "sm_100" in blackwell
    assert describe_kernels({"UnquantizedLinearMethod": 14, "UnquantizedEmbeddingMethod": 2},
                            "9.0").startswith("unquantized")
    assert describe_kernels({}, "9.0").startswith("unknown")
