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


@pytest.mark.parametrize("n,window,stride", [(2, 4, None), (9, 4, None), (50, 8, None), (50, 8, 3), (17, 16, 1),
                                              (100, 10, 9), (9, 4, 2), (1000, 64, 17), (5, 64, None)])
def test_rolling_windows_are_lm_evals(n, window, stride):
    """The windows lm-eval's own get_rolling_token_windows cuts (max_seq_len = window - 1, context_len =
    window - stride, made disjoint as lm-eval scores them), fed the positions themselves as tokens."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    stride = stride or window - 1
    theirs = []
    for pair in get_rolling_token_windows(list(range(1, n)), 0, window - 1, window - stride):
        ctx, pred = make_disjoint_window(pair)
        stream = ctx + pred  # lm-eval's model input is this minus its last token: the window [start, end)
        assert stream == list(range(stream[0], stream[-1] + 1))
        theirs.append((stream[0], stream[-1] + 1, pred[0] - stream[0]))
    assert sampling.rolling_windows(n, window, stride) == theirs
