"""
Evaluation: how extractive question answering is scored, SQuAD v2 style, with Persian normalisation, and how often
a model invents its answer; at the end, `python evaluate.py` scores a model on a QA file (answer.py reads it).

Two numbers per question, both after normalising prediction and gold answers the same way:
  exact match (EM)  1 if the prediction equals a gold answer, else 0
  F1                overlap of the two bags of words: precision = shared / predicted words,
                    recall = shared / gold words, F1 = 2PR / (P + R)
With several gold answers a question takes the best score over them. An unanswerable question (no gold
answers) scores 1 on both only if the prediction is empty: saying nothing is the right answer there.
Averaged over a data set and written as percentages, these are the numbers papers report for PersianQA
(e.g. XLM-RoBERTa-large F1 84.8 / EM 70.4). Persian writes one word in many ways (Arabic or Persian letter forms,
optional marks, three sets of digits, the zero-width non-joiner inside words like «کتاب‌ها»), so normalize_answer
folds them to one form first: a correct answer written differently would otherwise score 0.
"""

import os
import string
import sys
import time
import unicodedata
from collections import Counter

import torch

# -- settings of the command at the bottom (defaults; override with --key=value, see configurator.py) -------------
init_from = ""               # checkpoint folder; "" -> the adapter's base model, else the bundled SmolLM2
adapter = ""                 # a LoRA adapter folder (a train.py out_dir), or "" for the model alone
test_data = "data/persian_qa_heldout.jsonl"  # the QA file to score
test_limit = 0               # score only the first N questions (0: all)
out_dir = ""                 # where predictions.jsonl and metrics.json go; "" -> eval/<adapter or model name>
quantize = "none"            # "nf4": a 4-bit base, as QLoRA trains it
max_seq_len = 0              # longest prompt; longer passages are read in windows. 0 -> what the adapter was
                             # trained with (its config.json), else 1024
max_new_tokens = 48
batch_size = 8               # prompts read at once
null_threshold = ""          # abstain when log p(no answer) - log p(answer) is above it; "" -> the one train.py
                             # chose on validation data (the adapter's metrics.json), else 0
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "auto"               # bfloat16 where this device computes it natively, else float32
# -------------------------------------------------------------------------------------------------------------------
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}

import data  # noqa: E402
from answer import answer_questions, first_line  # noqa: E402

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


_NO_ANSWER_FORMS = tuple(normalize_answer(p) for p in _NO_ANSWER_PHRASES)


def _says_no_answer(p):
    """p: a normalised prediction. Is it the no-answer phrase written out ("... نیست." or "... نیست زیرا ...")?"""
    return any(p == n or p.startswith(n + " ") for n in _NO_ANSWER_FORMS)


def _prediction_form(pred):
    """A prediction as it is scored: normalised, and "" where it says in words that the text has no answer (a
    reading's answer is its first line as written, answer.py: first_line)."""
    p = normalize_answer(pred)
    return "" if _says_no_answer(p) else p


def _gold_forms(golds):
    """Normalised gold answers; [""] for a question with no answer (SQuAD v2 convention)."""
    if isinstance(golds, str):
        raise TypeError(f"golds must be a list of answer strings (e.g. ['تهران'], or [] when the context has "
                        f"no answer), got the string {golds!r}")
    forms = [normalize_answer(g) for g in golds]
    return [f for f in forms if f] or [""]


def exact_match(pred, golds):
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    p = _prediction_form(pred)
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
    pred_tokens = _prediction_form(pred).split()
    return max(_f1_one(pred_tokens, g.split()) for g in _gold_forms(golds))


def answer_from_generation(text):
    """The model's generated text -> a prediction to score ("" means "no answer"): its first non-empty line
    (answer.py: first_line), and "" where that line is the no-answer phrase or a close paraphrase of it."""
    answer = first_line(text)
    return "" if _says_no_answer(normalize_answer(answer)) else answer


def found_in_passage(pred, context):
    """Does the normalised prediction occur in the normalised passage, as whole words? An extractive answer always
    does; a non-empty answer that does not was made up (what the notes call a hallucination)."""
    p = _prediction_form(pred)
    return bool(p) and f" {p} " in f" {normalize_answer(context)} "


def score(predictions, golds, contexts=None):
    """Corpus scores in percent: EM and F1 over all questions, F1 over answerable ones, and the share of
    unanswerable ones answered with "". With the passages (contexts), also the invented-answer rate: the share of
    non-empty predictions that are not found in their passage. A subset that is empty gets nan."""
    if len(predictions) != len(golds):
        raise ValueError(f"got {len(predictions)} predictions for {len(golds)} questions; pass one each")
    if not predictions:
        raise ValueError("nothing to score: predictions and golds are empty")
    em = [exact_match(p, g) for p, g in zip(predictions, golds)]
    f1 = [f1_score(p, g) for p, g in zip(predictions, golds)]
    has_answer = [_gold_forms(g) != [""] for g in golds]

    def percent(values):
        return 100.0 * sum(values) / len(values) if values else float("nan")

    out = {
        "exact_match": percent(em),
        "f1": percent(f1),
        "n": len(predictions),
        "has_answer_f1": percent([s for s, has in zip(f1, has_answer) if has]),
        "no_answer_accuracy": percent([s for s, has in zip(em, has_answer) if not has]),
    }
    if contexts is not None:
        answered = [(p, c) for p, c in zip(predictions, contexts) if _prediction_form(p)]
        out["answered"] = len(answered)
        out["invented"] = percent([not found_in_passage(p, c) for p, c in answered])
    return out


def summary(s):
    """One line of the numbers that matter, for the end of a run."""
    line = (f"EM {s['exact_match']:.1f}  F1 {s['f1']:.1f}  has-answer F1 {s['has_answer_f1']:.1f}  "
            f"no-answer accuracy {s['no_answer_accuracy']:.1f}")
    if "invented" in s:
        line += f"  answered {s['answered']}/{s['n']}"
        line += f", invented {s['invented']:.1f}%" if s["answered"] else " (so none invented)"
    return line


# ----------------------------------------------------------------------------------------------------------------
# The command:
#   python evaluate.py --adapter=out/quickstart --test_data=data/persian_qa_heldout.jsonl [--test_limit=N]
# scores a base model, a base + adapter, or a merged model on a QA file, and writes every prediction down
# (in out_dir). Reading and abstaining are answer.py's (answer_questions).

def main(argv=None):
    from configurator import configure
    from memory import check_device, resolve_dtype
    from checkpoint import load_model
    from convert import write_json, write_jsonl
    from stream import read_config
    from tokenizer import Tokenizer

    cfg = configure(settings, argv)
    check_device(cfg["device"])
    adapter = cfg["adapter"]  # train.py wrote beside it how it was trained and the threshold it chose on validation
    trained = read_config(adapter) if adapter else {}
    chosen = read_config(adapter, "metrics.json") if adapter else {}
    threshold = cfg["null_threshold"] if cfg["null_threshold"] != "" else chosen.get("null_threshold") or 0.0
    if not isinstance(threshold, (int, float)):
        sys.exit(f"error: null_threshold must be a number, got {threshold!r}")
    max_len = cfg["max_seq_len"] or trained.get("max_seq_len") or 1024
    try:
        rows, _ = data.load_qa_rows(cfg["test_data"])
        dtype = resolve_dtype(cfg["dtype"], cfg["device"])
        model, base = load_model(cfg["init_from"], cfg["adapter"], cfg["quantize"], dtype, cfg["device"],
                                 max_seq_len=max_len + cfg["max_new_tokens"] + 64)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    rows = rows[:cfg["test_limit"]] if cfg["test_limit"] else rows
    tok = Tokenizer(base)
    out = cfg["out_dir"] or os.path.join("eval", os.path.basename(os.path.normpath(cfg["adapter"] or base)))
    print(f"{len(rows)} questions from {cfg['test_data']}; {'adapter ' + cfg['adapter'] + ' on ' if cfg['adapter'] else ''}"
          f"{base} ({str(dtype).replace('torch.', '')}); prompts up to {max_len} tokens; null threshold {threshold:g}")

    t0 = time.time()
    try:
        preds, candidates = answer_questions(model, tok, rows, {**cfg, "max_seq_len": max_len}, None, threshold,
                                             progress=True)
    except ValueError as e:  # a question so long that no window of passage fits next to it
        sys.exit(f"error: {e}")
    s = score(preds, [r["answers"] for r in rows], [r["context"] for r in rows])
    baseline = score([""] * len(rows), [r["answers"] for r in rows])  # what answering nothing at all scores
    os.makedirs(out, exist_ok=True)
    write_jsonl(os.path.join(out, "predictions.jsonl"), [
        {"id": row["id"], "question": row["question"], "answers": row["answers"], "prediction": pred,
         "em": exact_match(pred, row["answers"]), "f1": f1_score(pred, row["answers"]),
         "found_in_passage": found_in_passage(pred, row["context"]), "best_answer": c["answer"],
         "null_diff": c["null_diff"], "window": c["window"], "windows": c["windows"]}
        for row, pred, c in zip(rows, preds, candidates)])
    metrics = {**s, "null_threshold": threshold, "always_no_answer": {"exact_match": baseline["exact_match"],
               "f1": baseline["f1"]}, "data": cfg["test_data"], "model": base, "adapter": cfg["adapter"],
               "max_seq_len": max_len, "seconds": round(time.time() - t0, 1)}
    write_json(os.path.join(out, "metrics.json"), metrics, indent=2)
    print(summary(s))
    print(f"always answering 'no answer' scores F1 {baseline['f1']:.1f} here. "
          f"Predictions and metrics in {out}/ ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
