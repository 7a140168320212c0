"""
Data: extractive question answering rows, read from disk and checked before training sees them.

A row is one question about one short passage (the "context"). The answer is a span copied out of the
context, or nothing at all when the context does not contain it (SQuAD v2 style "unanswerable" questions;
about a third of PersianQA and a quarter of our bundled sample). After loading, every row looks like

    {"id": "pqs-0001", "title": "...", "context": "...", "question": "...", "answers": ["span", ...]}

with `answers == []` for an unanswerable question. Files come in two shapes (EXPECTED_SHAPE), both accepted: flat
rows (JSONL or a JSON list, as on the Hugging Face Hub) and the nested SQuAD v2 JSON (data -> paragraphs -> qas, with
is_impossible) the PersianQA authors ship. Real data sets carry a few broken rows (an empty question, an answer that
is not in its context): we skip those rather than crash, and say in one printed line how many and why.
"""

import json
import os
import random
from collections import Counter

from windows import first_guess, shrink_to_fit, training_window

# A generative model cannot "point at nothing" the way a span-extraction model does: it must write
# something. For unanswerable questions we train it to write this phrase ("the answer is not in the text"),
# and evaluate.py maps it back to the empty prediction before scoring.
NO_ANSWER = "پاسخ در متن نیست"

EXPECTED_SHAPE = ('expected JSONL or a JSON list of rows like {"id", "title", "context", "question", "answers": '
                  '{"text": [...], "answer_start": [...]}}, '
                  'or SQuAD v2 JSON {"data": [{"title", "paragraphs": [{"context", "qas": [...]}]}]}')


def _flatten_squad(data):
    """Nested SQuAD v2 articles -> flat raw rows (checked later like any other row)."""
    for article in data:
        for paragraph in article.get("paragraphs", []):
            for qa in paragraph.get("qas", []):
                # SQuAD v2 marks unanswerable questions explicitly; trust the flag over the answer list
                answers = [] if qa.get("is_impossible") else qa.get("answers")
                yield {"id": qa.get("id"), "title": article.get("title"), "context": paragraph.get("context"),
                       "question": qa.get("question"), "answers": answers}


def _read_raw(text):
    """File text -> (raw rows, line numbers of JSONL lines that are not valid JSON)."""
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict) and isinstance(whole.get("data"), list):
        whole = whole["data"]  # SQuAD articles, or {"data": [flat rows]} as some exporters write it
        if all(isinstance(article, dict) and "paragraphs" in article for article in whole):
            return list(_flatten_squad(whole)), []
    if isinstance(whole, list):
        return whole, []
    rows, bad_lines = [], []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            bad_lines.append(lineno)
    return rows, bad_lines


def _answer_pairs(answers):
    """Any accepted answers field -> list of (text, answer_start); None if the shape is wrong. Accepted: the Hub's
    {"text": [...], "answer_start": [...]}, SQuAD's list of {"text", "answer_start"}, and a plain list of spans."""
    if isinstance(answers, dict):
        texts, starts = answers.get("text"), answers.get("answer_start")
        parallel = isinstance(texts, list) and isinstance(starts, list) and len(texts) == len(starts)
        return list(zip(texts, starts)) if parallel else None
    if isinstance(answers, list) and all(isinstance(a, dict) for a in answers):
        return [(a.get("text"), a.get("answer_start")) for a in answers]
    if isinstance(answers, list) and all(isinstance(a, str) for a in answers):
        return [(a, None) for a in answers]  # what load_qa_rows returns: rows it wrote to JSONL load again
    return None


def _check_row(raw, index):
    """One raw row -> (clean row, None) or (None, reason it was skipped)."""
    if not isinstance(raw, dict):
        return None, "not a JSON object"
    context, question = raw.get("context"), raw.get("question")
    if not isinstance(context, str) or not context.strip():
        return None, "no context"
    if not isinstance(question, str) or not question.strip():
        return None, "no question"
    pairs = _answer_pairs(raw.get("answers"))
    if pairs is None:
        return None, "bad answers field"
    answers = []
    for text, start in pairs:
        if not isinstance(text, str) or not text.strip():
            return None, "bad answers field"
        # the offset should point at the span; some real files are off by a few characters, so a span
        # that occurs elsewhere in the context is still a valid extractive answer
        at_start = isinstance(start, int) and context[start:start + len(text)] == text
        if not at_start and text not in context:
            return None, "answer not in context"
        answers.append(text.strip())
    row_id = raw.get("id")
    return {
        "id": str(row_id) if row_id not in (None, "") else f"row-{index}",
        "title": raw.get("title") if isinstance(raw.get("title"), str) else "",
        "context": context,
        "question": question.strip(),
        "answers": list(dict.fromkeys(answers)),  # drop repeated gold spans, keep their order
    }, None


def load_qa_rows(path):
    """Read QA rows from `path` (flat JSONL/JSON or nested SQuAD v2 JSON). Returns (rows, n_skipped)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no QA data file at {path!r}: {EXPECTED_SHAPE}. "
                                f"The bundled sample is data/persian_qa_sample.jsonl.")
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        raw_rows, bad_lines = _read_raw(f.read())

    checked = [_check_row(raw, index) for index, raw in enumerate(raw_rows)]  # (row, None) or (None, reason)
    rows = [row for row, _ in checked if row is not None]
    reasons = Counter(reason for row, reason in checked if row is None)
    n_skipped = sum(reasons.values()) + len(bad_lines)
    if n_skipped:
        parts = [f"{n} {reason}" for reason, n in reasons.most_common()]
        if bad_lines:
            shown = ", ".join(str(n) for n in bad_lines[:5]) + (", ..." if len(bad_lines) > 5 else "")
            parts.append(f"{len(bad_lines)} bad JSON on line{'s' if len(bad_lines) > 1 else ''} {shown}")
        print(f"{path}: skipped {n_skipped} of {len(raw_rows) + len(bad_lines)} rows ({', '.join(parts)})")
    if not rows:
        raise ValueError(f"{path}: no usable QA rows; {EXPECTED_SHAPE}")
    return rows, n_skipped


def split_rows(rows, val_fraction, seed):
    """Split rows into (train, val) by CONTEXT: every question about one passage lands on the same side. Splitting
    question by question would put passages the model trained on into validation, and the score would measure memory
    of the passage rather than reading. A seeded shuffle of the distinct contexts: the same input, the same split."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    contexts = list(dict.fromkeys(row["context"] for row in rows))  # distinct, in first-seen order
    n_val = round(val_fraction * len(contexts))
    if val_fraction > 0:
        if len(contexts) < 2:
            raise ValueError(f"cannot split {len(contexts)} distinct context(s) into train and val; "
                             f"add data or use val_fraction=0")
        n_val = min(max(n_val, 1), len(contexts) - 1)  # both sides get at least one passage
    random.Random(seed).shuffle(contexts)
    val_contexts = set(contexts[:n_val])
    train = [row for row in rows if row["context"] not in val_contexts]
    val = [row for row in rows if row["context"] in val_contexts]
    return train, val


# ----------------------------------------------------------------------------------------------------------------
# Rows -> token ids. The prompt is written in the model's own chat template; only the answer carries loss.

# English instructions cost a third of the tokens Persian ones do in English-centred vocabularies (SmolLM2's).
SYSTEM_PROMPT = f"Answer with a short span copied from the text. If the text does not contain the answer, reply: {NO_ANSWER}"


def qa_messages(context, question):
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"متن: {context}\n\nپرسش: {question}"}]  # "Text: ...  Question: ..."


def prompt_frame(tok, question):
    """Tokens of a prompt around its passage: the chat template, the system prompt and the question."""
    return len(tok.encode_chat(qa_messages("", question)))


def passage_tokens(tok, question, frame):
    """piece -> the tokens it takes as the passage of a prompt with this question (frame: prompt_frame's), which is
    what windows.py: shrink_to_fit measures a window by."""
    return lambda piece: len(tok.encode_chat(qa_messages(piece, question))) - frame


def completion_text(tok, messages, answer):
    """What the template writes after the prompt for this answer: e.g. 'answer<|im_end|>\\n' in ChatML."""
    prompt = tok.render_chat(messages, add_generation_prompt=True)
    full = tok.render_chat(messages + [{"role": "assistant", "content": answer}], add_generation_prompt=False)
    if not full.startswith(prompt):
        raise ValueError("this chat template does not extend the prompt with the answer; cannot mask the loss")
    return full[len(prompt):]


def _encode(tok, row, passage):
    """The row's question about `passage` (its context, or a window of it) -> (prompt ids, answer ids)."""
    messages = qa_messages(passage, row["question"])
    answer = row["answers"][0] if row["answers"] else NO_ANSWER
    return tok.encode_chat(messages), tok.encode(completion_text(tok, messages, answer))


# A window shorter than this is no longer a reading exercise: fit_passage drops rows that cannot have it.
MIN_PASSAGE_TOKENS = 32


def fit_passage(tok, row, max_len, seed=0):
    """The passage text to train on so that prompt + answer fit in max_len + 1 tokens (inputs and targets are the
    same sequence shifted by one). Returns (text, how, need): how is "whole" (the passage fits as it is), "windowed"
    (a window of it fits, and holds the gold span) or "dropped" (text None: not even MIN_PASSAGE_TOKENS of passage,
    or the span, fit beside question and answer); need is the fewest tokens this row can be trained in.
    Cutting a long passage from its end, as a plain truncation would, can cut the answer away while it stays the
    target: the model would then learn to write answers that are not in what it reads, i.e. to invent them.
    """
    context, question = row["context"], row["question"]
    prompt, completion = _encode(tok, row, context)
    if len(prompt) + len(completion) <= max_len + 1:
        return context, "whole", None
    frame, n_answer = prompt_frame(tok, question), len(completion)
    answer = row["answers"][0] if row["answers"] else NO_ANSWER
    start = context.find(answer)
    span = (start, start + len(answer)) if row["answers"] else None  # unanswerable: the window may go anywhere
    need_passage = max(MIN_PASSAGE_TOKENS, len(tok.encode(answer)) if span else 0)
    need = frame + need_passage + n_answer - 1
    if max_len < need:
        return None, "dropped", need
    budget = max_len + 1 - frame - n_answer  # tokens the passage may take, at least need_passage
    rng = random.Random(f"{seed}:{row['id']}")  # each row its own window, the same in every run
    window = shrink_to_fit(passage_tokens(tok, question, frame), budget, first_guess(tok, context, budget),
                           lambda n: training_window(context, n, rng, span), tries=8)
    return (None, "dropped", need) if window is None else (window, "windowed", need)


def encode_example(tok, row, max_len, seed=0):
    """One row -> (prompt ids, answer ids), together at most max_len + 1 tokens; None if it cannot fit."""
    text, _, _ = fit_passage(tok, row, max_len, seed)
    return None if text is None else _encode(tok, row, text)


def encode_rows(tok, rows, max_len, seed=0, name="examples"):
    """Encode every row, windowing long passages (fit_passage), and say in one line what was windowed or dropped.
    Raises ValueError when rows were given but none fits, naming the length the shortest one needs."""
    fitted = [fit_passage(tok, row, max_len, seed) for row in rows]            # (text, how, need) per row
    out = [_encode(tok, row, text) for row, (text, _, _) in zip(rows, fitted) if text is not None]
    if rows and not out:
        need = min(need for _, _, need in fitted)                                  # every row was dropped
        raise ValueError(f"no {name} fit max_seq_len={max_len}: the shortest needs {need} tokens (chat "
                         f"template, question, answer and at least {MIN_PASSAGE_TOKENS} tokens of passage); "
                         f"raise max_seq_len to at least {need}")
    counts = Counter(how for _, how, _ in fitted)
    if counts["windowed"] or counts["dropped"]:
        print(f"{name}: {len(rows)} rows, {counts['whole']} whole, {counts['windowed']} with the passage windowed to fit "
              f"max_seq_len={max_len} (the answer kept in), {counts['dropped']} dropped (too long even so)")
    return out


def make_batches(examples, batch_size, seed, epoch, drop_last=False):
    """Index batches for one epoch. Sequences of similar length go together so little compute is spent on padding:
    shuffle, cut into chunks of 50 batches, sort each chunk by length, slice into batches, shuffle the batches.
    Seeded by (seed, epoch): a resumed run rebuilds exactly the same order. drop_last: leave out the one shorter batch
    (torchrun gives each process a slice of every batch, and a short one could leave a process with nothing)."""
    rng = random.Random(seed * 1000 + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    chunk = 50 * batch_size
    batches = []
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: len(examples[i][0]) + len(examples[i][1]))
        batches += [part[b:b + batch_size] for b in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    if drop_last:  # after the shuffle, so the full batches keep the order they have without drop_last
        batches = [b for b in batches if len(b) == batch_size]
    return batches


def collate(examples, indices, pad_id):
    """-> idx (B, T), targets (B, T). targets[t] is the token after idx[t]; -100 on the prompt and padding."""
    import torch
    seqs = [examples[i][0] + examples[i][1] for i in indices]
    T = max(len(s) for s in seqs) - 1
    idx = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), T), -100, dtype=torch.long)
    for b, i in enumerate(indices):
        s, n_prompt = seqs[b], len(examples[i][0])
        idx[b, :len(s) - 1] = torch.tensor(s[:-1])
        # position t predicts s[t+1]; the first answer token is predicted at the prompt's last position
        targets[b, n_prompt - 1:len(s) - 1] = torch.tensor(s[n_prompt:])
    return idx, targets
