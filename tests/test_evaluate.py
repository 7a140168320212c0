"""SQuAD v2 scoring with Persian normalisation, checked on hand-worked examples.

There is no installed reference implementation of PersianQA scoring, so every expected number below is
worked out by hand (the arithmetic is in the comments)."""

import math
import os

import pytest

from data import NO_ANSWER
from evaluate import answer_from_generation, exact_match, f1_score, found_in_passage, normalize_answer, score, summary

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "persian_qa_sample.jsonl")

ZWNJ = "\u200c"


@pytest.mark.parametrize("raw, expected", [
    ("کتاب" + ZWNJ + "های قدیمی", "کتاب های قدیمی"),       # ZWNJ -> space
    ("كتاب هاي قديمي", "کتاب های قدیمی"),                 # Arabic kaf U+0643 and ye U+064A
    ("مصطفى", "مصطفی"),                                    # Arabic alef maksura U+0649 -> Persian ye
    ("۱۲۳", "123"), ("١٢٣", "123"), ("123", "123"),        # Persian, Arabic-Indic, Latin digits
    ("«تهران»،", "تهران"), ("تهران؟", "تهران"), ("تهران؛", "تهران"),
    ("تهران،اصفهان", "تهران اصفهان"),                     # punctuation becomes a space, not glue
    ("Hello, World!", "hello world"),                      # Latin punctuation and case
    ("کِتابْ", "کتاب"), ("کتــــاب", "کتاب"),               # harakat and tatweel
    ("خانهٔ", "خانه"), ("خانۀ", "خانه"), ("مدرسة", "مدرسه"),  # ezafe hamza, heh-with-hamza, teh marbuta
    ("تأثیر", "تاثیر"), ("إسلام", "اسلام"),                  # hamza on/under alef is optional in Persian
    ("آب", "آب"),                                          # alef madda is a letter: kept
    ("  شمال \n  ایران  ", "شمال ایران"),                   # whitespace collapsed
    ("\u200fabc\u200d", "abc"),                            # RLM and ZWJ are invisible: dropped
    ("ﻻ", "لا"),                                           # presentation form (NFKC)
    ("the book", "the book"),                              # no article stripping
    ("؟!«»", ""),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_persian_variants():
    assert exact_match("کتاب" + ZWNJ + "های قدیمی", ["کتاب های قدیمی"]) == 1.0
    assert exact_match("كيك", ["کیک"]) == 1.0
    assert exact_match("سال ۱۹۵۳", ["سال 1953"]) == 1.0
    assert exact_match("«برزیل».", ["برزیل"]) == 1.0
    assert exact_match("برزیل", ["آرژانتین"]) == 0.0
    assert exact_match("شمال", ["شمال ایران"]) == 0.0


def test_f1_partial_overlap():
    # pred 3 words, gold 1 word, 1 shared: P = 1/3, R = 1/1, F1 = 2*(1/3)/(1/3 + 1) = (2/3)/(4/3) = 0.5
    assert f1_score("شهر زیبای اصفهان", ["اصفهان"]) == pytest.approx(0.5)
    # pred 4 words, gold 2 words, 2 shared: P = 2/4, R = 2/2, F1 = 2*0.5*1/(0.5 + 1) = 2/3
    assert f1_score("دریای مدیترانه و اقیانوس", ["دریای مدیترانه"]) == pytest.approx(2 / 3)
    # the ZWNJ splits «کتاب‌ها» into 2 words, 1 shared with gold «کتاب»: P = 1/2, R = 1, F1 = 2/3
    assert f1_score("کتاب" + ZWNJ + "ها", ["کتاب"]) == pytest.approx(2 / 3)
    # repeated words count once per occurrence: pred «نه نه نه» vs gold «نه»: shared 1, P = 1/3, R = 1 -> 0.5
    assert f1_score("نه نه نه", ["نه"]) == pytest.approx(0.5)
    # after normalisation the Arabic-letter prediction matches the gold exactly
    assert f1_score("كتاب هاي قديمي", ["کتاب های قدیمی"]) == 1.0
    assert f1_score("برزیل", ["آرژانتین"]) == 0.0


def test_max_over_golds():
    # gold 1 shares nothing; gold 2 «شهر تهران»: P = 1/1, R = 1/2, F1 = 2*0.5/1.5 = 2/3
    assert f1_score("تهران", ["اصفهان", "شهر تهران"]) == pytest.approx(2 / 3)
    assert exact_match("تهران", ["اصفهان", "شهر تهران"]) == 0.0
    assert exact_match("تهران", ["اصفهان", "تهران"]) == 1.0
    assert f1_score("تهران", ["اصفهان", "تهران", "شهر تهران"]) == 1.0


def test_no_answer_rules():
    # unanswerable question: only the empty prediction is right
    assert exact_match("", []) == 1.0 and f1_score("", []) == 1.0
    assert exact_match(" «» ", []) == 1.0                  # normalises to empty
    assert exact_match("تهران", []) == 0.0 and f1_score("تهران", []) == 0.0
    # answerable question: the empty prediction gets nothing
    assert exact_match("", ["تهران"]) == 0.0 and f1_score("", ["تهران"]) == 0.0
    # gold answers that normalise to nothing count as "no answer"
    assert exact_match("", ["؟"]) == 1.0


def test_golds_must_be_a_list():
    with pytest.raises(TypeError, match="list of answer strings"):
        exact_match("تهران", "تهران")


def test_answer_from_generation():
    assert answer_from_generation(NO_ANSWER) == ""
    assert answer_from_generation("  " + NO_ANSWER + ".  \n") == ""
    assert answer_from_generation("پاسخي در متن نيست") == ""        # paraphrase, Arabic ye
    assert answer_from_generation("جواب در متن نیست؛ متن دربارهٔ چیز دیگری است") == ""
    assert answer_from_generation("  تهران \n") == "تهران"
    assert answer_from_generation("\n\nتهران\nپرسش: پایتخت ایران کجاست؟") == "تهران"  # first line only
    assert answer_from_generation("") == ""
    # a real answer that merely contains the word «متن» is kept
    assert answer_from_generation("متن شاهنامه") == "متن شاهنامه"


def test_the_no_answer_phrase_written_out_scores_as_abstaining():
    """A reading's answer is its first line as written (answer.py: first_line); when that line is the no-answer phrase
    or a paraphrase, scoring counts it as "" (abstaining), not as an answer: right on an unanswerable question, not
    answered, not invented."""
    golds, contexts = [[], ["تهران"]], ["متن اول", "پایتخت ایران تهران است"]
    for said in (NO_ANSWER, NO_ANSWER + ".", "پاسخي در متن نيست", "جواب در متن نیست؛ متن دربارهٔ چیز دیگری است"):
        assert exact_match(said, []) == 1.0 and f1_score(said, []) == 1.0
        assert f1_score(said, ["تهران"]) == 0.0 and not found_in_passage(said, "پاسخ در متن نیست")
        s = score([said, "تهران"], golds, contexts)
        assert s["answered"] == 1 and s["invented"] == 0.0 and s["exact_match"] == 100.0
    assert exact_match("متن شاهنامه", []) == 0.0        # a real answer that merely starts with «متن» is an answer


def test_score_aggregate():
    predictions = ["تهران", "شهر زیبای اصفهان", "", "مشهد"]
    golds = [["تهران"], ["اصفهان"], [], []]
    # per question EM: 1, 0, 1, 0 -> 50%; F1: 1, 0.5, 1, 0 -> 2.5/4 = 62.5%
    # answerable (first two) F1: (1 + 0.5)/2 = 75%; unanswerable (last two) EM: (1 + 0)/2 = 50%
    s = score(predictions, golds)
    assert s == {"exact_match": 50.0, "f1": 62.5, "n": 4, "has_answer_f1": 75.0, "no_answer_accuracy": 50.0}


def test_score_with_generations_and_empty_subset():
    generations = ["کتاب" + ZWNJ + "های قدیمی\n", NO_ANSWER + "."]
    predictions = [answer_from_generation(g) for g in generations]
    # first: EM 1 (ZWNJ -> space); second: answerable but "no answer" predicted: EM 0, F1 0
    s = score(predictions, [["کتاب های قدیمی"], ["برج میلاد"]])
    assert s["exact_match"] == 50.0 and s["f1"] == 50.0 and s["has_answer_f1"] == 50.0
    assert math.isnan(s["no_answer_accuracy"])           # no unanswerable questions to measure


def test_score_rejects_bad_input():
    with pytest.raises(ValueError, match="2 predictions for 1 questions"):
        score(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="nothing to score"):
        score([], [])


# --- invented answers -----------------------------------------------------------------------------------

def test_found_in_passage_and_invented_rate():
    ctx = "کتاب‌های قدیمی در کتابخانهٔ مرکزی تهران نگه‌داری می‌شوند."
    assert found_in_passage("کتاب های قدیمی", ctx)             # ZWNJ in the passage, a space in the answer
    assert found_in_passage("«کتابخانه مرکزی»", ctx)           # ezafe hamza and quotes normalised away
    assert not found_in_passage("کتابخانه ملی", ctx)           # words the passage does not have
    assert not found_in_passage("تاب", ctx)                    # a piece of a word is not a span of words
    assert not found_in_passage("", ctx)
    # 4 predictions, 3 non-empty: «تهران» is in its passage, «اصفهان» and «شیراز» are not -> 2 of 3 invented
    s = score(["تهران", "اصفهان", "", "شیراز"], [["تهران"], [], [], ["مشهد"]], [ctx, ctx, ctx, ctx])
    assert s["answered"] == 3 and s["invented"] == pytest.approx(200 / 3)
    assert s["exact_match"] == 50.0  # the usual numbers are unchanged by passing contexts
    assert "invented 66.7%" in summary(s) and "answered 3/4" in summary(s)


# --- the command ----------------------------------------------------------------------------------------

def test_evaluate_command_writes_predictions_and_metrics(tiny_dir, tmp_path, capsys):
    """python evaluate.py --adapter=DIR --test_data=FILE --test_limit=N --out_dir=DIR, on a tiny model: the threshold
    and the prompt length come from the adapter folder (as train.py leaves it), every prediction is written down."""
    import json

    import evaluate
    import lora
    from model import Llama
    adapter = tmp_path / "run"
    lora.save_adapter(lora.apply_lora(Llama.from_pretrained(tiny_dir), r=4, targets="all-linear"), str(adapter),
                      base_model_name_or_path=tiny_dir)
    (adapter / "metrics.json").write_text(json.dumps({"null_threshold": 1.5}))
    (adapter / "config.json").write_text(json.dumps({"max_seq_len": 300}))
    heldout = os.path.join(os.path.dirname(SAMPLE), "persian_qa_heldout.jsonl")
    evaluate.main([f"--adapter={adapter}", f"--test_data={heldout}", "--test_limit=3", f"--out_dir={tmp_path / 'ev'}",
                   "--max_new_tokens=4", "--dtype=float32"])
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"3 questions from {heldout}; adapter {adapter} on {tiny_dir} (float32); "
                      f"prompts up to 300 tokens; null threshold 1.5")
    assert out[1].startswith("EM ") and "answered" in out[1] and out[2].startswith("always answering 'no answer'")
    preds = [json.loads(line) for line in open(tmp_path / "ev" / "predictions.jsonl", encoding="utf-8")]
    assert len(preds) == 3 and all(p["windows"] >= 4 for p in preds)  # ~1,000-token passages, 300-token prompts
    assert set(preds[0]) == {"id", "question", "answers", "prediction", "em", "f1", "found_in_passage",
                             "best_answer", "null_diff", "window", "windows"}
    for p in preds:  # the threshold decided each prediction
        assert p["prediction"] == (p["best_answer"] if p["null_diff"] <= 1.5 else "")
    metrics = json.load(open(tmp_path / "ev" / "metrics.json"))
    assert metrics["n"] == 3 and metrics["null_threshold"] == 1.5 and metrics["max_seq_len"] == 300
    assert metrics["always_no_answer"]["f1"] == 100.0 * sum(not p["answers"] for p in preds) / 3


def test_evaluate_command_bad_input(tiny_dir, tmp_path):
    import evaluate
    with pytest.raises(SystemExit, match="no QA data file"):
        evaluate.main([f"--init_from={tiny_dir}", f"--test_data={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(SystemExit, match="not found. Create it with: python prepare.py"):
        evaluate.main([f"--init_from={tmp_path / 'nope'}"])
    with pytest.raises(SystemExit, match="null_threshold must be a number"):
        evaluate.main([f"--init_from={tiny_dir}", "--null_threshold=high"])


def test_metrics_are_strict_json(tmp_path):
    """A score over no questions (nan) becomes null; strings that merely contain "NaN" stay as they are."""
    import json

    from convert import write_json
    path = tmp_path / "metrics.json"
    write_json(path, {"f1": float("nan"), "data": "NaNa.jsonl", "val_loss": [(0, float("inf")), (1, 0.5)],
                      "test": {"invented": float("nan"), "n": 3}}, indent=2)
    text = path.read_text()
    assert "NaN" not in text.replace("NaNa", "") and "Infinity" not in text
    assert json.loads(text) == {"f1": None, "data": "NaNa.jsonl", "val_loss": [[0, None], [1, 0.5]],
                                "test": {"invented": None, "n": 3}}
