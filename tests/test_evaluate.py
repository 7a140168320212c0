"""SQuAD v2 scoring with Persian normalisation, checked on hand-worked examples.

There is no installed reference implementation of PersianQA scoring, so every expected number below is
worked out by hand (the arithmetic is in the comments)."""

import math

import pytest

from data import NO_ANSWER
from evaluate import answer_from_generation, exact_match, f1_score, normalize_answer, score

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
