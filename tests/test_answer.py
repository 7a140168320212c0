"""Reading passages to answer or abstain (answer.py): the threshold worked out by hand, windows over long passages,
and the cached, batched, shared-prefix reading checked against plain forward passes."""

import os

import pytest
import torch

from answer import _no_answer_ids, abstain_above, first_line, read_passages, reading_windows
from prefix_cache import prefill_shared, shift_keys
from evaluate import score
from report import choose_threshold

SAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "persian_qa_sample.jsonl")


# --- abstaining by score: the threshold -----------------------------------------------------------------

def test_abstain_above_and_choose_threshold_by_hand():
    candidates = [{"answer": "تهران", "null_diff": -3.0},    # sure, right           (gold: تهران)
                  {"answer": "اصفهان", "null_diff": -1.0},   # fairly sure, wrong    (gold: none)
                  {"answer": "مشهد", "null_diff": 0.5},      # unsure, right         (gold: مشهد)
                  {"answer": "یزد", "null_diff": 2.0}]       # abstains, and should  (gold: none)
    golds = [["تهران"], [], ["مشهد"], []]
    assert abstain_above(candidates, 0.0) == ["تهران", "اصفهان", "", ""]
    # F1 by threshold: below -3: 0+1+0+1 = 2; (-3,-1): 1+1+0+1 = 3; (-1,0.5): 1+0+0+1 = 2;
    # (0.5,2): 1+0+1+1 = 3; above 2: 1+0+1+0 = 2. The first best, halfway between -3 and -1, is kept.
    t = choose_threshold(candidates, golds)
    assert t == -2.0 and score(abstain_above(candidates, t), golds)["f1"] == 75.0


# --- reading long passages in windows -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok(bundled_dir):
    from tokenizer import Tokenizer
    return Tokenizer(bundled_dir)


def test_reading_windows_cover_the_passage_and_fit(tok):
    from data import qa_messages
    words = ["ایران", "کوه", "رود", "شهر", "تاریخ", "مردم", "دریا", "کتاب", "سال", "بزرگ"]
    context = " ".join(words[(i * 7) % 10] + str(i) for i in range(400))  # every word unique: coverage is checkable
    question = "کدام کوه بلندتر است؟"
    windows = reading_windows(tok, context, question, 300)
    assert len(windows) >= 3
    for w in windows:
        assert len(tok.encode_chat(qa_messages(w, question))) <= 300 and w in context
    starts = [context.index(w) for w in windows]
    ends = [s + len(w) for s, w in zip(starts, windows)]
    assert starts[0] == 0 and ends[-1] == len(context)
    assert all(s < e_prev for s, e_prev in zip(starts[1:], ends))          # neighbours overlap: no gap
    assert all(context[s - 1] == " " for s in starts[1:])                  # cut at spaces
    assert reading_windows(tok, "تهران پایتخت ایران است.", question, 300) == ["تهران پایتخت ایران است."]
    with pytest.raises(ValueError, match="leaves"):
        reading_windows(tok, context, question, 90)


def test_read_passages_scores_equal_teacher_forced_log_probs(tiny_dir, tok):
    """The cached, batched reading of answer.py against the plain definition: a full forward pass over
    prompt + continuation, per question alone. Both scores, and the answer's construction (the no-answer
    phrase up to the turn-off point, the best token off it, then greedy), are checked."""
    import data
    from model import Llama
    torch.manual_seed(0)
    model = Llama.from_pretrained(tiny_dir, max_seq_len=1024).eval()
    rows, _ = data.load_qa_rows(SAMPLE)
    rows = rows[:5]
    candidates = read_passages(model, tok, rows, max_prompt_len=512, max_new_tokens=10, batch_size=3)
    na, first_word = _no_answer_ids(tok)
    assert first_word == 6  # «پاسخ»: four letters in six byte-level tokens
    for row, r in zip(rows, candidates):
        prompt = tok.encode_chat(data.qa_messages(row["context"], row["question"]))

        def logprobs(cont):  # log p of each token of cont after prompt, and the distributions
            with torch.no_grad():
                lp = model(torch.tensor([prompt + cont]))[0][0, len(prompt) - 1:-1].float().log_softmax(-1)
            return lp.gather(-1, torch.tensor(cont)[:, None])[:, 0], lp

        na_lp, na_dists = logprobs(na)
        off = na_dists.scatter(-1, torch.tensor(na)[:, None], float("-inf")).max(-1)
        turn = int((na_lp.cumsum(0) - na_lp + off.values)[:first_word].argmax())
        answer = na[:turn] + [int(off.indices[turn])]

        def first_line_over(ids):  # a newline after visible text ends the answer's first line
            text = tok.decode(ids)
            return "\n" in text.lstrip()

        while len(answer) < 10 and answer[-1] not in tok.stop_ids and not first_line_over(answer):
            answer.append(int(logprobs(answer)[1][-1].argmax()))    # greedy to the end of turn or of the line
        ans_lp, _ = logprobs(answer)
        stop = next((i for i, t in enumerate(answer) if t in tok.stop_ids), len(answer))
        assert r["answer"] == first_line(tok.decode(answer[:stop]))
        assert r["null_diff"] == pytest.approx(float(na_lp.sum() - ans_lp[:stop + 1].sum()), abs=1e-3)
        assert r["windows"] == 1


def test_batched_reading_equals_one_at_a_time(bundled_dir, tok):
    """Left-padded batches (answer.read_passages) give each question the reading it gets alone, on the real model."""
    import data
    from model import Llama
    model = Llama.from_pretrained(bundled_dir, max_seq_len=512)
    rows, _ = data.load_qa_rows(SAMPLE)
    rows = rows[:5]
    one = read_passages(model, tok, rows, 400, max_new_tokens=12, batch_size=1)
    together = read_passages(model, tok, rows, 400, max_new_tokens=12, batch_size=5)
    for a, b in zip(one, together):
        # rows padded to another length multiply other shapes: scores agree to rounding; the texts agree
        # unless a near tie flips a greedy pick, which would move null_diff by far more than this bound
        assert a["answer"] == b["answer"] and a["null_diff"] == pytest.approx(b["null_diff"], abs=1e-3)


def test_shared_prefill_equals_plain_prefill(bundled_dir, tok):
    """Reading a passage once for all its questions (prefix_cache.prefill_shared: keys moved by rotation) gives the
    logits, and leaves the cache, that one left-padded pass over the whole prompts gives."""
    import data
    from model import Llama, left_pad
    model = Llama.from_pretrained(bundled_dir, max_seq_len=512).eval()
    rows, _ = data.load_qa_rows(SAMPLE)
    rows = rows[:7]  # three passages: 3, 3 and 1 questions
    prompts = [tok.encode_chat(data.qa_messages(r["context"], r["question"])) for r in rows]
    groups = [r["context"] for r in rows]
    assert len(set(groups)) == 3
    with torch.no_grad():
        shared, T, n_pad = prefill_shared(model, prompts, groups, extra=4)
        shared_k = model.model.layers[-1].self_attn.cache_k.clone()
        idx, pad = left_pad(prompts, pad_id=0)
        model.setup_cache(len(prompts), T + 4, n_pad=pad)
        plain = model.last_logits(idx, start_pos=0)
        plain_k = model.model.layers[-1].self_attn.cache_k
        model.clear_cache()
    assert torch.equal(n_pad, pad) and T == idx.shape[1]
    assert (shared - plain).abs().max() < 1e-5 * plain.abs().max()   # fp32 rounding of the other route (9e-7 seen)
    real = torch.arange(T)[None, :] >= pad[:, None]                   # (B, T) positions that hold prompt tokens
    diff = (shared_k - plain_k)[:, :, :T].abs()                       # (B, n_kv_heads, T, head_dim)
    assert diff[real[:, None, :, None].expand_as(diff)].max() < 1e-3
    # the groups' prefixes really were shared: a wrong rotation moves the keys by far more than the bound
    wrong = shift_keys(plain_k, torch.ones(len(prompts), dtype=torch.long), model.rope_cos, model.rope_sin)
    assert (wrong - plain_k).abs().max() > 0.1
