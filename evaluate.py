"""
Evaluation: how extractive question answering is scored, SQuAD v2 style, with Persian normalisation; and, at the
end, the two measurements train.py takes of a model: validation loss and generated answers.

Two numbers per question, both after normalising prediction and gold answers the same way:
  exact match (EM)  1 if the prediction equals a gold answer, else 0
  F1                overlap of the two bags of words: precision = shared / predicted words,
                    recall = shared / gold words, F1 = 2PR / (P + R)
With several gold answers a question takes the best score over them. An unanswerable question (no gold
answers) scores 1 on both only if the prediction is empty: saying nothing is the right answer there.
Averaged over a data set and written as percentages, these are the numbers papers report for PersianQA
(e.g. XLM-RoBERTa-large F1 84.8 / EM 70.4).

Persian text has many ways to write the same word: Arabic or Persian forms of ye and kaf, optional hamza
and short-vowel marks, Persian, Arabic-Indic or Latin digits, and the zero-width non-joiner (ZWNJ, U+200C)
inside words like «کتاب‌ها». Without normalisation a correct answer written differently would score 0,
so normalize_answer folds all of these to one form before comparing.
"""

import string
import unicodedata
from collections import Counter

import torch

import data
from model import left_pad

# One form per letter. Arabic ye/alef maksura and kaf become the Persian letters; teh marbuta and
# heh-with-hamza become plain heh (the hamza of the Persian ezafe, «خانهٔ», is optional in writing).
# Hamza on or under alef (أ إ) and alef wasla (ٱ) become plain alef, because Persian writes «تأثیر» and
# «تاثیر» both. Alef madda (آ) is kept: in Persian it is a letter of its own (آب vs اب), not a variant.
# Persian and Arabic-Indic digits become ASCII digits. The ZWNJ becomes a space, as the PersianQA
# authors score, so «کتاب‌ها» and «کتاب ها» are the same two words.
_FOLD = str.maketrans(
    {"ي": "ی", "ى": "ی", "ك": "ک", "ة": "ه", "ۀ": "ه", "أ": "ا", "إ": "ا", "ٱ": "ا", "\u200c": " "}
    | {chr(0x06F0 + d): str(d) for d in range(10)}  # ۰..۹
    | {chr(0x0660 + d): str(d) for d in range(10)}  # ٠..٩
)

# Marks that change pronunciation but not the word: harakat, tanwin, shadda, sukun, hamza and madda
# above/below (U+064B..U+065F), superscript alef (U+0670), and the tatweel stretching letter (U+0640).
_MARKS = {chr(c) for c in range(0x064B, 0x0660)} | {"\u0670", "\u0640"}

# Short paraphrases of NO_ANSWER a model might write instead of the exact phrase ("there is no answer in
# the text", "the answer does not exist in the text", ...). Compared after normalisation.
_NO_ANSWER_PHRASES = (data.NO_ANSWER, "پاسخی در متن نیست", "جواب در متن نیست", "پاسخ در متن وجود ندارد",
                      "پاسخی در متن وجود ندارد", "جوابی در متن نیست")


def normalize_answer(s):
    """Fold spelling variants, drop marks and punctuation, lower-case Latin, collapse whitespace."""
    # NFKC turns Arabic presentation forms (from PDFs and old fonts) and full-width Latin into plain letters
    s = unicodedata.normalize("NFKC", s).translate(_FOLD)
    chars = []
    for ch in s:
        category = unicodedata.category(ch)
        if ch in _MARKS or category == "Cf":  # Cf: invisible format marks (ZWJ, LRM/RLM, BOM)
            continue
        # punctuation becomes a space, not nothing: Persian often writes «تهران،اصفهان» with no space after
        if ch in string.punctuation or category.startswith("P"):  # ، ؛ ؟ « » ٫ ... and ASCII
            ch = " "
        chars.append(ch)
    # No article stripping (SQuAD drops English a/an/the): Persian has no articles to drop.
    return " ".join("".join(chars).lower().split())


def _gold_forms(golds):
    """Normalised gold answers; [""] for a question with no answer (SQuAD v2 convention)."""
    if isinstance(golds, str):
        raise TypeError(f"golds must be a list of answer strings (e.g. ['تهران'], or [] when the context has "
                        f"no answer), got the string {golds!r}")
    forms = [normalize_answer(g) for g in golds]
    return [f for f in forms if f] or [""]


def exact_match(pred, golds):
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    p = normalize_answer(pred)
    return float(any(p == g for g in _gold_forms(golds)))


def _f1_one(pred_tokens, gold_tokens):
    if not pred_tokens or not gold_tokens:
        # an empty side (no-answer question, or empty prediction) only matches another empty side
        return float(pred_tokens == gold_tokens)
    shared = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if shared == 0:
        return 0.0
    precision = shared / len(pred_tokens)
    recall = shared / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(pred, golds):
    """Word-level F1 between the normalised prediction and the best-matching gold answer (0.0 to 1.0)."""
    pred_tokens = normalize_answer(pred).split()
    return max(_f1_one(pred_tokens, g.split()) for g in _gold_forms(golds))


def answer_from_generation(text):
    """The model's generated text -> a prediction to score ("" means "no answer").

    Answers are short spans, so only the first non-empty line counts (a model that does not stop cleanly
    may run on into a new question). NO_ANSWER, or a close paraphrase of it, becomes "".
    """
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    answer = lines[0] if lines else ""
    norm = normalize_answer(answer)
    for phrase in _NO_ANSWER_PHRASES:
        p = normalize_answer(phrase)
        if norm == p or norm.startswith(p + " "):  # "پاسخ در متن نیست." or "... نیست زیرا ..."
            return ""
    return answer


def score(predictions, golds):
    """Corpus scores in percent: EM and F1 over all questions, F1 over answerable ones, and the share of
    unanswerable ones answered with "". A subset that is empty gets nan."""
    if len(predictions) != len(golds):
        raise ValueError(f"got {len(predictions)} predictions for {len(golds)} questions; pass one each")
    if not predictions:
        raise ValueError("nothing to score: predictions and golds are empty")
    em = [exact_match(p, g) for p, g in zip(predictions, golds)]
    f1 = [f1_score(p, g) for p, g in zip(predictions, golds)]
    has_answer = [_gold_forms(g) != [""] for g in golds]

    def percent(values):
        return 100.0 * sum(values) / len(values) if values else float("nan")

    return {
        "exact_match": percent(em),
        "f1": percent(f1),
        "n": len(predictions),
        "has_answer_f1": percent([s for s, has in zip(f1, has_answer) if has]),
        "no_answer_accuracy": percent([s for s, has in zip(em, has_answer) if not has]),
    }


# ----------------------------------------------------------------------------------------------------------------
# Scoring a model during training (train.py): the loss on held-out answers, and answers it writes itself.

@torch.no_grad()
def val_loss(model, examples, cfg, pad_id, ctx):
    """Mean loss per answer token over the whole validation set."""
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(examples), cfg["batch_size"]):
        idx, targets = data.collate(examples, list(range(b, min(b + cfg["batch_size"], len(examples)))), pad_id)
        n = int((targets != -100).sum())
        with ctx:
            _, loss = model(idx.to(cfg["device"]), targets.to(cfg["device"]))
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / max(count, 1)


@torch.no_grad()
def answer_questions(model, tok, rows, cfg, ctx):
    """Greedy answers to validation questions, scored with score() above.

    Questions go eval_batch_size at a time: generating one token reads every weight once whatever the batch, so a
    batch of prompts (left-padded to end together, model.py: left_pad) costs little more than one. Sorting by
    length first keeps the padding short."""
    model.eval()
    prompts = [tok.encode_chat(data.qa_messages(r["context"], r["question"]))[-(model.args.max_seq_len - cfg["max_new_tokens"]):]
               for r in rows]
    order = sorted(range(len(rows)), key=lambda i: len(prompts[i]))
    answers, size = {}, cfg["eval_batch_size"] or cfg["batch_size"]
    for b in range(0, len(order), size):
        chunk = order[b:b + size]
        idx, n_pad = left_pad([prompts[i] for i in chunk], pad_id=0)  # any id: padding keys are masked
        outs, done = [[] for _ in chunk], [False] * len(chunk)
        with ctx:
            for nxt in model.generate(idx.to(cfg["device"]), cfg["max_new_tokens"], temperature=0, n_pad=n_pad):
                for j, t in enumerate(nxt[:, 0].tolist()):  # each row stops at its own end-of-turn token
                    done[j] = done[j] or t in tok.stop_ids
                    if not done[j]:
                        outs[j].append(t)
                if all(done):
                    break
        answers.update({i: tok.decode(o) for i, o in zip(chunk, outs)})
    preds = [answer_from_generation(answers[i]) for i in range(len(rows))]
    model.train()
    return score(preds, [r["answers"] for r in rows]), preds
