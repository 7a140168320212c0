"""
Cut the bundled real-length passages into short ones, for the CPU quickstart.

    python data/cut_short.py        # rewrites the three persian_qa_short_*.jsonl files, the same bytes every time

A 135M model cannot read a 1,000-character Persian passage (about 1,100 tokens; lesson 15), but it can learn to
read 250 characters in minutes. So the quickstart trains, chooses its no-answer threshold and is tested on short
passages of the same kind, each file from passages the others never show:

  persian_qa_short_train.jsonl  from 55 passages of persian_qa_long.jsonl: every question in the piece that holds
                                its answer, each unanswerable question in one piece of its passage, and one more row
                                per answerable question, in a piece of the same passage that does NOT hold the answer,
                                labelled unanswerable: on-topic questions the piece cannot answer, as PersianQA's are.
  persian_qa_short_val.jsonl    from the other 10 passages of persian_qa_long.jsonl, labelled as they are (no extra
                                rows): chooses the threshold.
  persian_qa_short_test.jsonl   from the 20 passages of persian_qa_heldout.jsonl, labelled as they are: the test.

A passage is cut at sentence ends into pieces of at most MAX_CHARS characters (one sentence per piece if a sentence
is longer). An unanswerable question goes to a piece chosen by a seeded draw among the pieces that already hold a
question, so the questions of one piece can share its prompt prefix at evaluation (evaluate.py).
"""

import os
import random
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import data  # noqa: E402
from convert import write_jsonl  # noqa: E402

MAX_CHARS = 260
N_VAL_PASSAGES = 10
SEED = 20


def pieces(context):
    """The passage as consecutive pieces of whole sentences, each at most MAX_CHARS long: [(start, end), ...]."""
    bounds = [0] + [m.end() for m in re.finditer(r"[.!?؟]\s+", context)] + [len(context)]
    bounds = sorted(set(bounds))
    out, start = [], 0
    for i in range(1, len(bounds)):
        # close the piece before this sentence would push it past MAX_CHARS
        if bounds[i] - start > MAX_CHARS and bounds[i - 1] > start:
            out.append((start, bounds[i - 1]))
            start = bounds[i - 1]
    out.append((start, len(context)))
    return out


def piece_of(spans, a, b):
    """Index of the piece holding context[a:b] whole, or None."""
    return next((k for k, (s, e) in enumerate(spans) if s <= a and b <= e), None)


def cut(rows, rng, negatives):
    """Rows on long passages -> rows on their pieces (answers keep their offsets, moved to the piece)."""
    by_passage = {}
    for r in rows:
        by_passage.setdefault(r["context"], []).append(r)
    out = []
    for context, qs in by_passage.items():
        spans = pieces(context)

        def row(q, k, answers, suffix=""):
            s, e = spans[k]
            text = context[s:e]
            strip = len(text) - len(text.lstrip())
            text = text.strip()
            return {"id": q["id"] + suffix, "title": q["title"], "context": text, "question": q["question"],
                    "answers": {"text": [t for t, _ in answers], "answer_start": [a - s - strip for _, a in answers]}}

        placed, unanswerable = [], []
        for q in qs:
            if not q["answers"]:
                unanswerable.append(q)
                continue
            text = q["answers"][0]
            a = q["context"].find(text)
            k = piece_of(spans, a, a + len(text))
            if k is None:  # an answer across a sentence end: no piece holds it, leave the question out
                print(f"{q['id']}: answer crosses a piece boundary, skipped", file=sys.stderr)
                continue
            placed.append((q, k, [(text, a)]))
        used = sorted({k for _, k, _ in placed}) or list(range(len(spans)))
        for q in unanswerable:
            placed.append((q, rng.choice(used), []))
        placed.sort(key=lambda p: (p[1], p[0]["id"]))  # piece order, so each piece's questions sit together
        out += [row(q, k, ans) for q, k, ans in placed]
        if negatives:
            for q, k, ans in placed:
                if not ans:
                    continue
                others = [j for j in range(len(spans)) if j != k
                          and ans[0][0] not in context[spans[j][0]:spans[j][1]]]
                if others:
                    out.append(row(q, rng.choice(others), [], suffix="-elsewhere"))
    return out


def write(rows, name):
    write_jsonl(os.path.join(HERE, name), rows)
    n_na = sum(1 for r in rows if not r["answers"]["text"])
    sizes = sorted(len(c) for c in {r["context"] for r in rows})
    print(f"{name}: {len(rows)} questions on {len(sizes)} pieces ({sizes[0]} to {sizes[-1]} characters, median "
          f"{sizes[len(sizes) // 2]}), {n_na} ({100 * n_na / len(rows):.0f}%) unanswerable")


def main():
    rng = random.Random(SEED)
    long_rows, _ = data.load_qa_rows(os.path.join(HERE, "persian_qa_long.jsonl"))
    heldout, _ = data.load_qa_rows(os.path.join(HERE, "persian_qa_heldout.jsonl"))
    passages = list(dict.fromkeys(r["context"] for r in long_rows))
    val_passages = set(random.Random(SEED).sample(passages, N_VAL_PASSAGES))
    train = cut([r for r in long_rows if r["context"] not in val_passages], rng, negatives=True)
    write([r for r in train if not r["id"].endswith("-elsewhere")], "persian_qa_short_train.jsonl")
    write([r for r in train if r["id"].endswith("-elsewhere")], "persian_qa_short_elsewhere.jsonl")
    write(cut([r for r in long_rows if r["context"] in val_passages], rng, negatives=False),
          "persian_qa_short_val.jsonl")
    write(cut(heldout, rng, negatives=False), "persian_qa_short_test.jsonl")


if __name__ == "__main__":
    main()
