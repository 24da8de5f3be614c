#!/usr/bin/env python3
"""Generate qscore's bundled lm-evaluation-harness tasks: small, original, offline.

Written for this project, like the rest of ``data/``: the sentences come from the same made-up world
as ``wiki_mini.txt`` (``../make_text.py``'s templates, its evaluation half of every vocabulary, a
seed of their own), the word problems from templates below. Nothing is copied from any benchmark.

* ``arith_mini.jsonl``: arithmetic word problems with whole-number answers (``qscore_arith``,
  generate_until, exact match on the first number of the answer), 60 test + 10 few-shot rows.
* ``cloze_mini.jsonl``: the first half of a sentence and four candidate second halves — its own, its
  own with one word replaced by a word from another sentence, and the second halves of two other
  sentences that start with the same word where there are such (``qscore_cloze``, multiple choice by
  loglikelihood), 60 test + 10 few-shot rows. A model that has learnt the style of the bundled text
  (the demo's tiny model, trained on ``train_mini.txt``) beats chance (0.25) clearly but is often
  unsure between close options, so a quantized copy's small changes to loglikelihoods change some
  answers and its recovery has an interval worth reading.

Deterministic (fixed seeds, standard library only): ``python data/tasks/make_tasks.py --check``
fails if the committed files differ from a fresh build. No sentence of ``cloze_mini.jsonl`` appears
in ``train_mini.txt``.
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import make_text as mt  # noqa: E402  (the bundled text's generator, one directory up)

SEEDS = {"arith": 5505, "cloze": 6606}
N_TEST, N_TRAIN = 60, 10
THINGS = ["apples", "stamps", "marbles", "books", "eggs", "pencils", "shells", "coins", "buttons", "cards"]


def problem(g: mt.Gen) -> tuple[str, int]:
    name, female = g.person()
    first, he = name.split()[0], ("she" if female else "he")
    thing = g.pick(THINGS)
    kind = g.r.randrange(6)
    if kind == 0:
        a, b = g.r.randint(2, 9), g.r.randint(2, 9)
        return f"{first} has {a} boxes with {b} {thing} in each. How many {thing} does {he} have?", a * b
    if kind == 1:
        a = g.r.randint(10, 60)
        b = g.r.randint(1, a - 1)
        return f"{first} had {a} {thing} and gave {b} of them away. How many {thing} are left?", a - b
    if kind == 2:
        a, b = g.r.randint(10, 90), g.r.randint(2, 40)
        return (f"A train leaves {g.town()} with {a} passengers. At {g.town()}, {b} more get on. "
                "How many passengers are on the train now?", a + b)
    if kind == 3:
        km = g.r.randint(2, 90)
        return f"How many metres is {km} kilometres?", km * 1000
    if kind == 4:
        a, b = g.r.randint(5, 40), g.r.randint(2, 9)
        return f"{first} reads {a} pages a day. How many pages does {he} read in {b} days?", a * b
    a, b = g.r.randint(2, 30), g.r.randint(2, 12)
    return f"A shop in {g.town()} sells pencils for {a} pence each. How many pence do {b} pencils cost?", a * b


def arith_rows() -> list[dict]:
    g = mt.Gen(SEEDS["arith"], "eval")
    rows, seen = [], {}
    while len(rows) < N_TEST + N_TRAIN:
        q, a = problem(g)
        if q not in seen:
            seen[q] = None
            rows.append({"split": "test" if len(rows) < N_TEST else "train", "question": q, "answer": str(a)})
    return rows


def sentences(g: mt.Gen, n: int, avoid: str) -> list[str]:
    out, seen = [], {}
    while len(out) < n:
        _, para = g.pick(mt.WIKI_KINDS)(g, 60, 160)
        for s in re.split(r"(?<=\.)\s+(?=[A-Z])", para):
            if 10 <= len(s.split()) <= 30 and s not in avoid and s not in seen:
                seen[s] = None
                out.append(s)
    return out[:n]


def halves(sentence: str) -> tuple[str, list[str]]:
    words = sentence.split()
    k = len(words) // 2
    return " ".join(words[:k]), words[k:]


def cloze_rows() -> list[dict]:
    g = mt.Gen(SEEDS["cloze"], "eval")
    n = N_TEST + N_TRAIN
    sents = sentences(g, 6 * n, (HERE.parent / "train_mini.txt").read_text(encoding="utf-8"))
    items = sents[:n]
    others = list(dict.fromkeys(" ".join(halves(p)[1]) for p in sents[n:]))
    words = [w for o in others for w in o.split()]
    rows = []
    for i, s in enumerate(items):
        context, rest = halves(s)
        gold = " ".join(rest)
        options = [gold]
        while len(options) < 2:  # one word swapped: the closest distractor
            edited = list(rest)
            edited[g.r.randrange(len(edited))] = g.pick(words)
            if " ".join(edited) != gold:
                options.append(" ".join(edited))
        same_start = [o for o in others if o.split()[0] == rest[0] and o not in options]
        g.r.shuffle(same_start)
        options += same_start[:2]
        while len(options) < 4:
            other = g.pick(others)
            if other not in options:
                options.append(other)
        g.r.shuffle(options)
        rows.append({"split": "test" if i < N_TEST else "train", "context": context, "choices": options,
                     "label": options.index(gold)})
    return rows


def build() -> dict[str, str]:
    def jsonl(rows):
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    return {"arith_mini.jsonl": jsonl(arith_rows()), "cloze_mini.jsonl": jsonl(cloze_rows())}


def main(argv=None) -> int:
    return mt.write_or_check(build(), here=HERE, description=__doc__.splitlines()[0], argv=argv)


if __name__ == "__main__":
    sys.exit(main())
