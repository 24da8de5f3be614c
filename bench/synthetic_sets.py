"""Evaluation and calibration sets of the reference run's sizes, from the bundled text (no hub needed).

    python bench/synthetic_sets.py --tokenizer models/tiny-qwen3 --out /tmp/sets

Writes, measured in the given tokenizer's tokens:
  wikitext2.txt    200 lines, as `N_WIKITEXT=200` keeps: 132 of them long enough to score, 23,922 tokens
                   in all (the reference run's WikiText-2 figures), the rest under 16 tokens (dropped)
  ultrachat.jsonl  200 chats, 228,323 tokens in all as scored (`role: content` lines), none over 2,040
  calib.jsonl      1,024 chats of 2,100+ tokens through the chat template: every sample is cut to
                   2,048, the reference calibration volume (1024 x 2048) at its largest
The words come from data/train_mini.txt; only sizes matter for timings.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--calibration", type=int, default=1024)
    a = ap.parse_args()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.tokenizer)
    words = (ROOT / "data" / "train_mini.txt").read_text().split()
    per_word = len(tok(" ".join(words[:5000]))["input_ids"]) / 5000
    rng = random.Random(0)

    def text(n_tokens: int) -> str:
        start = rng.randrange(0, len(words) - 10)
        n = max(1, int(n_tokens / per_word))
        chunk = (words[start:] + words)[:n]
        while len(tok(" ".join(chunk))["input_ids"]) > n_tokens and len(chunk) > 1:
            chunk = chunk[: int(len(chunk) * 0.97)]
        return " ".join(chunk)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    long_lengths = [rng.randint(40, 330) for _ in range(132)]
    scale = 23922 / sum(long_lengths)
    lines = [text(max(17, int(n * scale))) for n in long_lengths] + [text(rng.randint(2, 12)) for _ in range(68)]
    rng.shuffle(lines)
    (out / "wikitext2.txt").write_text("\n".join(lines) + "\n")
    chat_lengths = [rng.randint(300, 2040) for _ in range(200)]
    scale = 228323 / sum(chat_lengths)
    with open(out / "ultrachat.jsonl", "w") as fh:
        for n in chat_lengths:
            n = min(2040, int(n * scale))
            fh.write(json.dumps({"messages": [{"role": "user", "content": text(n // 4)},
                                              {"role": "assistant", "content": text(n - n // 4 - 8)}]}) + "\n")
    with open(out / "calib.jsonl", "w") as fh:
        for _ in range(a.calibration):
            fh.write(json.dumps({"messages": [{"role": "user", "content": text(600)},
                                              {"role": "assistant", "content": text(1500)}]}) + "\n")
    print(f"wrote {out}: {sum(len(tok(x)['input_ids']) for x in lines)} wiki tokens", flush=True)


if __name__ == "__main__":
    main()
