"""
Reading a passage to answer a question, or to abstain: what a generative model says, ready for SQuAD v2 scoring.

A model fine-tuned on our data answers with a span copied from the passage, or writes the no-answer phrase
(data.NO_ANSWER). Greedy decoding would let the FIRST token choose between the two, and the phrase's first token
starts a third of all training answers while real answers spread over many (lesson 14b counts them), so greedy
decoding abstains too easily. SQuAD v2 systems compare two whole scores instead, the best answer's and the
no-answer one's, and abstain when

    null_diff = log p(no-answer phrase) - log p(best answer)  >  threshold.

Both scores come out of one batched reading of each prompt (_read_batch):
  1. the no-answer phrase is fed in (teacher forcing): its log-probability, and at each of its tokens the most
     probable token that leaves it;
  2. the best answer leaves the phrase where that is most probable, then continues greedily to its end of turn.
Step 2 is the best answer that is not the no-answer phrase, up to one greedy choice per token. A passage longer
than the prompt allows is read in overlapping windows, and the window most sure of an answer speaks for it: each
question gets one candidate, its best answer and that answer's null_diff (read_passages).

The threshold is chosen during training on validation questions, where the right decision is known: the one
with the best F1 (report.py: choose_threshold), stored in the adapter's metrics.json. `python evaluate.py` uses it,
untouched, on test questions (abstain_above).

Reading order: reading_windows -> the two scores (_no_answer_ids, _read_batch, which reads each passage once for all
its questions: prefix_cache.py) -> read_passages -> abstain_above -> answer_questions.
"""

import functools
from contextlib import nullcontext

import torch

import data
from prefix_cache import prefill_shared
from windows import first_guess, shrink_to_fit, window_from


def reading_windows(tok, context, question, max_prompt_len, overlap=0.25):
    """
    The passage as overlapping windows, each fitting a prompt of at most max_prompt_len tokens with this question;
    [context] when it fits whole. Evaluation reads a long passage this way, one prompt per window, and keeps the
    most confident answer (read_passages): cutting the prompt instead would lose either the instructions (from the
    front) or part of the passage (from the end). Neighbours share about `overlap` of a window, so an answer cut
    by one window's edge is whole in the next.
    """
    if len(tok.encode_chat(data.qa_messages(context, question))) <= max_prompt_len:
        return [context]
    frame = data.prompt_frame(tok, question)
    budget = max_prompt_len - frame
    if budget < data.MIN_PASSAGE_TOKENS:
        raise ValueError(f"a prompt of {max_prompt_len} tokens leaves {budget} for the passage after the template "
                         f"and this question ({frame} tokens); allow longer prompts (max_seq_len)")
    n_chars = first_guess(tok, context, budget)  # once per passage: every window starts from it
    tokens_of = data.passage_tokens(tok, question, frame)  # a window's tokens in this question's prompt
    windows, start = [], 0
    while True:
        piece = shrink_to_fit(tokens_of, budget, n_chars, lambda size: window_from(context, start, size))
        end = start + len(piece)
        windows.append(piece.strip())
        if end >= len(context):
            return windows
        nxt = end - int(overlap * (end - start))
        space = context.find(" ", nxt, end)  # start after a space: no half word at the front
        start = space + 1 if space != -1 else nxt


def _no_answer_ids(tok):
    """The tokens the model writes to abstain, up to and including its end-of-turn token, and how many of them
    spell the phrase's first word: an answer may leave the phrase only there (see _read_batch)."""
    ids = tok.encode(data.completion_text(tok, data.qa_messages("", ""), data.NO_ANSWER))
    end = next(i for i, t in enumerate(ids) if t in tok.stop_ids)
    return ids[:end + 1], min(len(tok.encode(data.NO_ANSWER.split()[0])), end)


@functools.cache  # built once per tokenizer, vocabulary size and device
def _line_end_tables(tok, vocab, device):
    """Two (vocab,) masks: tokens whose text holds a newline, and tokens whose text holds something else than
    whitespace. Only the first line of an answer counts (first_line), so a row's reading can stop at
    the newline that ends its first non-empty line: what a rambling base model writes after it costs nothing."""
    texts = [tok.decode([i]) if i < tok.vocab_size else "" for i in range(vocab)]  # past the tokenizer's: neither
    return (torch.tensor(["\n" in t for t in texts], device=device),
            torch.tensor([bool(t.strip()) for t in texts], device=device))


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
        rest = model.lm_head(model.hidden_states(na[:, :-1], start_pos=T)).float().log_softmax(-1)  # (B, K-1, vocab)
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
                    attn = layer.self_attn
                    attn.cache_k, attn.cache_v = attn.cache_k[keep], attn.cache_v[keep]
                    attn.cache_pad = attn.cache_pad[keep]
            lp = model.last_logits(pick[:, None], start_pos=T + s).float().log_softmax(-1)
    finally:
        model.clear_cache()
    return [(out[b], ans_score[b].item(), na_score[b].item()) for b in range(B)]


def first_line(text):
    """What a reading says: its first non-empty line. Answers are short spans, and a model that does not stop cleanly
    may run on into a new question."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


@torch.no_grad()
def read_passages(model, tok, rows, max_prompt_len, max_new_tokens=48, batch_size=8, ctx=None, progress=False):
    """
    Read every question: its passage in windows (reading_windows) when the whole prompt is longer than
    max_prompt_len. Returns one candidate per row, a dict: "answer" (the best answer text over its windows),
    "null_diff" (log p(no answer) - log p(that answer), in the window most sure of an answer), "window" (its index)
    and "windows". Prompts go batch_size at a time, left-padded (model.py: left_pad): a decoding step reads every
    weight once, whatever the number of rows. The questions on one passage (window) go together, so the passage
    is read once for all of them (prefill_shared), and passages of similar length go together, so the padding
    stays short.
    """
    from tqdm import tqdm
    model.eval()
    prompts, owner, window_of = [], [], []
    for i, r in enumerate(rows):
        for w, text in enumerate(reading_windows(tok, r["context"], r["question"], max_prompt_len)):
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
        per_row[i].append({"answer": first_line(tok.decode(ids)), "null_diff": na_lp - ans_lp, "window": w})
    # the window most sure of an answer speaks for the passage
    return [dict(min(windows, key=lambda c: c["null_diff"]), windows=len(windows)) for windows in per_row]


def abstain_above(candidates, threshold):
    """Predictions: each question's candidate answer, or "" (abstain) where its null_diff > threshold."""
    return [c["answer"] if c["null_diff"] <= threshold else "" for c in candidates]


def answer_questions(model, tok, rows, cfg, ctx=None, threshold=0.0, progress=False):
    """Read and abstain in one call: (predictions, candidates), as `python evaluate.py` scores them."""
    candidates = read_passages(model, tok, rows, cfg["max_seq_len"], cfg["max_new_tokens"],
                               cfg.get("eval_batch_size") or cfg["batch_size"], ctx, progress)
    return abstain_above(candidates, threshold), candidates
