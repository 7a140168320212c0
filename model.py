"""
LLaMA, written out by hand.

A LLaMA is a decoder-only transformer, like GPT-2, with four changes that every model of the family keeps:
  1. RMSNorm instead of LayerNorm, applied *before* attention and MLP (pre-norm);
  2. rotary position embeddings (RoPE) applied to queries and keys, instead of learned positions;
  3. grouped-query attention: several query heads share one key/value head (Llama 2 70B, Llama 3, SmolLM2);
  4. a SwiGLU feed-forward: down(silu(gate(x)) * up(x)).
Module names follow Hugging Face's checkpoints exactly (model.layers.0.self_attn.q_proj, ...), so a state dict
loads without renaming and a LoRA adapter's keys are the module path plus ".lora_A.weight".

Reading order: ModelArgs -> RMSNorm -> rotary -> Attention (+ KV cache) -> MLP -> Block -> Llama -> loading.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelArgs:
    dim: int = 4096              # width of the residual stream
    n_layers: int = 32
    n_heads: int = 32            # query heads
    n_kv_heads: int = 32         # key/value heads; < n_heads means grouped-query attention
    head_dim: int = 0            # 0 -> dim // n_heads
    vocab_size: int = 32000
    hidden_dim: int = 11008      # width of the SwiGLU MLP
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = None    # Llama 3.1+: {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_seq_len: int = 4096      # longest sequence the rotary tables (and the KV cache) cover
    tie_embeddings: bool = False # output head shares the token embedding matrix (SmolLM2, Llama 3.2 1B/3B)

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")


# ----------------------------------------------------------------------------------------------------------------
# RMSNorm: scale each vector to unit root-mean-square, then by a learned gain. No mean subtraction, no bias.

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Squares of bf16 values overflow and lose precision, so the statistic is computed in fp32 and cast back.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Rotary embeddings. Each pair of dims (i, i + head_dim/2) of a query or key is rotated by an angle pos * freq_i.
# The dot product of a rotated query and key then depends only on their distance: relative positions for free.

def rope_frequencies(head_dim, theta, scaling=None):
    """The rotation speed of each dim pair: theta^(-2i/head_dim), optionally stretched as Llama 3.1 does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))  # (head_dim/2,)
    if scaling is None or scaling.get("rope_type", scaling.get("type")) in (None, "default"):
        return inv_freq
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        raise ValueError(f"unsupported rope_scaling {scaling}: only the 'llama3' type is implemented")
    # Llama 3.1 stretches the context 8x by slowing the low frequencies (long wavelengths) by `factor`,
    # keeping the high frequencies (local word order) as trained, and blending smoothly in between.
    factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)       # 0 at long wavelengths, 1 at short ones
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return torch.where(wavelen > old_len / lo, inv_freq / factor,     # long: fully scaled
                       torch.where(wavelen < old_len / hi, inv_freq, blended))  # short: untouched


def rope_cache(args, device=None):
    """cos and sin of every (position, frequency) angle, with each frequency repeated for both halves."""
    inv_freq = rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling).to(device)
    pos = torch.arange(args.max_seq_len, device=device).float()      # (T_max,)
    angles = torch.outer(pos, inv_freq)                               # (T_max, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)                      # (T_max, head_dim)
    return angles.cos(), angles.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)                                       # two halves of head_dim
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x, cos, sin):
    """x: (B, n_heads, T, head_dim); cos, sin: (T, head_dim). Rotates pair (i, i + head_dim/2) by its angle."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------------------------------------------
# Attention with grouped key/value heads and a preallocated KV cache for generation.

class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.cache_k = self.cache_v = None  # set by Llama.setup_cache for generation
        self.cache_pad = None               # (B,) padding tokens at the start of each cached row, if any

    def forward(self, x, cos, sin, start_pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, n_heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        mask, causal = None, T > 1 and not start_pos  # causal from position 0; one new token sees the whole cache
        if start_pos is not None:
            # Generation: write this step's keys/values into the cache, attend over everything cached so far.
            end = start_pos + T
            self.cache_k[:B, :, start_pos:end] = k
            self.cache_v[:B, :, start_pos:end] = v
            k, v = self.cache_k[:B, :, :end], self.cache_v[:B, :, :end]                # (B, n_kv_heads, end, hd)
            if start_pos > 0 and T > 1:
                # Several new tokens after a cached prefix: query i may see cached keys and new keys up to itself.
                mask = torch.ones(T, end, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
            if self.cache_pad is not None:
                # Prompts of different lengths, left-padded to end together: no query may read a padding key.
                # A padding position still reads itself, so that no softmax row is empty (that would be NaN).
                # Rotary angles only depend on the distance between query and key, so shifting a row's real
                # tokens right by its padding changes nothing.
                q_pos = torch.arange(start_pos, end, device=x.device)[:, None]           # (T, 1)
                k_pos = torch.arange(end, device=x.device)[None, :]                      # (1, end)
                real = k_pos >= self.cache_pad[:B, None, None, None]                     # (B, 1, 1, end)
                mask, causal = (k_pos <= q_pos) & (real | (k_pos == q_pos)), False       # (B, 1, T, end)
        # enable_gqa lets each group of n_heads / n_kv_heads query heads read the same key/value head,
        # without materialising repeated copies of k and v.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.n_kv_heads != self.n_heads)  # (B, n_heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)              # (B, T, n_heads*head_dim)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: a gated feed-forward. silu(gate(x)) decides, per hidden unit, how much of up(x) passes."""

    def __init__(self, args):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (B, T, hidden) -> (B, T, dim)


class Block(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, start_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------------------------

class Llama(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(args.vocab_size, args.dim),
            layers=nn.ModuleList(Block(args) for _ in range(args.n_layers)),
            norm=RMSNorm(args.dim, args.norm_eps),
        ))
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # The rotary tables are derived, not learned: not saved in the state dict (persistent=False).
        cos, sin = rope_cache(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False  # recompute each block in backward instead of storing its activations
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        # Only matters for tiny models trained from scratch in tests and lessons; real runs load weights.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx, start_pos=None):
        """idx: (B, T) token ids -> the final normalised hidden states (B, T, dim), before the output head.
        start_pos: generation only; the position of idx[:, 0] in the KV cache (see setup_cache)."""
        B, T = idx.shape
        p0 = start_pos or 0
        if p0 + T > self.args.max_seq_len:
            raise ValueError(f"sequence of {p0 + T} tokens is longer than max_seq_len={self.args.max_seq_len}")
        cos, sin = self.rope_cos[p0:p0 + T], self.rope_sin[p0:p0 + T]      # (T, head_dim)
        x = self.model.embed_tokens(idx)                                   # (B, T, dim)
        for layer in self.model.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x = layer(x, cos, sin, start_pos)
        return self.model.norm(x)                                          # (B, T, dim)

    def forward(self, idx, targets=None, start_pos=None):
        """
        idx: (B, T) token ids. targets: (B, T) next-token ids with -100 where there is no loss (prompt, padding).
        Without targets: returns (logits (B, T, vocab), None).
        With targets: the output head runs only at the positions that carry loss, because on a QA prompt most
        positions are context; returns (logits (N, vocab) of those N positions, mean cross-entropy over them).
        start_pos: generation only; the position of idx[:, 0] in the KV cache (see setup_cache).
        """
        x = self.hidden_states(idx, start_pos)                             # (B, T, dim)
        if targets is None:
            return self.lm_head(x), None
        keep = targets != -100                                             # (B, T) bool
        logits = self.lm_head(x[keep])                                     # (N, vocab)
        return logits, F.cross_entropy(logits.float(), targets[keep])      # the mean over those N positions

    # --- generation ----------------------------------------------------------------------------------------------

    def last_logits(self, idx, start_pos=None):
        """idx: (B, T) -> the logits of the last position only (B, vocab): they alone choose the next token, so the
        head (vocab x dim, the largest matrix of a small model) runs on one position per row, not the whole prompt."""
        return self.lm_head(self.hidden_states(idx, start_pos)[:, -1])

    def setup_cache(self, batch_size, max_len=None, dtype=None, device=None, n_pad=None):
        """Preallocate each layer's key/value cache once, so generation never reallocates or concatenates.
        n_pad: (batch_size,) padding tokens at the start of each row (see left_pad), hidden from attention."""
        ref = self.model.embed_tokens.weight
        shape = (batch_size, self.args.n_kv_heads, max_len or self.args.max_seq_len, self.args.head_dim)
        for layer in self.model.layers:
            attn = layer.self_attn
            attn.cache_k = torch.zeros(shape, dtype=dtype or ref.dtype, device=device or ref.device)
            attn.cache_v = torch.zeros(shape, dtype=dtype or ref.dtype, device=device or ref.device)
            attn.cache_pad = None if n_pad is None else n_pad.to(device or ref.device)

    def grow_cache(self, length):
        """Make room for `length` positions in every layer's cache, keeping what it holds (a chat: the cache grows
        with the conversation instead of being allocated for the whole context before the first word). It at least
        doubles, so a long conversation copies its cache a few times, not once per turn."""
        have = self.model.layers[0].self_attn.cache_k.shape[2]
        if length <= have:
            return
        new = min(max(length, 2 * have), self.args.max_seq_len)
        for layer in self.model.layers:
            attn = layer.self_attn
            for name in ("cache_k", "cache_v"):
                old = getattr(attn, name)                                      # (B, n_kv_heads, have, head_dim)
                room = old.new_zeros(old.shape[0], old.shape[1], new - have, old.shape[3])
                setattr(attn, name, torch.cat([old, room], dim=2))             # (B, n_kv_heads, new, head_dim)

    def clear_cache(self):
        for layer in self.model.layers:
            layer.self_attn.cache_k = layer.self_attn.cache_v = layer.self_attn.cache_pad = None

    @torch.inference_mode()  # no_grad, and no version counting either: less work per small op
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eos_id=None, n_pad=None,
                 start_pos=None):
        """
        Yields one (B, 1) tensor of new tokens per step. idx: (B, T) prompt. temperature 0 means greedy.
        The prompt goes through the model once (prefill); after that each step feeds only the newest token,
        and attention reads the earlier keys/values from the cache. Several prompts of different lengths
        go together as left_pad(prompts) -> (idx, n_pad): one pass over the weights serves every row.
        start_pos: continue a cache the caller made with setup_cache and keeps (a chat): its first start_pos
        positions already hold this conversation, idx are the tokens after them. The cache stays afterwards.
        """
        B, T = idx.shape
        own_cache = start_pos is None
        p0 = 0 if own_cache else start_pos
        total = min(p0 + T + max_new_tokens, self.args.max_seq_len)
        if own_cache:
            self.setup_cache(B, total, n_pad=n_pad)
        try:
            logits = self.last_logits(idx, start_pos=p0)                       # prefill: (B, vocab)
            done = torch.zeros(B, dtype=torch.bool, device=idx.device)
            for pos in range(p0 + T, total):
                nxt = sample_next(logits, temperature, top_k, top_p)            # (B, 1)
                yield nxt
                if eos_id is not None:
                    done |= nxt.squeeze(1) == eos_id
                    if bool(done.all()):
                        break
                if pos + 1 < total:
                    logits = self.last_logits(nxt, start_pos=pos)              # (B, vocab)
        finally:
            if own_cache:
                self.clear_cache()

    # --- loading ------------------------------------------------------------------------------------------------
    # Weight formats are convert.py's lesson, and convert.py imports this file at its top (it builds a Llama), so
    # these two ways in import convert when called: at import time the files depend one way only, convert -> model.

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", max_seq_len=None, quantize=None):
        """
        Load a checkpoint folder in Hugging Face layout (config.json + safetensors) or Meta's layout
        (params.json + consolidated.*). quantize="nf4" turns each linear layer into a 4-bit one as it is read
        (see quant.py), so a 7B model never sits in memory at 16 bits.
        """
        from convert import load_checkpoint
        return load_checkpoint(path, dtype=dtype, device=device, max_seq_len=max_seq_len, quantize=quantize)

    def save_pretrained(self, out_dir):
        """Write a Hugging Face-layout folder (config.json + model.safetensors); see convert.py: save_hf."""
        from convert import save_hf
        save_hf(self, out_dir)


def left_pad(prompts, pad_id):
    """Token-id lists of different lengths -> idx (B, T) with each prompt at the right end, and n_pad (B,)."""
    T = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
    return idx, torch.tensor([T - len(p) for p in prompts])            # n_pad (B,)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """logits: (B, vocab) -> (B, 1) next token ids. Greedy at temperature 0."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]  # (B, 1) the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)                                          # (B, vocab)
    if top_p is not None and top_p < 1.0:
        # Nucleus: keep the smallest set of most likely tokens whose probabilities sum to top_p.
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(-1) - sorted_p > top_p                       # mass before this token already > p
        sorted_p = sorted_p.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, num_samples=1)
