"""
Prefix caching: reading a passage once for all the questions asked about it.

A test file asks several questions about each passage (six in the held-out file), and the prompt puts the passage
(after the system prompt) before the question, so the prompts of one passage share a long first part and differ
only in a short tail. Their keys and values for that first part are the same numbers in every prompt but one:
rotary embeddings (model.py) rotate each key by its position, and left padding (model.py: left_pad) puts the same
token at a different position in rows of different lengths. So the shared part is computed once per passage, its
keys are rotated to where each row needs them (shift_keys), and only the tails are computed per question. answer.py
reads every batch this way; `python bench/reading.py` measures what it saves.
"""

import torch

from model import left_pad, rotate_half


def shift_keys(k, shift, cos_table, sin_table):
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
         same tokens now sit at another position, so the keys are rotated by the difference (shift_keys);
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
        return model.last_logits(idx.to(device), start_pos=0), T, n_pad
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
    model.hidden_states(idx_a.to(device), start_pos=0)
    kept = [(layer.self_attn.cache_k, layer.self_attn.cache_v) for layer in model.model.layers]
    # 2. copy into the rows: row i's prefix starts at n_pad[i] here and started at T_a - shared[i] in pass 1
    model.setup_cache(B, T + extra, n_pad=n_pad)
    src = torch.tensor([slot[g] for g in groups])                                      # (B,) its group's row
    shift = n_pad - (T_a - shared)                                                     # (B,)
    for layer, (k_a, v_a) in zip(model.model.layers, kept):
        k_rows = shift_keys(k_a[src], shift, model.rope_cos, model.rope_sin)           # (B, n_kv, T_a, head_dim)
        attn = layer.self_attn
        for i in range(B):  # positions [n_pad, T - L) of row i come from its prefix; pass 3 writes the rest
            s, n = int(n_pad[i]), T - L - int(n_pad[i])
            if n > 0:
                from_ = T_a - int(shared[i])
                attn.cache_k[i, :, s:s + n] = k_rows[i, :, from_:from_ + n]
                attn.cache_v[i, :, s:s + n] = v_a[src[i], :, from_:from_ + n]
    # 3. the tails: the last L tokens of every prompt (left-padded where a prompt is shorter than L)
    idx_b, _ = left_pad([p[-L:] for p in prompts], pad_id=0)                           # (B, L)
    return model.last_logits(idx_b.to(device), start_pos=T - L), T, n_pad
