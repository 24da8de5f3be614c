import pytest

from jobs.texts import sampling
from jobs.core.errors import SettingsError


def test_drops_texts_under_16_tokens_and_keeps_sample_ids():
    lists = [list(range(15)), list(range(16)), [], list(range(40))]
    kept = sampling.select(lists, max_model_len=2048)
    assert [s.sample_id for s in kept] == [1, 3]
    assert [len(s.token_ids) for s in kept] == [16, 40]


def test_truncates_in_token_space_to_max_model_len_minus_8():
    ids = list(range(100, 200))
    (s,) = sampling.select([ids], max_model_len=32)
    assert s.token_ids == tuple(ids[:24])  # the first 24 ids, exactly: no decode/re-encode
    assert s.truncated
    (s,) = sampling.select([ids[:24]], max_model_len=32)
    assert not s.truncated


@pytest.mark.parametrize("n", [0, 10, 23])
def test_max_model_len_below_24_is_refused(n):
    with pytest.raises(SettingsError, match="below 24"):
        sampling.select([list(range(30))], max_model_len=n)


def test_tokenize_uses_the_given_encoder():
    assert sampling.tokenize(["ab", "c"], lambda t: [ord(c) for c in t]) == [[97, 98], [99]]
