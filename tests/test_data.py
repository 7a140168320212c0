"""Loading QA rows: the bundled sample, both file shapes, malformed rows, and the split by context."""

import json
import os

import pytest

from data import NO_ANSWER, encode_example, encode_rows, fit_passage, load_qa_rows, split_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(ROOT, "data", "persian_qa_sample.jsonl")
ZWNJ = "\u200c"


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return str(path)


# --- the bundled sample ---------------------------------------------------------------------------------

def test_bundled_sample_loads_clean(capsys):
    rows, n_skipped = load_qa_rows(SAMPLE)
    assert n_skipped == 0 and capsys.readouterr().out == ""
    assert len(rows) >= 180
    assert len({r["id"] for r in rows}) == len(rows)
    unanswerable = sum(not r["answers"] for r in rows) / len(rows)
    assert 0.20 <= unanswerable <= 0.25
    contexts = {r["context"] for r in rows}
    assert 60 <= len(contexts) <= 70
    assert all(150 <= len(c) <= 450 for c in contexts)


def test_bundled_sample_raw_rows_are_exact_spans():
    with open(SAMPLE, encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    for row in raw:
        assert set(row) == {"id", "title", "context", "question", "answers"}
        texts, starts = row["answers"]["text"], row["answers"]["answer_start"]
        assert len(texts) == len(starts) <= 1
        for text, start in zip(texts, starts):
            assert row["context"][start:start + len(text)] == text, row["id"]
            assert 1 <= len(text.split()) <= 6, row["id"]
    text = "".join(r["context"] for r in raw)
    assert ZWNJ in text and any("۰" <= ch <= "۹" for ch in text)   # ZWNJ and Persian digits are exercised
    assert "ي" not in text and "ك" not in text                      # Persian ye/kaf, not the Arabic letters


def test_no_answer_phrase_is_persian():
    assert NO_ANSWER and all("\u0600" <= ch <= "\u06ff" or ch == " " for ch in NO_ANSWER)


# --- both file shapes -----------------------------------------------------------------------------------

CTX_A = "تهران پایتخت ایران است و برج میلاد در این شهر قرار دارد."
CTX_B = "اصفهان در دوران صفوی پایتخت ایران بود."
FLAT = [
    {"id": "q1", "title": "تهران", "context": CTX_A, "question": "پایتخت ایران کجاست؟",
     "answers": {"text": ["تهران"], "answer_start": [0]}},
    {"id": "q2", "title": "تهران", "context": CTX_A, "question": "جمعیت تهران چقدر است؟",
     "answers": {"text": [], "answer_start": []}},
    {"id": "q3", "title": "اصفهان", "context": CTX_B, "question": "اصفهان در کدام دوران پایتخت بود؟",
     "answers": {"text": ["دوران صفوی", "صفوی"], "answer_start": [10, 16]}},
]
EXPECTED = [
    {"id": "q1", "title": "تهران", "context": CTX_A, "question": "پایتخت ایران کجاست؟", "answers": ["تهران"]},
    {"id": "q2", "title": "تهران", "context": CTX_A, "question": "جمعیت تهران چقدر است؟", "answers": []},
    {"id": "q3", "title": "اصفهان", "context": CTX_B, "question": "اصفهان در کدام دوران پایتخت بود؟",
     "answers": ["دوران صفوی", "صفوی"]},
]


def test_flat_jsonl(tmp_path):
    assert CTX_B[10:20] == "دوران صفوی" and CTX_B[16:20] == "صفوی"
    rows, n_skipped = load_qa_rows(write_jsonl(tmp_path / "flat.jsonl", FLAT))
    assert (rows, n_skipped) == (EXPECTED, 0)


def test_json_list_with_answers_as_list_of_dicts(tmp_path):
    rows = [dict(r, answers=[{"text": t, "answer_start": s}
                             for t, s in zip(r["answers"]["text"], r["answers"]["answer_start"])]) for r in FLAT]
    path = tmp_path / "flat.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    assert load_qa_rows(str(path)) == (EXPECTED, 0)


def test_nested_squad_v2_json(tmp_path):
    nested = {"version": "v2.0", "data": [
        {"title": "تهران", "paragraphs": [{"context": CTX_A, "qas": [
            {"id": "q1", "question": "پایتخت ایران کجاست؟", "is_impossible": False,
             "answers": [{"text": "تهران", "answer_start": 0}]},
            {"id": "q2", "question": "جمعیت تهران چقدر است؟", "is_impossible": True, "answers": []},
        ]}]},
        {"title": "اصفهان", "paragraphs": [{"context": CTX_B, "qas": [
            {"id": "q3", "question": "اصفهان در کدام دوران پایتخت بود؟", "is_impossible": False,
             "answers": [{"text": "دوران صفوی", "answer_start": 10}, {"text": "صفوی", "answer_start": 16}]},
        ]}]},
    ]}
    path = tmp_path / "pqa_test.json"
    path.write_text(json.dumps(nested, ensure_ascii=False), encoding="utf-8")
    assert load_qa_rows(str(path)) == (EXPECTED, 0)


def test_loaded_rows_written_back_load_again(tmp_path):
    # prepare.py writes what load_qa_rows returns (answers as a plain list of spans) and training reads it back
    assert load_qa_rows(write_jsonl(tmp_path / "clean.jsonl", EXPECTED)) == (EXPECTED, 0)
    bad = dict(EXPECTED[0], answers=["شیراز"])
    assert load_qa_rows(write_jsonl(tmp_path / "bad.jsonl", [EXPECTED[0], bad]))[1] == 1


def test_misplaced_offset_still_found_and_duplicates_dropped(tmp_path):
    row = dict(FLAT[0], answers={"text": ["برج میلاد", "برج میلاد"], "answer_start": [3, 3]})  # wrong offset
    rows, n_skipped = load_qa_rows(write_jsonl(tmp_path / "x.jsonl", [row]))
    assert n_skipped == 0 and rows[0]["answers"] == ["برج میلاد"]


# --- malformed rows -------------------------------------------------------------------------------------

def test_malformed_rows_are_skipped_and_reported(tmp_path, capsys):
    lines = [
        FLAT[0],                                                                    # line 1: good
        '{"id": "broken", "context": "تهران',                                        # line 2: bad JSON
        dict(FLAT[0], id="x1", answers={"text": ["شیراز"], "answer_start": [0]}),   # line 3: answer not in context
        dict(FLAT[0], id="x2", question=""),                                        # line 4: no question
        {k: v for k, v in FLAT[0].items() if k != "question"},                      # line 5: no question
        dict(FLAT[0], id="x3", context=42),                                         # line 6: no context (wrong type)
        dict(FLAT[0], id="x4", answers="تهران"),                                    # line 7: bad answers field
        "",                                                                         # line 8: blank, ignored
        FLAT[2],                                                                    # line 9: good
        "not json at all",                                                          # line 10: bad JSON
    ]
    path = write_jsonl(tmp_path / "messy.jsonl", lines)
    rows, n_skipped = load_qa_rows(path)
    assert [r["id"] for r in rows] == ["q1", "q3"]
    assert n_skipped == 7
    out = capsys.readouterr().out
    assert out.count("\n") == 1                                                     # one line
    assert out.startswith(f"{path}: skipped 7 of 9 rows (")
    for part in ("2 no question", "1 answer not in context", "1 no context", "1 bad answers field",
                 "2 bad JSON on lines 2, 10"):
        assert part in out, (part, out)


def test_single_bad_json_line_wording(tmp_path, capsys):
    path = write_jsonl(tmp_path / "one.jsonl", [FLAT[0], "{oops"])
    assert load_qa_rows(path)[1] == 1
    assert capsys.readouterr().out == f"{path}: skipped 1 of 2 rows (1 bad JSON on line 2)\n"


def test_missing_file_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected JSONL"):
        load_qa_rows(str(tmp_path / "nope.jsonl"))


def test_no_usable_rows_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [dict(FLAT[0], context="")])
    with pytest.raises(ValueError, match="no usable QA rows"):
        load_qa_rows(path)


# --- split by context -----------------------------------------------------------------------------------

def test_split_rows_keeps_contexts_on_one_side_and_is_deterministic():
    rows, _ = load_qa_rows(SAMPLE)
    train, val = split_rows(rows, val_fraction=0.1, seed=1337)
    assert len(train) + len(val) == len(rows)
    train_ctx, val_ctx = {r["context"] for r in train}, {r["context"] for r in val}
    assert not train_ctx & val_ctx
    n_ctx = len(train_ctx | val_ctx)
    assert len(val_ctx) == round(0.1 * n_ctx)
    # same inputs -> same split; row order inside each side follows the file
    assert split_rows(rows, 0.1, 1337) == (train, val)
    assert [r["id"] for r in val] == sorted(r["id"] for r in val)
    # another seed picks other passages
    assert {r["context"] for r in split_rows(rows, 0.1, 7)[1]} != val_ctx


def test_split_rows_edge_cases():
    rows = list(EXPECTED)                                       # 2 contexts
    train, val = split_rows(rows, 0.01, seed=0)                 # rounds to 0, but val asks for some: 1
    assert len({r["context"] for r in val}) == 1 and len({r["context"] for r in train}) == 1
    assert split_rows(rows, 0.0, seed=0) == (rows, [])
    with pytest.raises(ValueError, match="val_fraction"):
        split_rows(rows, 1.0, seed=0)
    with pytest.raises(ValueError, match="distinct context"):
        split_rows(rows[:2], 0.5, seed=0)


# --- long passages: windows that keep the answer --------------------------------------------------------

@pytest.fixture(scope="module")
def tok(bundled_dir):
    from tokenizer import Tokenizer
    return Tokenizer(bundled_dir)


def check_encoded(tok, rows, max_len, seed=0):
    """Encode each row alone; every example fits and every answerable one still shows its span. -> (kept, dropped)"""
    kept = dropped = 0
    for row in rows:
        ex = encode_example(tok, row, max_len, seed)
        if ex is None:
            dropped += 1
            continue
        prompt, answer = ex
        assert len(prompt) + len(answer) <= max_len + 1, row["id"]
        if row["answers"]:
            assert row["answers"][0] in tok.decode(prompt), row["id"]   # the target is in what the model reads
            assert tok.decode(answer).startswith(row["answers"][0])
        else:
            assert tok.decode(answer).startswith(NO_ANSWER)
        assert row["question"] in tok.decode(prompt)                    # the question is never cut
        kept += 1
    return kept, dropped


@pytest.mark.parametrize("max_len", [160, 224, 384])
def test_no_example_loses_its_answer_on_the_sample(tok, max_len):
    rows, _ = load_qa_rows(SAMPLE)
    kept, dropped = check_encoded(tok, rows, max_len)
    assert kept + dropped == len(rows) and kept >= len(rows) * 0.75


def long_rows(n=12, seed=0):
    """Synthetic passages of ~3,000 characters with the answer at the start, in the middle or at the end."""
    import random
    rng = random.Random(seed)
    words = ["ایران", "کوه", "رود", "شهر", "تاریخ", "مردم", "دریا", "کتاب", "سال", "بزرگ", "قدیمی", "شمال"]
    rows = []
    for i in range(n):
        filler = [" ".join(rng.choice(words) for _ in range(rng.randint(6, 12))) + "." for _ in range(60)]
        answer = f"پل شماره {i} در کنار رود"
        where = [0, len(filler) // 2, len(filler)][i % 3]
        context = " ".join(filler[:where] + [f"مهم‌ترین بنای شهر {answer} است."] + filler[where:])
        rows.append({"id": f"long-{i}", "title": "", "context": context, "question": "مهم‌ترین بنای شهر چیست؟",
                     "answers": [answer] if i % 4 else []})             # every fourth row unanswerable
    return rows


def test_long_passages_are_windowed_around_the_answer(tok, capsys):
    rows = long_rows()
    assert all(len(tok.encode(r["context"])) > 1000 for r in rows)
    assert check_encoded(tok, rows, max_len=256) == (len(rows), 0)
    # the answer lands at different places of its window: never always centred (the model must read all of it)
    places = []
    for r in rows:
        text, how, _ = fit_passage(tok, r, 256)
        assert how == "windowed"
        if r["answers"]:
            places.append(text.index(r["answers"][0]) / len(text))
    assert max(places) - min(places) > 0.4
    encode_rows(tok, rows, 256, name="long")
    assert capsys.readouterr().out == ("long: 12 rows, 0 whole, 12 with the passage windowed to fit max_seq_len=256 "
                                       "(the answer kept in), 0 dropped (too long even so)\n")


def test_windows_are_reproducible_and_seeded(tok):
    rows = long_rows()
    assert [fit_passage(tok, r, 256)[0] for r in rows] == [fit_passage(tok, r, 256)[0] for r in rows]
    assert [fit_passage(tok, r, 256, seed=1)[0] for r in rows] != [fit_passage(tok, r, 256)[0] for r in rows]


def test_rows_that_cannot_fit_are_dropped_and_counted(tok, capsys):
    rows = long_rows(4)
    rows[1]["answers"] = [rows[1]["context"][:900]]           # a "span" far longer than any window
    text, how, need = fit_passage(tok, rows[1], 256)
    assert (text, how) == (None, "dropped") and need > 256
    assert len(encode_rows(tok, rows, 256, name="long")) == 3
    assert "1 dropped" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"no long fit max_seq_len=96: the shortest needs \d+ tokens"):
        encode_rows(tok, rows, 96, name="long")
