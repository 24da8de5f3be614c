"""Scoring document-level sets in rolling windows: windows out to the backend, one sequence per document back.

Each document (prefix token + its tokens, ``sampling.documents``) is cut into windows
(``sampling.rolling_windows``); the backend scores the windows as ordinary samples; the rows each window
*scores* are put back at their places in the document, so the archive holds one whole sequence per
document (sample_id = the document's index) and every later stage reads it like any other set.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from jobs.texts.sampling import Sample, rolling_windows
from jobs.engines.base import SequenceScores

_FIELDS = ("logprob", "rank", "top1_id", "top1_logprob", "topk_ids", "topk_logprobs")


def score_documents(engine, docs: Sequence[Sample], topk: int, window: int,
                    stride: int | None) -> Iterator[SequenceScores]:
    """Yield one SequenceScores per document, in order, from the backend's scores of its windows."""
    plan = []  # (doc index, start, first_scored)
    samples = []
    for d, doc in enumerate(docs):
        for start, end, first in rolling_windows(len(doc.token_ids), window, stride):
            plan.append((d, start, first))
            samples.append(Sample(doc.sample_id, doc.token_ids[start:end], False))
    pending: list[tuple[int, int, SequenceScores]] = []
    current = 0
    for (d, start, first), scores in zip(plan, engine.score(samples, topk=topk)):
        if d != current:
            yield stitch(docs[current], pending)
            pending, current = [], d
        pending.append((start, first, scores))
    if pending:
        yield stitch(docs[current], pending)


def stitch(doc: Sample, parts: list[tuple[int, int, SequenceScores]]) -> SequenceScores:
    """One document's sequence from its windows' scores: position p takes the row of the window scoring it."""
    n = len(doc.token_ids)
    first = parts[0][2]
    out = {}
    for name in _FIELDS:
        sample = getattr(first, name)
        if sample is None:
            out[name] = None
            continue
        fill = -1 if np.issubdtype(sample.dtype, np.integer) else np.nan
        out[name] = np.full((n,) + sample.shape[1:], fill, dtype=sample.dtype)
    covered = np.zeros(n, dtype=bool)
    for start, first_scored, s in parts:
        lo, hi = start + first_scored, start + len(s.token_ids)
        if not np.array_equal(s.token_ids, np.asarray(doc.token_ids[start:hi])):
            raise ValueError(f"document {doc.sample_id}: a window's tokens do not match the document at {start}")
        for name in _FIELDS:
            if out[name] is not None:
                out[name][lo:hi] = getattr(s, name)[first_scored:]
        covered[lo:hi] = True
    if not covered[1:].all():
        raise ValueError(f"document {doc.sample_id}: positions not scored by any window")
    return SequenceScores(doc.sample_id, np.asarray(doc.token_ids, dtype=np.int32), **out)
