"""The per-position KL lower bound from top-K: by hand, against the exact KL, and on the tiny model."""
import math

import numpy as np
import pytest

from jobs.stats import divergence


def topk(logp: np.ndarray, k: int):
    ids = np.argsort(-logp, axis=-1, kind="stable")[..., :k]
    return ids, np.take_along_axis(logp, ids, -1).astype(np.float32)


def bound(lp, lq, k, actual, tighten=True, kq=None):
    lp, lq = np.atleast_2d(lp), np.atleast_2d(lq)
    bi, bl = topk(lp, k)
    mi, ml = topk(lq, kq or k)
    actual = np.atleast_1d(actual)
    rows = np.arange(len(actual))
    return divergence.topk_kl(bi, bl, mi, ml, lp[rows, actual], lq[rows, actual], actual, tighten=tighten)


P = np.array([0.5, 0.2, 0.1, 0.1, 0.05, 0.05])
Q = np.array([0.4, 0.1, 0.3, 0.1, 0.05, 0.05])


def test_two_cell_bound_by_hand():
    # K = 2: A = {0, 1}, B = {0, 2}; actual token 3. S = {0, 3}, rest R = {1, 2, 4, 5}.
    d = bound(np.log(P), np.log(Q), 2, 3, tighten=False)
    pr, qr = 1 - 0.5 - 0.1, 1 - 0.4 - 0.1
    fwd = 0.5 * math.log(0.5 / 0.4) + 0.1 * math.log(0.1 / 0.1) + pr * math.log(pr / qr)
    rev = 0.4 * math.log(0.4 / 0.5) + qr * math.log(qr / pr)
    assert d.kl[0] == pytest.approx(fwd, rel=1e-5)  # probabilities in float32, as stored
    assert d.kl_reverse[0] == pytest.approx(rev, rel=1e-5)
    assert d.k == 2 and d.agree_k == 2
    assert d.agree[0] == 0b01  # same top-1 (token 0); the top-2 sets {0,1} and {0,2} differ


def test_tightened_bound_by_hand():
    # C1 = {1} (p = 0.2, and q(1) ≤ q's 2nd = 0.3), C2 = {2} (q = 0.3, p(2) ≤ p's 2nd = 0.2),
    # C3 = {4, 5}: p(C2 ∪ C3) = 0.2, q(C1 ∪ C3) = 0.2. The box does not bind here: min over
    # x = q(C1) ∈ [0, 0.2], y = p(C2) ∈ [0, 0.2] of the 3-cell KL, found numerically on a fine grid.
    d = bound(np.log(P), np.log(Q), 2, 3, tighten=True)
    s_known = 0.5 * math.log(0.5 / 0.4)
    x, y = np.meshgrid(np.linspace(1e-6, 0.2, 2001), np.linspace(0, 0.2, 2001))
    with np.errstate(divide="ignore", invalid="ignore"):
        f = (0.2 * np.log(0.2 / x) + np.where(y > 0, y * np.log(y / 0.3), 0)
             + np.where(0.2 - y > 0, (0.2 - y) * np.log((0.2 - y) / (0.2 - x)), 0))
    f[~np.isfinite(f)] = np.inf
    assert d.kl[0] == pytest.approx(s_known + f.min(), abs=2e-6)
    exact = float(np.sum(P * np.log(P / Q)))
    two_cell = bound(np.log(P), np.log(Q), 2, 3, tighten=False).kl[0]
    assert two_cell <= d.kl[0] <= exact


def test_tightening_binds_when_the_model_drops_a_likely_token():
    # The baseline's 2nd token (p = 0.3) is outside the model's top-2, whose 2nd is 0.02: q of it ≤ 0.02.
    p = np.array([0.6, 0.3, 0.04, 0.03, 0.03])
    q = np.array([0.96, 0.001, 0.02, 0.01, 0.009])
    t = bound(np.log(p), np.log(q), 2, 0, tighten=True).kl[0]
    plain = bound(np.log(p), np.log(q), 2, 0, tighten=False).kl[0]
    exact = float(np.sum(p * np.log(p / q)))
    assert plain < t <= exact
    assert t >= 0.3 * math.log(0.3 / 0.02) + 0.6 * math.log(0.6 / 0.96) - 1e-9  # at least C1's own term


@pytest.mark.parametrize("k", [1, 3, 10, 50])
def test_never_above_the_exact_kl_on_random_distributions(k):
    rng = np.random.default_rng(k)
    v, n = 64, 4000
    for conc in (0.05, 1.0):  # peaked and flat
        p = np.clip(rng.dirichlet(np.full(v, conc), n), 1e-12, None)
        lp = np.log(p / p.sum(1, keepdims=True))
        lq = lp + rng.normal(0, 1.0, (n, v))
        lq -= np.log(np.exp(lq).sum(1, keepdims=True))
        actual = rng.integers(0, v, n)
        exact, rexact = divergence.exact_kl(lp, lq), divergence.exact_kl(lq, lp)
        for tighten in (False, True):
            d = bound(lp, lq, k, actual, tighten)
            assert np.all(d.kl <= exact + 1e-6), (k, conc, tighten)
            assert np.all(d.kl_reverse <= rexact + 1e-6), (k, conc, tighten)
            assert np.all(d.kl >= -1e-7) and np.all(d.kl_reverse >= -1e-7)
        # the tightened bound is never below the two-cell one (up to rounding: its cells are differences)
        assert np.all(bound(lp, lq, k, actual, True).kl >= bound(lp, lq, k, actual, False).kl - 1e-6)


def test_full_vocabulary_topk_gives_the_exact_kl():
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(20), 50))
    lq = np.log(rng.dirichlet(np.ones(20), 50))
    d = bound(lp, lq, 20, rng.integers(0, 20, 50))
    np.testing.assert_allclose(d.kl, divergence.exact_kl(lp, lq), atol=1e-6)
    np.testing.assert_allclose(d.kl_reverse, divergence.exact_kl(lq, lp), atol=1e-6)


def test_identical_models_give_zero_and_full_agreement():
    rng = np.random.default_rng(1)
    lp = np.log(rng.dirichlet(np.ones(30), 100))
    d = bound(lp, lp, 12, rng.integers(0, 30, 100))
    np.testing.assert_allclose(d.kl, 0, atol=1e-7)
    assert d.agree_k == 10 and np.all(d.agree == (1 << 10) - 1)


def test_agreement_is_of_sets_not_order():
    ids_a = np.array([[5, 6, 7, 8]])
    ids_b = np.array([[6, 5, 8, 7]])
    lp = np.log(np.array([[0.4, 0.3, 0.1, 0.05]], np.float32))
    d = divergence.topk_kl(ids_a, lp, ids_b, lp, lp[:, 0], lp[:, 0], np.array([5]))
    assert [bool(divergence.agreement_at(d.agree, k)[0]) for k in (1, 2, 3, 4)] == [False, True, False, True]


def test_shared_tokens_are_found_wherever_the_model_lists_them():
    # The kernel looks for each baseline id first at the same rank in the model's list; ranks moved
    # anywhere (and ids missing) must give the two-cell bound computed here by plain set arithmetic.
    rng = np.random.default_rng(5)
    n, k, v = 300, 6, 40
    b_ids = np.stack([rng.choice(v, k, replace=False) for _ in range(n)]).astype(np.int32)
    m_ids = np.stack([rng.permutation(np.r_[r[:4], v + 2 * i, v + 2 * i + 1]) for i, r in enumerate(b_ids)])
    b_lp = np.log(rng.dirichlet(np.ones(k), n) * 0.9).astype(np.float32)
    m_lp = np.log(rng.dirichlet(np.ones(k), n) * 0.9).astype(np.float32)
    tok = b_ids[:, 0]
    act_m = np.log(np.full(n, 1e-3))  # the actual token's logprob under the model, stored beside its list
    d = divergence.topk_kl(b_ids, b_lp, m_ids.astype(np.int32), m_lp, b_lp[:, 0], act_m, tok, tighten=False)
    for r in range(n):
        p = dict(zip(b_ids[r].tolist(), np.exp(b_lp[r].astype(float))))
        q = dict(zip(m_ids[r].tolist(), np.exp(m_lp[r].astype(float))))
        q[int(tok[r])] = math.exp(act_m[r])
        shared = (set(p) & set(q)) | {int(tok[r])}
        fwd = sum(p[x] * math.log(p[x] / q[x]) for x in shared)
        pr, qr = 1 - sum(p[x] for x in shared), 1 - sum(q[x] for x in shared)
        fwd += pr * math.log(pr / max(qr, divergence.REST_FLOOR)) if pr > 0 else 0.0
        assert d.kl[r] == pytest.approx(fwd, rel=1e-5, abs=1e-6), r


def test_different_k_per_model_and_top1_only():
    rng = np.random.default_rng(2)
    lp = np.log(rng.dirichlet(np.ones(40), 200))
    lq = np.log(rng.dirichlet(np.ones(40), 200))
    a = rng.integers(0, 40, 200)
    d = bound(lp, lq, 8, a, kq=3)
    assert d.k == 3 and d.agree_k == 3
    assert np.all(d.kl <= divergence.exact_kl(lp, lq) + 1e-6)
    d1 = bound(lp, lq, 1, a)  # archives scored with --topk 1 still give a (loose) bound
    assert np.all(d1.kl <= divergence.exact_kl(lp, lq) + 1e-6)


@pytest.mark.slow
def test_bound_against_the_exact_kl_on_the_tiny_model(tiny_model, tiny_nvfp4, eval_files):
    """bf16 vs NVFP4 tiny models: the archive's top-K gives a bound ≤ the exact full-vocabulary KL (computed
    here from both models' logits) at every position, and the bound tightens with K."""
    import torch
    from transformers import AutoTokenizer

    from conftest import DATA
    from jobs.texts import evalsets, sampling
    from jobs.engines import arithmetic_for
    from jobs.engines.hf import TransformersBackend
    from jobs.checkpoints.checkpoint import inspect
    from jobs.core.settings import EngineOptions

    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = evalsets.read_local_texts(DATA / "wiki_mini.txt")[:24]
    samples = sampling.select(sampling.tokenize(texts, sampling.hf_encoder(tok)), 256)
    full, scored = {}, {}
    for name, path in (("p", tiny_model), ("q", tiny_nvfp4)):
        # weight-only: the W4A4 forward rounds activations to FP4, so a batched pass (the scored top-K) and
        # a single-text pass (the exact KL) can differ at rounding boundaries; the bound is about one q
        ckpt, opts = inspect(path), EngineOptions(dtype="float32", device="cpu", nvfp4_compute="weight-only")
        be = TransformersBackend(ckpt, opts, arithmetic=arithmetic_for("transformers", ckpt.quant, opts))
        with torch.inference_mode():
            full[name] = np.concatenate([
                torch.log_softmax(be.model(input_ids=torch.tensor(s.token_ids)[None]).logits[0, :-1].double(), -1).numpy()
                for s in samples])
        scored[name] = {k: list(be.score(samples, topk=k)) for k in (5, 20, 100)}  # the score stage's own path
        be.close()
    exact = divergence.exact_kl(full["p"], full["q"])
    assert exact.mean() > 0.01  # NVFP4 does change the tiny model's distributions
    means = {}
    for k in (5, 20, 100):
        def cat(name, field):
            return np.concatenate([getattr(s, field)[1:] for s in scored[name][k]])
        d = divergence.topk_kl(cat("p", "topk_ids"), cat("p", "topk_logprobs"), cat("q", "topk_ids"),
                               cat("q", "topk_logprobs"), cat("p", "logprob"), cat("q", "logprob"),
                               cat("p", "token_ids"))
        assert np.all(d.kl <= exact + 1e-5), k
        means[k] = d.kl.mean() / exact.mean()
    assert means[5] < means[20] < means[100] <= 1.0
    assert means[20] > 0.8 and means[100] > 0.95  # docs/statistics.md: 71 %, 89 %, 98 % on the demo sets
