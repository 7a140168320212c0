"""
Windows: the piece of a passage that fits a prompt's token budget.

A prompt has room for so many tokens of passage, but a passage is cut in characters, and how many characters a token
covers varies along a text (Persian letters, digits, Latin names and punctuation tokenize differently). So both kinds of
window are cut the same way: guess the length from the passage's own characters per token (first_guess), cut a
piece that long, count its tokens in the prompt, and while it is too long cut it again shorter (shrink_to_fit).
They differ in where the piece sits:

  training_window   data.py: fit_passage, one window per training example: anywhere, as long as it keeps the
                    gold answer whole (the model must never learn to answer from what it cannot see)
  window_from       answer.py: reading_windows, overlapping windows from the passage's start to its end: at
                    evaluation the whole passage must be read, and the answer is not known
"""

import itertools


def first_guess(tok, context, budget):
    """How many characters of `context` take about `budget` tokens: its own characters per token, a first guess."""
    return len(context) * budget // len(tok.encode(context))


def shrink_to_fit(tokens_of, budget, n_chars, cut, tries=None):
    """The first piece cut(n_chars), about n_chars characters long, that takes at most `budget` tokens (tokens_of:
    piece -> its tokens in the prompt, data.py: passage_tokens). n_chars starts at first_guess; a piece taking
    n > budget tokens is cut again n_chars * budget // n - 1 long. None when cut gives None or after `tries` misses
    (None: no limit; every miss shrinks the piece, and an empty piece fits).
    """
    for _ in itertools.count() if tries is None else range(tries):
        piece = cut(n_chars)
        if piece is None:
            return None
        n = tokens_of(piece)
        if n <= budget:
            return piece
        n_chars = n_chars * budget // n - 1
    return None


def training_window(context, n_chars, rng, span=None):
    """A piece of `context` at most n_chars long, cut at spaces. With span=(start, end) the piece contains
    context[start:end] whole; None if it cannot. The piece is placed at random (rng) among the positions
    that keep the span: a window always centred on the answer would teach the model that answers sit in the
    middle of what it reads, and at evaluation they sit anywhere.
    """
    if n_chars >= len(context):
        return context
    a, b = span or (len(context), 0)                              # no span: nothing to keep
    lo, hi = max(0, b - n_chars), min(len(context) - n_chars, a)  # where the window may start and hold [a, b)
    if lo > hi:
        return None
    s = rng.randint(lo, hi)
    e = s + n_chars
    # move both cuts inward to the nearest space, never into the span (nor past each other): no half words
    if s > 0 and not context[s - 1].isspace():
        nxt = context.find(" ", s)
        if nxt != -1 and nxt < min(a, e):
            s = nxt + 1
    if e < len(context) and not context[e].isspace():
        prv = context.rfind(" ", s, e)
        if prv >= max(b, s + 1):
            e = prv
    return context[s:e].strip()


def window_from(context, start, size):
    """context[start:start + size], ending at a space unless none is in its second half."""
    end = min(start + size, len(context))
    if end < len(context):
        cut = context.rfind(" ", start + size // 2, end)
        end = cut if cut != -1 else end
    return context[start:end]
