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
from contextlib import nullcontext

import torch

import data
from model import left_pad, rotate_half

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


def found_in_passage(pred, context):
    """Does the normalised prediction occur in the normalised passage, as whole words? An extractive answer always
    does; a non-empty answer that does not was made up (what the notes call a hallucination)."""
    p = normalize_answer(pred)
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
        answered = [(p, c) for p, c in zip(predictions, contexts) if normalize_answer(p)]
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
# Scoring a model: the loss on held-out answers (train.py), and answers it writes itself.

# Answering, or not. Greedy decoding lets the FIRST token decide whether the model abstains, and in a byte-level
# vocabulary that token is one byte shared by the no-answer phrase and a quarter of all Persian words. SQuAD v2 systems
# decide instead by comparing two whole scores: the best answer's and the "no answer" one's, abstaining when
#     null_diff = log p(no-answer phrase) - log p(best answer)  >  threshold,
# with the threshold chosen on validation data (best_threshold). We score both by reading them:
#   1. the no-answer phrase is fed in (teacher forcing): its log-probability, and at each of its tokens the most
#      probable token that leaves it;
#   2. the best answer leaves the phrase where that is most probable, then continues greedily to its end of turn.
# Step 2 is the best answer that is not the no-answer phrase, up to one greedy choice per token.

def _no_answer_ids(tok):
    """The tokens the model writes to abstain, up to and including its end-of-turn token, and how many of them
    spell the phrase's first word: an answer may leave the phrase only there (see _read_batch)."""
    ids = tok.encode(data.completion_text(tok, data.qa_messages("", ""), data.NO_ANSWER))
    end = next(i for i, t in enumerate(ids) if t in tok.stop_ids)
    return ids[:end + 1], min(len(tok.encode(data.NO_ANSWER.split()[0])), end)


_LINE_TABLES = {}  # (tokenizer, vocabulary size, device) -> the two masks below, built once


def _line_end_tables(tok, vocab, device):
    """Two (vocab,) masks: tokens whose text holds a newline, and tokens whose text holds something else than
    whitespace. Only the first line of an answer counts (answer_from_generation), so a row's reading can stop at
    the newline that ends its first non-empty line: what a rambling base model writes after it costs nothing."""
    key = (id(tok), vocab, str(device))
    if key not in _LINE_TABLES:  # ids past the tokenizer's (a model's padded vocabulary) are neither
        texts = [tok.decode([i]) if i < tok.vocab_size else "" for i in range(vocab)]
        newline = torch.tensor(["\n" in t for t in texts], device=device)
        visible = torch.tensor([bool(t.strip()) for t in texts], device=device)
        _LINE_TABLES[key] = (newline, visible)
    return _LINE_TABLES[key]


def _shift_keys(k, shift, cos_table, sin_table):
    """Cached keys k (B, n_kv_heads, T, head_dim), rotated at their positions p, -> rotated at p + shift (B,).
    Rotations add up: R(p + d) = R(d) R(p), so moving a key d positions is one more rotation by d (sin(-x) = -sin x
    for a move to the left). Values carry no position and move as they are."""
    d = shift.abs()
    sign = torch.where(shift < 0, -1.0, 1.0).to(k.device)[:, None]                      # (B, 1)
    cos = cos_table[d][:, None, None, :]                                                # (B, 1, 1, head_dim)
    sin = (sin_table[d] * sign)[:, None, None, :]                                       # (B, 1, 1, head_dim)
    kf = k.float()
    return (kf * cos + rotate_half(kf) * sin).to(k.dtype)


@torch.no_grad()
def prefill_shared(model, prompts, groups, extra):
    """
    Fill a fresh KV cache with left-padded prompts (B token-id lists) and return the logits after each (B, vocab),
    computing a prefix that several prompts share only once. groups: one id per prompt; the prompts of a group
    share their system prompt and passage and differ in the question, so the passage is read once per group.
      1. each group's common prefix, one row per group, left-padded: the only long pass;
      2. its keys and values copied into every member's row, where left padding puts that member's prompt. The
         same tokens now sit at another position, so the keys are rotated by the difference (_shift_keys);
      3. the last L tokens of every row (L = the longest part not shared) run on top: the questions.
    Attention scores only depend on the distance between a query and a key, so each row gets the reading it
    would get alone, up to rounding (tested). extra: cache room left after the prompts (for what is generated).
    Returns (logits (B, vocab), T: where the prompts end, n_pad (B,)).
    """
    B = len(prompts)
    T = max(len(p) for p in prompts)
    n_pad = torch.tensor([T - len(p) for p in prompts])
    members = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    device = model.model.embed_tokens.weight.device
    if all(len(m) == 1 for m in members.values()):  # nothing is shared: one plain pass
        idx, _ = left_pad(prompts, pad_id=0)
        model.setup_cache(B, T + extra, n_pad=n_pad)
        return model.lm_head(model.hidden(idx.to(device), start_pos=0)[:, -1]), T, n_pad
    # 1. the shared prefixes: the longest common prefix of each group, at least one token short of every prompt
    prefixes = []
    for m in members.values():
        n = min(len(prompts[i]) for i in m) - 1
        first = prompts[m[0]]
        n = next((j for j in range(n) if any(prompts[i][j] != first[j] for i in m)), n)
        prefixes.append(first[:n])
    slot = {g: s for s, g in enumerate(members)}
    shared = torch.tensor([len(prefixes[slot[g]]) for g in groups])                    # (B,)
    L = max(len(p) - int(s) for p, s in zip(prompts, shared))                          # longest unshared tail
    idx_a, pad_a = left_pad(prefixes, pad_id=0)                                        # (G, T_a)
    T_a = idx_a.shape[1]
    model.setup_cache(len(prefixes), T_a, n_pad=pad_a)
    model.hidden(idx_a.to(device), start_pos=0)
    kept = [(layer.self_attn.cache_k, layer.self_attn.cache_v) for layer in model.model.layers]
    # 2. copy into the rows: row i's prefix starts at n_pad[i] here and started at T_a - shared[i] in pass 1
    model.setup_cache(B, T + extra, n_pad=n_pad)
    src = torch.tensor([slot[g] for g in groups])                                      # (B,) its group's row
    shift = n_pad - (T_a - shared)                                                     # (B,)
    for layer, (k_a, v_a) in zip(model.model.layers, kept):
        k_rows = _shift_keys(k_a[src], shift, model.rope_cos, model.rope_sin)          # (B, n_kv, T_a, head_dim)
        a = layer.self_attn
        for i in range(B):  # positions [n_pad, T - L) of row i come from its prefix; pass 3 writes the rest
            s, n = int(n_pad[i]), T - L - int(n_pad[i])
            if n > 0:
                from_ = T_a - int(shared[i])
                a.cache_k[i, :, s:s + n] = k_rows[i, :, from_:from_ + n]
                a.cache_v[i, :, s:s + n] = v_a[src[i], :, from_:from_ + n]
    # 3. the tails: the last L tokens of every prompt (left-padded where a prompt is shorter than L)
    idx_b, _ = left_pad([p[-L:] for p in prompts], pad_id=0)                           # (B, L)
    return model.lm_head(model.hidden(idx_b.to(device), start_pos=T - L)[:, -1]), T, n_pad


@torch.no_grad()
def _read_batch(model, tok, prompts, groups, na_ids, first_word, max_new_tokens):
    """prompts (B token-id lists) -> per row (answer token ids, log p(answer), log p(no-answer phrase)).
    The answer may leave the no-answer phrase only within its first word: in a byte-level vocabulary «پاسخ» is six
    byte tokens, and spans such as «پاریس» share its first three; once the word is written, what follows is the
    phrase going astray («پاسخ در ...»), not an answer. A row stops at its end of turn or at the end of its first
    non-empty line, and then leaves the batch: finished rows cost no more decoding steps."""
    B, K = len(prompts), len(na_ids)
    try:
        first, T, n_pad = prefill_shared(model, prompts, groups, max(K, max_new_tokens))
        first = first.float().log_softmax(-1)                                                  # (B, vocab)
        device = first.device
        na = torch.tensor(na_ids, device=device).expand(B, K)                                  # (B, K)
        rest = model.lm_head(model.hidden(na[:, :-1], start_pos=T)).float().log_softmax(-1)   # (B, K-1, vocab)
        logp = torch.cat([first[:, None], rest], dim=1)        # (B, K, vocab): the choice before each phrase token
        on = logp.gather(-1, na[..., None])[..., 0]            # (B, K) log p of each phrase token
        na_score = on.sum(1)                                   # (B,)
        off_lp, off_tok = logp.scatter(-1, na[..., None], float("-inf")).max(-1)  # (B, K) best way off the phrase
        leave = (on.cumsum(1) - on + off_lp)[:, :first_word].argmax(1)            # (B,) where to turn off
        off_tok = off_tok.gather(1, leave[:, None])[:, 0]                          # (B,)

        out, ans_score = [[] for _ in range(B)], torch.zeros(B, device=device)
        live = torch.arange(B, device=device)  # the rows still reading, in the order of the cache's rows
        started = torch.zeros(B, dtype=torch.bool, device=device)  # has the row written a visible character yet
        newline, visible = _line_end_tables(tok, first.shape[-1], device)
        stops = torch.tensor(sorted(tok.stop_ids), device=device)
        lp = first
        for s in range(max_new_tokens):
            pick = torch.where(s < leave[live], na[0, min(s, K - 1)], lp.argmax(-1))  # on the phrase, or greedy
            pick = torch.where(s == leave[live], off_tok[live], pick)                 # the turn off it
            ans_score[live] += lp.gather(1, pick[:, None])[:, 0]
            turn_over = torch.isin(pick, stops)
            line_over = newline[pick] & (started[live] | visible[pick])  # the first non-empty line ends here
            started[live] |= visible[pick]
            for b, t, ended in zip(live.tolist(), pick.tolist(), turn_over.tolist()):
                if not ended:
                    out[b].append(t)
            going = ~(turn_over | line_over)
            if not bool(going.any()) or s + 1 == max_new_tokens:
                break
            if not bool(going.all()):  # drop the finished rows from the batch and from every layer's cache
                keep = going.nonzero()[:, 0]
                live, pick = live[keep], pick[keep]
                for layer in model.model.layers:
                    a = layer.self_attn
                    a.cache_k, a.cache_v, a.cache_pad = a.cache_k[keep], a.cache_v[keep], a.cache_pad[keep]
            lp = model.lm_head(model.hidden(pick[:, None], start_pos=T + s)[:, -1]).float().log_softmax(-1)
    finally:
        model.clear_cache()
    return [(out[b], ans_score[b].item(), na_score[b].item()) for b in range(B)]


@torch.no_grad()
def read(model, tok, rows, max_prompt_len, max_new_tokens=48, batch_size=8, ctx=None, progress=False):
    """
    Read every question: its passage in windows (data.passage_windows) when the whole prompt is longer than
    max_prompt_len. Returns one dict per row: "answer" (the best answer text over its windows), "null_diff"
    (log p(no answer) - log p(that answer), in the window most sure of an answer), "window" (its index) and
    "windows". Prompts go batch_size at a time, left-padded (model.py: left_pad): a decoding step reads every
    weight once, whatever the number of rows. The questions on one passage (window) go together, so the passage
    is read once for all of them (prefill_shared), and passages of similar length go together, so the padding
    stays short.
    """
    from tqdm import tqdm
    model.eval()
    prompts, owner, window_of = [], [], []
    for i, r in enumerate(rows):
        for w, text in enumerate(data.passage_windows(tok, r["context"], r["question"], max_prompt_len)):
            prompts.append(tok.encode_chat(data.qa_messages(text, r["question"])))
            owner.append((i, w))
            window_of.append(text)
    na_ids, first_word = _no_answer_ids(tok)
    longest = {}
    for j, text in enumerate(window_of):
        longest[text] = max(longest.get(text, 0), len(prompts[j]))
    order = sorted(range(len(prompts)), key=lambda j: (longest[window_of[j]], window_of[j], len(prompts[j])))
    got = {}
    bar = tqdm(total=len(prompts), desc="reading", unit="prompt", disable=not progress, leave=False)
    for b in range(0, len(order), batch_size):
        chunk = order[b:b + batch_size]
        with ctx or nullcontext():
            results = _read_batch(model, tok, [prompts[j] for j in chunk], [window_of[j] for j in chunk],
                                  na_ids, first_word, max_new_tokens)
        got.update(zip(chunk, results))
        bar.update(len(chunk))
    bar.close()
    per_row = [[] for _ in rows]
    for j, (i, w) in enumerate(owner):
        ids, ans_lp, na_lp = got[j]
        per_row[i].append({"answer": answer_from_generation(tok.decode(ids)), "null_diff": na_lp - ans_lp,
                           "window": w})
    readings = []
    for windows in per_row:  # the window most sure of an answer speaks for the passage
        best = min(windows, key=lambda r: r["null_diff"])
        readings.append(dict(best, windows=len(windows)))
    return readings


def decide(readings, threshold):
    """Predictions: each reading's answer, or "" (abstain) where null_diff > threshold."""
    return [r["answer"] if r["null_diff"] <= threshold else "" for r in readings]


def best_threshold(readings, golds):
    """The threshold with the best F1 on these questions (SQuAD v2's best_f1_thresh), found in one sorted pass:
    with the questions ordered by null_diff, a threshold answers a prefix of them and abstains on the rest."""
    answer_f1 = [f1_score(r["answer"], g) for r, g in zip(readings, golds)]
    abstain_f1 = [f1_score("", g) for g in golds]
    order = sorted(range(len(readings)), key=lambda i: readings[i]["null_diff"])
    total = best = sum(abstain_f1)  # threshold below every null_diff: abstain on all
    threshold = readings[order[0]]["null_diff"] - 1.0 if order else 0.0
    for k, i in enumerate(order):
        total += answer_f1[i] - abstain_f1[i]
        nxt = readings[order[k + 1]]["null_diff"] if k + 1 < len(order) else readings[i]["null_diff"] + 2.0
        if total > best + 1e-9:
            best, threshold = total, (readings[i]["null_diff"] + nxt) / 2  # halfway to the next question
    return threshold


def answer_questions(model, tok, rows, cfg, ctx=None, threshold=0.0, progress=False):
    """Read and decide in one call: (score dict, predictions, readings), as `python evaluate.py` reports them."""
    readings = read(model, tok, rows, cfg["max_seq_len"], cfg["max_new_tokens"],
                    cfg.get("eval_batch_size") or cfg["batch_size"], ctx, progress)
    preds = decide(readings, threshold)
    return score(preds, [r["answers"] for r in rows], [r["context"] for r in rows]), preds, readings


def write_metrics(path, metrics):
    """metrics.json as strict JSON: a score over no questions (nan) is written as null, not as NaN."""
    import json
    import math

    def strict(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: strict(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [strict(x) for x in v]
        return v
    with open(path, "w") as f:
        json.dump(strict(metrics), f, indent=2)


# ----------------------------------------------------------------------------------------------------------------
# The command:
#   python evaluate.py --adapter=out/quickstart --data=data/persian_qa_heldout.jsonl [--limit=N] [--out=DIR]
# scores a base model, a base + adapter, or a merged model on a QA file, and writes every prediction down.

def main(argv=None):
    import json
    import os
    import sys
    import time

    from configurator import check_device, configure, resolve_dtype
    from model import Llama
    from sample import base_folder
    from tokenizer import Tokenizer

    settings = dict(
        init_from="",            # checkpoint folder; "" -> the adapter's base model, else the bundled SmolLM2
        adapter="",              # a LoRA adapter folder (a train.py out_dir), or "" for the model alone
        data="data/persian_qa_heldout.jsonl",
        limit=0,                 # score only the first N questions (0: all)
        out="",                  # where predictions.jsonl and metrics.json go; "" -> eval/<adapter or model name>
        quantize="none",         # "nf4": a 4-bit base, as QLoRA trains it
        max_seq_len=0,           # longest prompt; longer passages are read in windows. 0 -> what the adapter was
                                 # trained with (its config.json), else 1024
        max_new_tokens=48,
        batch_size=8,            # prompts read at once
        null_threshold="",       # abstain when log p(no answer) - log p(answer) is above it; "" -> the one
                                 # train.py chose on validation data (the adapter's metrics.json), else 0
        device="cuda" if torch.cuda.is_available() else "cpu",
        dtype="auto",            # auto: bfloat16 where this device computes it natively, else float32
    )
    cfg = configure(settings, argv)
    check_device(cfg["device"])
    base = base_folder(cfg["init_from"], cfg["adapter"])  # as sample.py and export.py find it
    trained = {}
    for name in ("config.json", "metrics.json") if cfg["adapter"] else ():  # how it was trained, the threshold
        path = os.path.join(cfg["adapter"], name)
        if os.path.exists(path):
            with open(path) as f:
                trained[name] = json.load(f)
    threshold = cfg["null_threshold"]
    if threshold == "":
        threshold = (trained.get("metrics.json") or {}).get("null_threshold") or 0.0
    if not isinstance(threshold, (int, float)):
        sys.exit(f"error: null_threshold must be a number, got {threshold!r}")
    max_len = cfg["max_seq_len"] or (trained.get("config.json") or {}).get("max_seq_len") or 1024
    try:
        rows, _ = data.load_qa_rows(cfg["data"])
        dtype = resolve_dtype(cfg["dtype"], cfg["device"])
        model = Llama.from_pretrained(base, dtype=dtype, device=cfg["device"],
                                      max_seq_len=max_len + cfg["max_new_tokens"] + 64,
                                      quantize=None if cfg["quantize"] == "none" else cfg["quantize"])
        if cfg["adapter"]:
            from lora import load_adapter
            load_adapter(model, cfg["adapter"])
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    rows = rows[:cfg["limit"]] if cfg["limit"] else rows
    tok = Tokenizer(base)
    out = cfg["out"] or os.path.join("eval", os.path.basename(os.path.normpath(cfg["adapter"] or base)))
    print(f"{len(rows)} questions from {cfg['data']}; {'adapter ' + cfg['adapter'] + ' on ' if cfg['adapter'] else ''}"
          f"{base} ({str(dtype).replace('torch.', '')}); prompts up to {max_len} tokens; null threshold {threshold:g}")

    t0 = time.time()
    try:
        s, preds, readings = answer_questions(model, tok, rows, {**cfg, "max_seq_len": max_len}, None, threshold,
                                              progress=True)
    except ValueError as e:  # a question so long that no window of passage fits next to it
        sys.exit(f"error: {e}")
    baseline = score([""] * len(rows), [r["answers"] for r in rows])  # what answering nothing at all scores
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "predictions.jsonl"), "w", encoding="utf-8") as f:
        for row, pred, rd in zip(rows, preds, readings):
            f.write(json.dumps({"id": row["id"], "question": row["question"], "answers": row["answers"],
                                "prediction": pred, "em": exact_match(pred, row["answers"]),
                                "f1": f1_score(pred, row["answers"]),
                                "found_in_passage": found_in_passage(pred, row["context"]),
                                "best_answer": rd["answer"], "null_diff": rd["null_diff"],
                                "window": rd["window"], "windows": rd["windows"]}, ensure_ascii=False) + "\n")
    metrics = {**s, "null_threshold": threshold, "always_no_answer": {"exact_match": baseline["exact_match"],
               "f1": baseline["f1"]}, "data": cfg["data"], "model": base, "adapter": cfg["adapter"],
               "max_seq_len": max_len, "seconds": round(time.time() - t0, 1)}
    write_metrics(os.path.join(out, "metrics.json"), metrics)
    print(summary(s))
    print(f"always answering 'no answer' scores F1 {baseline['f1']:.1f} here. "
          f"Predictions and metrics in {out}/ ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
