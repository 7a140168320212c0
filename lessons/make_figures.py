"""
Draw the course's figures into lessons/img/ (or --out_dir=DIR). Every number drawn comes from the course files.

  python lessons/make_figures.py
  python lessons/make_figures.py --run_dir=out/quickstart     # also the figures of a real run (null_diff.png)

rope.png         lesson 02: a RoPE pair rotating with position; each pair's wavelength, with llama3 scaling
nf4.png          lesson 08: the 16 NF4 levels against the normal density they were cut from
lora_shapes.png  lesson 07: W0 (d x k) beside B (d x r) and A (r x k), to scale
memory.png       lesson 12: Llama 2 7B training memory, full fine-tuning vs LoRA vs QLoRA
lifecycle.png    lesson 01: the stages of a fine-tuning project, the loop back to the data, and their lessons
llama_block.png  lesson 02: one decoder block; which query heads share which key/value head
loss_mask.png    lesson 05: a real prompt's tokens and targets, -100 everywhere but the answer (bundled tokenizer)
double_quant.png lesson 08: weights -> absmax per 64 -> 8-bit codes + a scale per 256, with bits per weight
grad_accum.png   lesson 11: micro-batches, gradient accumulation and optimizer steps on a timeline
tokens.png       lesson 04: one sentence in English and in Persian, cut into tokens by the bundled tokenizer
peft_attach.png  lesson 06: where each PEFT method puts its trainable weights in a decoder block
triton_grid.png  lesson 09: the programs of the dequantization kernel (1-D grid) and of the matvec kernel (2-D)
gguf_layout.png  lesson 16: the byte layout of the bundled GGUF file, read with the gguf package
null_diff.png    lesson 14b, from a run: the test questions' null_diff, answerable against unanswerable, and the
                 threshold chosen on validation (run_dir's test_predictions.jsonl and metrics.json)
The loss curve of lesson 15 is not drawn here: it is the curve train.py wrote during a real run.
"""
import json
import math
import os
import sys

# -- settings (defaults; override with --key=value, see configurator.py) ------------------------------------------
out_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "img")  # where the figures go
run_dir = ""                 # a train.py out_dir: also draw the figures of that run (null_diff.png)
# -------------------------------------------------------------------------------------------------------------------
settings = {"out_dir": out_dir, "run_dir": run_dir}

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the course files

from model import rope_frequencies  # noqa: E402
from quant import NF4_TABLE, dequantize_nf4, quantize_nf4  # noqa: E402

DPI = 90  # small PNGs: these are diagrams, not photographs


def rope(path):
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    # Left: the (x_i, x_{i + head_dim/2}) pair of a vector, rotated to positions 0..11, for a fast and a slow pair.
    inv_freq = rope_frequencies(64, 10000.0)                          # (32,) radians per position
    for i, color in ((2, "tab:red"), (8, "tab:blue")):
        angles = torch.arange(12) * inv_freq[i]
        ax1.plot(torch.cos(angles), torch.sin(angles), "o-", color=color, ms=4,
                 label=f"pair {i}: {inv_freq[i]:.3f} rad / position")
        for p in (0, 1, 2):
            ax1.annotate(f"pos {p}", (math.cos(angles[p]), math.sin(angles[p])), fontsize=7, color=color,
                         xytext=(4, 4), textcoords="offset points")
    ax1.add_patch(plt.Circle((0, 0), 1, fill=False, ls=":", color="gray"))
    ax1.set_aspect("equal")
    ax1.set_xlim(-1.3, 1.3)
    ax1.set_ylim(-1.3, 1.3)
    ax1.set_title("one (x_i, x_i+d/2) pair at positions 0..11")
    ax1.legend(fontsize=8, loc="lower left")
    # Right: wavelength of every pair of Llama 3 (head_dim 128, theta 500,000), plain and with llama3 scaling.
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    plain, scaled = rope_frequencies(128, 500000.0), rope_frequencies(128, 500000.0, scaling)
    ax2.semilogy(2 * math.pi / plain, ".-", label="Llama 3 (theta 500,000)")
    ax2.semilogy(2 * math.pi / scaled, ".-", label="Llama 3.1 llama3 scaling (factor 8)")
    for y, text in ((8192, "8,192: original context / low_freq_factor"), (2048, "2,048: / high_freq_factor")):
        ax2.axhline(y, color="gray", ls=":")
        ax2.text(1, y * 1.3, text, fontsize=8, color="gray")
    ax2.set_xlabel("pair index i")
    ax2.set_ylabel("wavelength (tokens per full turn)")
    ax2.set_title("long wavelengths slowed 8x, short ones kept")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def nf4(path):
    fig, ax = plt.subplots(figsize=(9, 3.6))
    # NF4 was cut from N(0, 1) squeezed so that its 96.8% quantile (about 1.848) lands on 1.0.
    scale = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.9677083)).item()
    x = torch.linspace(-1, 1, 801)
    density = torch.exp(-0.5 * (x * scale) ** 2) / math.sqrt(2 * math.pi) * scale
    ax.plot(x, density, color="black", lw=1.2, label=f"N(0, 1) rescaled by 1/{scale:.3f}")
    # Each value is rounded to the nearest level: the region between two midpoints is one level's bin.
    edges = [-1.0] + ((NF4_TABLE[:-1] + NF4_TABLE[1:]) / 2).tolist() + [1.0]
    for i in range(16):
        inside = (x >= edges[i]) & (x <= edges[i + 1])
        ax.fill_between(x[inside], density[inside], color="tab:red" if i % 2 else "salmon", alpha=0.35, lw=0)
    for i, level in enumerate(NF4_TABLE.tolist()):
        ax.plot([level, level], [0, 0.8], color="tab:red", lw=1, label="the 16 NF4 levels" if i == 0 else None)
    for i, level in enumerate(torch.linspace(-1, 1, 16).tolist()):
        ax.plot([level, level], [-0.07, -0.01], color="tab:blue", lw=1.5,
                label="16 evenly spaced levels (int4)" if i == 0 else None)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 1024, generator=g)
    packed, state = quantize_nf4(w)
    err = (dequantize_nf4(packed, state) - w).abs().mean()
    ax.set_title(f"NF4 levels sit where normal weights are dense (mean abs error on randn(1024, 1024): {err:.4f})",
                 fontsize=10)
    ax.set_xlabel("weight / absmax of its block of 64   (shaded: the values rounded to each level)")
    ax.set_ylim(-0.09, 0.85)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def lora_shapes(path):
    d, k, r = 64, 48, 4  # drawn to scale: a 64 x 48 weight and rank 4
    fig, ax = plt.subplots(figsize=(9, 4.2))

    def box(x, y, w, h, color, text):
        ax.add_patch(plt.Rectangle((x, y), w, h, facecolor=color, edgecolor="black"))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=10)

    box(0, 0, k, d, "#d9d9d9", "W0\nd x k\nfrozen")
    ax.text(k + 5, d / 2, "+", fontsize=22, ha="center", va="center")
    box(k + 10, 0, r, d, "#f4a582", "")
    ax.text(k + 10 + r / 2, -4, "B\nd x r\nstarts at 0", ha="center", va="top", fontsize=9)
    ax.text(k + 18, d / 2, "x", fontsize=16, ha="center", va="center")
    box(k + 22, d - r, k, r, "#92c5de", "")
    ax.text(k + 22 + k / 2, d - r - 2, "A   r x k   random init", ha="center", va="top", fontsize=9)
    ax.text(k + 22, d / 2 - 6,
            "h = W0 x + (alpha / r) B A x\n\n"
            f"drawn: d = {d}, k = {k}, r = {r}\nB + A: {r * (d + k)} weights, {100 * r * (d + k) / (d * k):.0f}% of W0\n\n"
            "Llama 2 7B's q_proj: d = k = 4096, r = 8\n"
            f"B + A: {8 * (4096 + 4096):,} weights, {100 * 8 * 8192 / 4096 ** 2:.2f}% of W0",
            ha="left", va="center", fontsize=9)
    ax.set_xlim(-2, 2 * k + 26)
    ax.set_ylim(-16, d + 4)
    ax.set_aspect("equal")
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def memory(path):
    # Llama 2 7B, 4 sequences x 1,024 tokens, LoRA r=32 on all linear layers: lesson 12's rules, in GB.
    dim, hidden, layers, n_total = 4096, 11008, 32, 6_738_415_616
    n_linear = layers * (4 * dim * dim + 3 * dim * hidden)
    n_lora = layers * 32 * (4 * (dim + dim) + 3 * (dim + hidden))
    tokens = 4 * 1024
    act_full = layers * 44 * tokens * dim                     # bytes: bf16 under autocast, as our block keeps
    act_ckpt = layers * 2 * tokens * dim + 44 * tokens * dim  # gradient checkpointing
    runs = {  # label: (frozen or full weights, trainable weights + gradients, optimizer states, activations)
        "full fine-tuning\n(bf16, AdamW, checkpointing)": (2 * n_total, 2 * n_total, 12 * n_total, act_ckpt),
        "LoRA, bf16 base\n(no checkpointing)": (2 * n_total, 8 * n_lora, 8 * n_lora, act_full),
        "LoRA, bf16 base\n(checkpointing)": (2 * n_total, 8 * n_lora, 8 * n_lora, act_ckpt),
        "QLoRA: NF4 base,\npaged AdamW, checkpointing": (4.127 / 8 * n_linear + 2 * (n_total - n_linear),
                                                       8 * n_lora, 0, act_ckpt),
    }
    parts = ("weights (frozen, or all of them)", "gradients (+ LoRA weights in fp32)", "optimizer states on the GPU",
             "activations")
    colors = ("#9e9e9e", "#f4a582", "#ca0020", "#92c5de")
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for row, (label, sizes) in enumerate(runs.items()):
        left = 0.0
        for part, size, color in zip(parts, sizes, colors):
            ax.barh(row, size / 1e9, left=left, color=color, label=part if row == 0 else None)
            left += size / 1e9
        ax.text(left + 1, row, f"{left:.1f} GB", va="center", fontsize=9)
    for gb in (16, 24, 40, 80):
        ax.axvline(gb, color="black", ls=":", lw=0.8)
        ax.text(gb, len(runs) - 0.45, f"{gb} GB", ha="center", fontsize=8)
    ax.set_yticks(range(len(runs)), list(runs), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("GB on the GPU (Llama 2 7B, batch 4 x 1,024 tokens, LoRA r=32 on all linear layers)")
    ax.legend(fontsize=8, loc="lower right")
    ax.set_xlim(0, 125)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _box(ax, x, y, w, h, text, fill="white", fontsize=9, **kw):
    """A rounded box with centred text; (x, y) is its lower-left corner."""
    from matplotlib.patches import FancyBboxPatch
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=fill, edgecolor=kw.pop("edgecolor", "black"), lw=kw.pop("lw", 1)))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, **kw)


def _arrow(ax, start, end, color="black", **kw):
    ax.annotate("", xy=end, xytext=start, arrowprops=dict(arrowstyle="-|>", color=color, lw=1.2, **kw))


def _residual_add(ax, x, y, below, above, r=0.2, fontsize=12):
    """A residual addition: '+' in a circle at (x, y), the stream coming in from `below` and leaving to `above`."""
    ax.add_patch(plt.Circle((x, y), r, facecolor="white", edgecolor="black"))
    ax.text(x, y, "+", ha="center", va="center", fontsize=fontsize)
    _arrow(ax, (x, below), (x, y - 0.2))
    _arrow(ax, (x, y + r), (x, above))


def llama_block(path):
    # The tiny model of lesson 02: 8 query heads share 2 key/value heads, so each group has 4.
    from model import ModelArgs
    a = ModelArgs(dim=64, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=100, hidden_dim=172, max_seq_len=64)
    group = a.n_heads // a.n_kv_heads
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    fig, ax = plt.subplots(figsize=(11, 9.6))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 11.6)
    ax.axis("off")
    X, W = 0.3, 3.4                                                    # the main path: one column, bottom to top
    rows = [  # (y, text, color)
        (0.2, f"x   (B, T, dim={a.dim})", "white"),
        (1.2, "input_layernorm (RMSNorm)", "#fff2cc"),
        (2.2, "q_proj  k_proj  v_proj", "#dae8fc"),
        (3.2, "rotary on q and k (apply_rotary)", "#dae8fc"),
        (4.2, "causal attention per head\nsoftmax(q k^T / sqrt(head_dim)) v", "#dae8fc"),
        (5.2, "o_proj", "#dae8fc"),
        (6.7, "post_attention_layernorm (RMSNorm)", "#fff2cc"),
        (7.7, "gate_proj        up_proj", "#d5e8d4"),
        (8.7, "silu(gate) * up", "#d5e8d4"),
        (9.7, f"down_proj  (hidden_dim={a.hidden_dim} -> dim={a.dim})", "#d5e8d4"),
    ]
    for i, (y, text, color) in enumerate(rows):
        _box(ax, X, y, W, 0.6, text, color, fontsize=8.5)
        if i:
            _arrow(ax, (X + W / 2, rows[i - 1][0] + 0.62), (X + W / 2, y - 0.02))
    for y_from, y_plus, label in ((0.5, 6.05, "residual: x + attention"), (6.05 + 0.25, 10.75, "residual: x + mlp")):
        ax.plot([X + (0.0 if y_from < 1 else W / 2 - 0.2), X - 0.15], [y_from, y_from], color="gray", lw=1.5)
        ax.plot([X - 0.15, X - 0.15], [y_from, y_plus], color="gray", lw=1.5)
        ax.plot([X - 0.15, X + W / 2 - 0.2], [y_plus, y_plus], color="gray", lw=1.5)
        ax.text(X - 0.25, (y_from + y_plus) / 2, label, rotation=90, va="center", ha="right", fontsize=8, color="gray")
    _residual_add(ax, X + W / 2, 6.05, 5.82, 6.68)                    # the additions
    _residual_add(ax, X + W / 2, 10.75, 10.32, 11.4)
    ax.text(X + W / 2 + 0.1, 11.3, "to the next block (B, T, dim)", fontsize=8, va="center")
    ax.text(X + W + 0.1, 3.5, "self_attn\n(Attention)", fontsize=10, weight="bold", color="#1f4e79")
    ax.text(X + W + 0.1, 8.1, f"mlp  (SwiGLU MLP)\nhidden_dim = {a.hidden_dim}", fontsize=10, weight="bold",
            color="#2d6a2d")
    # The right side: which query head reads which key/value head.
    hx = 5.6
    ax.text(hx, 5.55, f"grouped-query attention: n_heads = {a.n_heads}, n_kv_heads = {a.n_kv_heads}, "
            f"head_dim = {a.head_dim}", fontsize=9.5, weight="bold")
    ax.text(hx, 5.35, f"q_proj: dim -> n_heads * head_dim = {a.n_heads * a.head_dim};  k_proj, v_proj: dim -> "
            f"n_kv_heads * head_dim = {a.n_kv_heads * a.head_dim}\n"
            f"q: (B, n_heads, T, head_dim);  k, v: (B, n_kv_heads, T, head_dim);  colour = the group", fontsize=8,
            va="top")
    for h in range(a.n_heads):
        c = colors[h // group]
        _box(ax, hx + 0.6 * h, 3.7, 0.5, 0.9, f"q\n{h}", c, fontsize=8, color="white")
    for g in range(a.n_kv_heads):
        c = colors[g]
        cx = hx + 0.6 * (g * group) + 0.6 * group / 2 - 0.3
        _box(ax, cx - 0.35, 1.6, 1.2, 0.9, f"k {g}   v {g}", c, fontsize=8, color="white")
        for h in range(g * group, (g + 1) * group):
            _arrow(ax, (cx + 0.25, 2.52), (hx + 0.6 * h + 0.25, 3.66), color=c)
    ax.text(hx, 1.2, f"query heads {', '.join(f'{g * group}-{(g + 1) * group - 1}' for g in range(a.n_kv_heads))} "
            f"read key/value head {', '.join(str(g) for g in range(a.n_kv_heads))}:\n"
            f"head h uses kv head h // (n_heads / n_kv_heads) = h // {group}  (repeat_interleave order)",
            fontsize=8, va="top")
    ax.text(hx, 0.35, "the KV cache keeps only the n_kv_heads heads: here 4x smaller than one per query head",
            fontsize=8, va="top", style="italic")
    ax.text(hx, 7.6, "SwiGLU:  down_proj( silu(gate_proj(x)) * up_proj(x) )\n"
            "silu(g) = g * sigmoid(g) opens or closes each hidden unit;\n"
            "the product lets it scale what up_proj carries", fontsize=8.5, va="top")
    ax.text(hx, 10.3, "one LLaMA block (model.py: Block); pre-norm: RMSNorm before each part,\n"
            "the residual stream itself is never normalised", fontsize=9, va="top")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


BUNDLED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "checkpoints",
                       "SmolLM2-135M-Instruct")


def loss_mask(path, row_id="pqs-0190", head=12, tail=42, per_line=28):
    # A real example: the bundled tokenizer, data.py's prompt and collate, the sample's shortest row.
    from data import collate, encode_example, load_qa_rows
    from tokenizer import Tokenizer
    tok = Tokenizer(BUNDLED)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rows, _ = load_qa_rows(os.path.join(root, "data", "persian_qa_sample.jsonl"))
    row = next(r for r in rows if r["id"] == row_id)
    prompt_ids, answer_ids = encode_example(tok, row, max_len=512)
    idx, targets = collate([(prompt_ids, answer_ids)], [0], pad_id=tok.eos_id)   # (1, T) each
    idx, targets = idx[0].tolist(), targets[0].tolist()
    T, n_prompt = len(idx), len(prompt_ids)

    def label(i):  # Persian glyphs do not render in the default font: plain-ASCII tokens as text, others as ids
        text = tok.decode([i])
        if text.startswith("<|"):
            return text
        text = text.replace("\n", "\\n").strip() or "' '"
        return text if text.isascii() and text.isprintable() else str(i)

    shown = list(range(head)) + [None] + list(range(T - tail, T))   # None: the cut
    lines = [shown[i:i + per_line] for i in range(0, len(shown), per_line)]
    fig, axes = plt.subplots(len(lines), 1, figsize=(13, 2.3 * len(lines) + 0.6))
    for ax, line in zip(axes, lines):
        for x, t in enumerate(line):
            if t is None:
                ax.text(x + 0.5, 0.5, f"...\n{T - tail - head}\npositions\n...", ha="center", va="center",
                        fontsize=7)
                continue
            answer_in, loss = t >= n_prompt, targets[t] != -100
            ax.add_patch(plt.Rectangle((x, 1), 1, 1, facecolor="#f4a582" if answer_in else "#e0e0e0",
                                       edgecolor="white"))
            ax.add_patch(plt.Rectangle((x, 0), 1, 1, facecolor="tab:red" if loss else "#bdbdbd",
                                       edgecolor="white"))
            ax.text(x + 0.5, 1.5, label(idx[t]), rotation=90, ha="center", va="center", fontsize=6.5)
            ax.text(x + 0.5, 0.5, str(targets[t]), rotation=90, ha="center", va="center", fontsize=6.5,
                    color="white" if loss else "black")
            ax.text(x + 0.5, 2.1, str(t), ha="center", va="bottom", fontsize=6, color="gray")
        ax.text(-0.2, 1.5, "idx[t]", ha="right", va="center", fontsize=8)
        ax.text(-0.2, 0.5, "targets[t]", ha="right", va="center", fontsize=8)
        ax.text(-0.2, 2.25, "t", ha="right", va="center", fontsize=7, color="gray")
        ax.set_xlim(-2.2, per_line)
        ax.set_ylim(-0.1, 2.6)
        ax.axis("off")
    first = n_prompt - 1                                          # predicts the first answer token
    line, x = divmod(shown.index(first), per_line)
    axes[line].annotate("the prompt's last position\npredicts the first answer token", (x + 0.5, 0),
                        xytext=(x - 4, -0.9), fontsize=7.5, ha="center", va="center",
                        arrowprops=dict(arrowstyle="-|>", color="tab:red"), annotation_clip=False)
    n_loss = sum(t != -100 for t in targets)
    fig.suptitle(f"row {row_id} of the bundled sample, tokenized for SmolLM2: {T} positions, {n_loss} with loss "
                 f"({100 * n_loss / T:.1f}%); Persian tokens shown by id\n"
                 f"grey: the prompt (system turn, passage, question, assistant header), target -100;  "
                 f"orange: the answer fed in;  red: the targets that carry loss (the answer, <|im_end|>, \\n)",
                 fontsize=8.5)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def double_quant(path):
    # The levels of quant.py's scheme, with the bits per weight measured by quant.py: bits_per_param.
    from quant import bits_per_param
    w = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))     # one Llama 2 7B q_proj
    packed, plain = quantize_nf4(w, double_quant=False)
    packed, dq = quantize_nf4(w, double_quant=True)
    b_plain, b_dq = bits_per_param(packed, plain), bits_per_param(packed, dq)
    bs, bs2, n = plain.blocksize, dq.nested_blocksize, w.numel()
    fig, ax = plt.subplots(figsize=(12, 6.2))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 6.6)
    ax.axis("off")

    def strip(y, n_cells, color, texts, x0=0.3, w=0.62, h=0.55):
        for i in range(n_cells):
            ax.add_patch(plt.Rectangle((x0 + i * w, y), w, h, facecolor=color, edgecolor="black", lw=0.8))
            ax.text(x0 + i * w + w / 2, y + h / 2, texts[i], ha="center", va="center", fontsize=7.5)

    # Level 1: the weights, in blocks of 64, each stored as 4-bit NF4 codes.
    ax.text(0.3, 6.35, f"1. the weight, flattened ({n:,} values of a 4096 x 4096 matrix), cut into blocks of {bs}",
            fontsize=9.5, weight="bold")
    strip(5.55, 12, "#d9d9d9", [f"block\n{j}" for j in range(11)] + ["..."])
    ax.text(8.0, 5.82, "each weight: a 4-bit NF4 code (w / absmax of its block)\n-> 4 bits per weight",
            fontsize=8.5, va="center")
    # Level 2: one fp32 absmax per block.
    ax.text(0.3, 5.05, f"2. one absmax per block: {n // bs:,} values (fp32 = 32 bits, shared by {bs} weights)",
            fontsize=9.5, weight="bold")
    strip(4.25, 12, "#f4a582", [f"a{j}" for j in range(11)] + ["..."])
    for j in range(3):
        _arrow(ax, (0.3 + j * 0.62 + 0.31, 5.53), (0.3 + j * 0.62 + 0.31, 4.83), color="gray")
    ax.text(8.0, 4.52, f"without double quantization, stop here:\n4 + 32/{bs} = {b_plain:.3f} bits per weight",
            fontsize=8.5, va="center", bbox=dict(facecolor="white", edgecolor="tab:red"))
    # Level 3: absmax minus their mean, in blocks of 256, as 8-bit codes with one fp32 scale each.
    ax.text(0.3, 3.7, f"3. double quantization: subtract offset = mean(absmax) = {dq.offset:.4f} (one fp32 per "
            f"matrix), cut a - offset into blocks of {bs2}", fontsize=9.5, weight="bold")
    for k, (x0, label) in enumerate(((0.3, f"absmax {0}..{bs2 - 1}"), (3.0, f"absmax {bs2}..{2 * bs2 - 1}"),
                                     (5.7, "..."))):
        ax.add_patch(plt.Rectangle((x0, 2.8), 2.5, 0.6, facecolor="#fddbc7", edgecolor="black"))
        ax.text(x0 + 1.25, 3.1, label if k < 2 else "...", ha="center", va="center", fontsize=8)
    ax.text(8.4, 3.1, f"{n // bs // bs2:,} blocks of {bs2} absmax values", fontsize=8.5, va="center")
    # Level 4: what is stored.
    ax.text(0.3, 2.3, f"4. stored: each absmax as an 8-bit code of the dynamic map (quant.py: dynamic_map_8bit), "
            f"and one fp32 scale per block of {bs2}", fontsize=9.5, weight="bold")
    for x0 in (0.3, 3.0):
        ax.add_patch(plt.Rectangle((x0, 1.35), 2.0, 0.6, facecolor="#92c5de", edgecolor="black"))
        ax.text(x0 + 1.0, 1.65, f"{bs2} x uint8 codes", ha="center", va="center", fontsize=8)
        ax.add_patch(plt.Rectangle((x0 + 2.0, 1.35), 0.5, 0.6, facecolor="#4393c3", edgecolor="black"))
        ax.text(x0 + 2.25, 1.65, "fp32\nscale", ha="center", va="center", fontsize=6.5, color="white")
    ax.text(5.95, 1.65, "...", fontsize=10, va="center")
    ax.text(0.3, 0.45, "dequantize:  absmax = code_map[code] * scale + offset,   then   w = NF4[nibble] * absmax",
            fontsize=9, family="monospace")
    ax.text(7.2, 1.3, f"with double quantization:\n4 + 8/{bs} + 32/({bs}*{bs2}) = {b_dq:.3f} bits per weight\n"
            f"(+ 32 bits of offset per matrix)", fontsize=8.5, va="center",
            bbox=dict(facecolor="white", edgecolor="tab:blue"))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def grad_accum(path, batch_size=4, grad_accum=4, steps=2):
    # Two optimizer steps of train.py's loop: grad_accum micro-batches of batch_size sequences each.
    fig, ax = plt.subplots(figsize=(12, 4.4))
    per_step = grad_accum + 1.3
    ax.set_xlim(-0.3, steps * per_step + 0.1)
    ax.set_ylim(-1.1, 3.5)
    ax.axis("off")
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]
    for s in range(steps):
        x0 = s * per_step
        for k in range(grad_accum):
            x, c = x0 + k, colors[k % len(colors)]
            # the micro-batch: batch_size sequences, through forward and backward
            for j in range(batch_size):
                ax.add_patch(plt.Rectangle((x + 0.08, 2.2 + j * 0.2), 0.84, 0.16, facecolor=c, alpha=0.55))
            ax.text(x + 0.5, 2.1, f"micro-batch {s * grad_accum + k + 1}\n{batch_size} sequences\n"
                    f"forward,\nbackward", ha="center", va="top", fontsize=7.5)
            # the gradient buffer after this backward: the sum so far
            for j in range(k + 1):
                ax.add_patch(plt.Rectangle((x + 0.2, -0.35 + j * 0.22), 0.6, 0.2, facecolor=colors[j], alpha=0.8))
            ax.text(x + 0.5, -0.45, f"p.grad:\nsum of {k + 1}", ha="center", va="top", fontsize=7.5)
        xs = x0 + grad_accum
        ax.add_patch(plt.Rectangle((xs + 0.1, -0.35), 1.0, 3.4, facecolor="#fff2cc", edgecolor="black"))
        ax.text(xs + 0.6, 1.35, f"step {s + 1}\n\nclip\ngradients\n\noptimizer\n.step()\n\nzero_grad()",
                ha="center", va="center", fontsize=8)
        ax.annotate("", xy=(x0 - 0.05, 3.2), xytext=(xs + 1.15, 3.2),
                    arrowprops=dict(arrowstyle="<->", color="black", lw=0.8))
        ax.text(x0 + (grad_accum + 1.1) / 2, 3.25,
                f"step {s + 1}: {grad_accum} x {batch_size} = {grad_accum * batch_size} sequences",
                ha="center", va="bottom", fontsize=8.5)
    fig.text(0.02, 0.03, f"batch_size={batch_size} (sequences per forward pass, per GPU), grad_accum={grad_accum}: "
             f"the gradients of {grad_accum} passes add up in p.grad, then one update, and zero_grad() empties the "
             f"buffer.\nThe global batch is {grad_accum} x {batch_size} = {grad_accum * batch_size} sequences, held "
             f"in memory {batch_size} at a time. With torchrun on N GPUs every GPU runs this on its own micro-batches "
             f"and the gradients are\nsummed across GPUs before the step: one step sees N x {grad_accum * batch_size}"
             f" sequences (batch_size * grad_accum * n_gpus).", fontsize=8.5, va="bottom")
    fig.subplots_adjust(left=0.01, right=0.99, top=0.98, bottom=0.2)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def lifecycle(path):
    # The stages of a fine-tuning project, each with the lessons that teach it.
    fig, ax = plt.subplots(figsize=(12, 4.6))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 4.8)
    ax.axis("off")
    top = [  # (text, lessons, colour)
        ("define the task\nnarrowly", "01", "#fff2cc"),
        ("pick a base model\nsize, licence, tokenizer", "02, 03, 04", "#fff2cc"),
        ("measure the base model\nzero-/few-shot prompting", "01, 14", "#fff2cc"),
        ("collect and clean data\nsplit by passage", "01, 05", "#d5e8d4"),
    ]
    bottom = [
        ("fine-tune\nLoRA / QLoRA", "06-13", "#dae8fc"),
        ("evaluate\nEM/F1, invented answers,\nforgetting", "14, 14b", "#dae8fc"),
        ("error analysis\ncategorise the misses", "14", "#dae8fc"),
    ]
    w, h = 2.5, 1.1
    for i, (text, lessons, color) in enumerate(top):
        x = 0.2 + i * 2.95
        _box(ax, x, 3.3, w, h, f"{text}\n(lesson {lessons})", color, fontsize=8.5)
        if i:
            _arrow(ax, (x - 0.43, 3.85), (x - 0.02, 3.85))
    for i, (text, lessons, color) in enumerate(bottom):
        x = 9.05 - i * 2.95
        _box(ax, x, 1.5, w, h, f"{text}\n(lesson {lessons})", color, fontsize=8.5)
        if i:
            _arrow(ax, (x + w + 0.43, 2.05), (x + w + 0.02, 2.05))
    _arrow(ax, (10.3, 3.28), (10.3, 2.62))                          # data -> fine-tune
    # error analysis feeds the data: the loop
    ax.annotate("", xy=(9.3, 3.28), xytext=(4.35, 2.62),
                arrowprops=dict(arrowstyle="-|>", color="tab:red", lw=1.5, connectionstyle="arc3,rad=0.05"))
    ax.text(5.3, 2.92, "fix the data, train again (the loop)", color="tab:red", fontsize=8.5, ha="center")
    _box(ax, 0.2, 0.1, 3.4, 1.1, "merge the adapter, quantize, deploy\n(lessons 07, 08, 15, 16)\nwatch real inputs: "
         "they feed the next round", "#e1d5e7", fontsize=8.5)
    _arrow(ax, (3.1, 1.48), (2.5, 1.23))                           # from error analysis once good enough
    ax.text(3.6, 1.3, "good enough", fontsize=8, color="gray")
    ax.text(4.0, 0.55, "the baseline (lesson 01, 14) is the bar the fine-tune must clear; "
            "lesson 15 runs the whole loop on Persian QA", fontsize=8.5, va="center", color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def tokens(path, english="The capital of Iran is Tehran.", persian="پایتخت ایران تهران است."):
    # The same sentence in both languages, cut by the bundled tokenizer (lesson 04). The tokenizer's offsets give
    # the characters each token covers; two tokens covering the same letter are its two UTF-8 bytes.
    from tokenizer import Tokenizer
    tok = Tokenizer(BUNDLED)
    fig, axes = plt.subplots(2, 1, figsize=(12, 4.4))
    for ax, text, rtl in ((axes[0], english, False), (axes[1], persian, True)):
        enc = tok.tk.encode(text, add_special_tokens=False)
        spans = enc.offsets                                              # (start, end) characters of each token
        n, words = len(spans), len(text.split())
        width = 11.6 / max(n, 10)
        for i, (start, end) in enumerate(spans):
            x = 11.8 - (i + 1) * width if rtl else 0.2 + i * width       # Persian reads right to left
            shared = [j for j in (i - 1, i + 1) if 0 <= j < n and spans[j][0] < end and start < spans[j][1]]
            label = text[start:end].strip() or "' '"
            if shared:                                                   # half a letter: one of its two bytes
                label += f"\nbyte {1 if shared[0] > i else 2}/2"
            word = text[:end].count(" ") if text[start] != " " else text[:start + 1].count(" ")
            color = ("#dae8fc", "#fff2cc")[word % 2] if not shared else "#f4a582"
            ax.add_patch(plt.Rectangle((x, 0.2), width * 0.94, 1.0, facecolor=color, edgecolor="black", lw=0.8))
            ax.text(x + width * 0.47, 0.7, label, ha="center", va="center", fontsize=9 if not shared else 7.5)
            ax.text(x + width * 0.47, 0.05, str(enc.ids[i]), ha="center", va="center", fontsize=6.5, color="gray")
        ax.text(0.2, 1.3, f"{'Persian' if rtl else 'English'}: {words} words -> {n} tokens "
                f"({n / words:.1f} per word)", fontsize=10, va="bottom")
        ax.text(11.8, 1.3, text, fontsize=12, va="bottom", ha="right")
        ax.set_xlim(0, 12)
        ax.set_ylim(-0.1, 1.6)
        ax.axis("off")
    fig.text(0.01, 0.01, "SmolLM2's byte-level BPE (the bundled tokenizer.json); each token's id below it. Colours "
             "alternate by word. Orange: a token holding one byte of a two-byte Persian letter,\nwhose two bytes "
             "this mostly English vocabulary never merged into one token.", fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def peft_attach(path):
    # Where each PEFT method of lesson 06 puts its trainable weights in one decoder block. The linear layers are
    # read from model.py's Llama, so the names are the real module names.
    from model import Llama, ModelArgs
    tiny = Llama(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=32, hidden_dim=128, max_seq_len=8))
    linears = [n.rsplit(".", 1)[-1] for n, m in tiny.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)]
    fig, ax = plt.subplots(figsize=(12, 7.2))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 9.9)
    ax.axis("off")
    lora, ia3, adapter, prefix, prompt = "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#1f77b4"
    X, W = 2.6, 3.2                                                    # the block's column
    rows = {"emb": (0.3, "token embeddings (B, T, dim)", "#f2f2f2"), "norm1": (1.2, "RMSNorm", "#fff2cc"),
            "qkv": (2.1, "   ".join(n for n in linears if n[0] in "qkv"), "#dae8fc"),
            "attn": (3.0, "attention", "#dae8fc"), "o": (3.9, "o_proj", "#dae8fc"),
            "norm2": (5.3, "RMSNorm", "#fff2cc"), "gate_up": (6.2, "   ".join(n for n in linears if n[0] in "gu"),
                                                              "#d5e8d4"),
            "act": (7.1, "silu(gate) * up", "#d5e8d4"), "down": (8.0, "down_proj", "#d5e8d4")}
    order = list(rows)
    for i, key in enumerate(order):
        y, text, color = rows[key]
        _box(ax, X, y, W, 0.55, text, color, fontsize=9)
        if i and key != "norm2":
            _arrow(ax, (X + W / 2, rows[order[i - 1]][0] + 0.57), (X + W / 2, y - 0.02))
    _residual_add(ax, X + W / 2, 4.8, 4.47, 5.28, r=0.18, fontsize=11)
    _residual_add(ax, X + W / 2, 8.95, 8.57, 9.45, r=0.18, fontsize=11)
    ax.text(X + W / 2 + 0.1, 9.55, "to the next block (x n_layers)", fontsize=8, color="gray")
    # LoRA (and AdaLoRA, LoHa, LoKr): an update beside every chosen linear layer
    for key in ("qkv", "o", "gate_up", "down"):
        y = rows[key][0]
        _box(ax, X + W + 0.15, y + 0.04, 0.6, 0.47, "B A", "white", fontsize=8.5, edgecolor=lora, lw=1.5, color=lora)
    # (IA)^3: vectors rescaling the keys and values, and the MLP's hidden units
    for key, text in (("attn", "keys, values"), ("act", "hidden units")):
        y = rows[key][0] + 0.27
        ax.add_patch(plt.Circle((X - 0.3, y), 0.2, facecolor="white", edgecolor=ia3, lw=1.5))
        ax.text(X - 0.3, y, "l", ha="center", va="center", color=ia3, fontsize=10)
        ax.text(X - 0.58, y, f"x {text}", ha="right", va="center", color=ia3, fontsize=8)
    # adapters: a bottleneck after the attention and after the MLP, before each residual addition
    for key, y_plus in (("o", 4.8), ("down", 8.95)):
        top = rows[key][0] + 0.57                                      # the layer's output h leaves here
        _box(ax, X + W + 1.0, y_plus - 0.3, 1.45, 0.5, "adapter\ndown, act, up", "white", fontsize=7.5,
             edgecolor=adapter, lw=1.5, color=adapter)
        _arrow(ax, (X + W - 0.4, top), (X + W + 0.98, y_plus - 0.15), color=adapter)
        _arrow(ax, (X + W + 0.98, y_plus + 0.1), (X + W / 2 + 0.2, y_plus + 0.02), color=adapter)
    # prefix tuning: learned keys and values in every layer's attention
    y = rows["attn"][0]
    _box(ax, X + W + 1.0, y, 1.45, 0.55, "virtual keys\nand values", "white", fontsize=7.5, edgecolor=prefix,
         lw=1.5, color=prefix)
    _arrow(ax, (X + W + 0.98, y + 0.27), (X + W + 0.02, y + 0.27), color=prefix)
    # prompt tuning, P-tuning, multitask prompt tuning: learned embeddings before the text, at the input only
    y = rows["emb"][0]
    _box(ax, 0.15, y, 1.95, 0.55, "virtual tokens", "white", fontsize=8.5, edgecolor=prompt, lw=1.5, color=prompt)
    _arrow(ax, (2.12, y + 0.27), (X - 0.02, y + 0.27), color=prompt)
    legend = [(lora, "LoRA (and AdaLoRA, LoHa, LoKr): an update B A\nbeside chosen linear layers (here: all).\n"
                     "Merges into the weights. Built in lora.py."),
              (ia3, "(IA)^3: vectors that rescale keys, values\nand the MLP's hidden units.\nMerges into "
                    "k_proj, v_proj, down_proj."),
              (adapter, "Adapters: a small bottleneck network after\nthe attention and after the MLP.\nRuns on "
                        "every request."),
              (prefix, "Prefix tuning: learned keys and values every\ntoken can attend to, in every layer.\nRuns "
                       "on every request."),
              (prompt, "Prompt tuning, P-tuning, multitask prompt\ntuning: learned input embeddings.\nEvery "
                       "request carries them.")]
    for i, (color, text) in enumerate(legend):
        y = 8.6 - i * 1.75
        ax.add_patch(plt.Rectangle((8.25, y + 0.2), 0.3, 0.3, color=color))
        ax.text(8.7, y + 0.35, text, fontsize=8.5, va="center")
    ax.text(8.25, 9.55, "where each method trains (lesson 06)", fontsize=10, weight="bold")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def triton_grid(path, n_bytes=5, bytes_per_program=2, N=67, K=201, M=3):
    # Lesson 09's two launches on its own small examples: the dequantization kernel's 1-D grid (5 packed bytes,
    # 2 per program) and the matrix-vector kernel's 2-D grid (a 67 x 201 weight), cut the way
    # kernels.py: matvec_triton cuts it under the interpreter.
    from kernels import programs_wanted

    def cdiv(a, b):
        return -(-a // b)
    block_n, block_k = 32, 64                                          # as kernels.py: matvec_triton sets them
    n_blocks, k_blocks = cdiv(N, block_n), cdiv(K, block_k)
    splits = max(1, min(k_blocks, cdiv(programs_wanted(torch.device("cpu")), n_blocks)))
    k_per_split = cdiv(k_blocks, splits) * block_k
    splits = cdiv(K, k_per_split)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5.6), gridspec_kw={"width_ratios": [1, 1.35]})
    # Left: one program per BYTES packed bytes; each byte becomes two weights, the high nibble first.
    programs = cdiv(n_bytes, bytes_per_program)
    for pid in range(programs):
        for lane in range(bytes_per_program):
            byte = pid * bytes_per_program + lane
            x, real = byte * 1.0, byte < n_bytes
            ax1.add_patch(plt.Rectangle((x, 3), 0.9, 0.8, facecolor=colors[pid] if real else "white",
                                        alpha=0.6 if real else 1, edgecolor="black", hatch=None if real else "//"))
            ax1.text(x + 0.45, 3.4, f"byte {byte}" if real else "masked", ha="center", va="center", fontsize=7.5)
            for half in (0, 1):
                ax1.add_patch(plt.Rectangle((x + half * 0.45, 1.4), 0.43, 0.8,
                                            facecolor=colors[pid] if real else "white", alpha=0.35 if real else 1,
                                            edgecolor="black", hatch=None if real else "//"))
                if real:
                    ax1.text(x + half * 0.45 + 0.215, 1.8, f"w{2 * byte + half}", ha="center", va="center",
                             fontsize=7)
            if real:
                _arrow(ax1, (x + 0.45, 2.98), (x + 0.45, 2.22), color="gray")
        ax1.text(pid * bytes_per_program + bytes_per_program / 2 - 0.05, 4.05, f"program {pid}", ha="center",
                 fontsize=9, color=colors[pid], weight="bold")
    ax1.text(0, 4.6, f"1-D grid: cdiv({n_bytes} bytes, BYTES={bytes_per_program}) = {programs} programs",
             fontsize=10, weight="bold")
    ax1.text(0, 0.9, "each program: byte = pid * BYTES + arange(BYTES), masked past the end;\n"
             "two weights per byte, high nibble first (w0 = NF4[byte >> 4] * absmax)", fontsize=8.5, va="top")
    n, bpp = 11008 * 4096, 1024
    ax1.text(0, -0.2, f"the real launch: BYTES = {bpp}, so an 11,008 x 4,096 weight\n({n // 2:,} bytes) runs "
             f"{cdiv(n // 2, bpp):,} programs", fontsize=8.5, va="top")
    ax1.set_xlim(-0.2, programs * bytes_per_program + 0.2)
    ax1.set_ylim(-1.2, 5)
    ax1.axis("off")
    # Right: W (N x K) cut into BLOCK_N rows along grid axis 0 and slices of K along axis 1.
    sx, sy = 5.0 / K, 4.0 / N                                          # drawing units per column / per row
    for i in range(n_blocks):
        for j in range(splits):
            r0, c0 = i * block_n, j * k_per_split
            rows, cols = min(block_n, N - r0), min(k_per_split, K - c0)
            c = colors[(i * splits + j) % len(colors)]
            ax2.add_patch(plt.Rectangle((c0 * sx, 4 - (r0 + rows) * sy), cols * sx, rows * sy, facecolor=c, alpha=0.3,
                                        edgecolor="black"))
            ax2.text((c0 + cols / 2) * sx, 4 - (r0 + rows / 2) * sy, f"program ({i}, {j})", ha="center",
                     va="center", fontsize=8)
            for k in range(c0 + block_k, c0 + cols, block_k):          # the BLOCK_K chunks it walks
                ax2.plot([k * sx, k * sx], [4 - r0 * sy, 4 - (r0 + rows) * sy], ls=":", color="black", lw=0.8)
            if r0 + block_n > N:                                       # the last band hangs over the end: masked
                ax2.add_patch(plt.Rectangle((c0 * sx, 4 - (r0 + block_n) * sy), cols * sx, (r0 + block_n - N) * sy,
                                            facecolor="white", edgecolor="gray", hatch="//", ls="--"))
    ax2.text(K * sx / 2, 4.08, f"K = {K} inputs (columns of W)", ha="center", va="bottom", fontsize=8)
    ax2.text(-0.08, 2, f"N = {N} outputs (rows of W)", rotation=90, ha="right", va="center", fontsize=8)
    ax2.text(0, 5.45, f"2-D grid for y = x W^T, W ({N} x {K}), x ({M} x {K}): {n_blocks} x {splits} programs",
             fontsize=10, weight="bold")
    ax2.text(0, 4.4, f"axis 0: BLOCK_N = {block_n} output features each; axis 1: slices of {k_per_split} columns "
             f"of K,\nwalked in BLOCK_K = {block_k} chunks (dotted); hatched: rows past N, masked", fontsize=8.5,
             va="bottom")
    ax2.text(0, 4 - (n_blocks * block_n) * sy - 0.25,
             f"each program keeps an fp32 accumulator ({M} rows x {block_n} features) and stores it as a partial "
             f"sum;\nmatvec_triton adds the {splits} slices' partial sums in a fixed order, then rounds each output "
             f"once.\nUnder the interpreter programs_wanted() = {programs_wanted(torch.device('cpu'))}; on a GPU "
             "it is 4 per streaming\nmultiprocessor, so K is cut into more slices.", fontsize=8.5, va="top")
    ax2.set_xlim(-0.4, 5.4)
    ax2.set_ylim(-1.7, 5.7)
    ax2.set_aspect("auto")
    ax2.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def gguf_layout(path):
    # The byte layout of a real GGUF file: the bundled SmolLM2 (written by llama.cpp's converter; export.py writes
    # the same four parts). Every offset and count is read from the file with the gguf package.
    import gguf
    from collections import Counter
    from prepare import bundled_gguf_path
    r = gguf.GGUFReader(bundled_gguf_path())
    fields, size = r.fields, os.path.getsize(bundled_gguf_path())

    def nbytes(field):
        return sum(part.nbytes for part in field.parts)

    infos_start = min(t.field.offset for t in r.tensors)
    infos_end = max(t.field.offset + nbytes(t.field) for t in r.tensors)
    tokenizer_bytes = sum(nbytes(f) for name, f in fields.items() if name.startswith("tokenizer."))
    types = Counter(t.tensor_type.name for t in r.tensors)
    value = {name: f.contents() for name, f in fields.items() if not name.startswith("tokenizer.ggml.")}
    parts = [  # (name, first byte, end, colour, what it holds)
        ("header", 0, 24, "#f2f2f2",
         f"magic 'GGUF', version {value['GGUF.version']}, {value['GGUF.tensor_count']} tensors, "
         f"{value['GGUF.kv_count']} key/value pairs"),
        ("metadata: key/value pairs", 24, infos_start, "#fff2cc",
         f"general.architecture = {value['general.architecture']}, llama.block_count = {value['llama.block_count']}, "
         f"llama.embedding_length = {value['llama.embedding_length']},\nllama.attention.head_count = "
         f"{value['llama.attention.head_count']} (kv {value['llama.attention.head_count_kv']}), "
         f"llama.rope.freq_base = {value['llama.rope.freq_base']:g}, ... (config.json's role)\n"
         f"the tokenizer: tokenizer.ggml.model = {fields['tokenizer.ggml.model'].contents()}, pre = "
         f"{fields['tokenizer.ggml.pre'].contents()}, {len(fields['tokenizer.ggml.tokens'].data):,} tokens, "
         f"{len(fields['tokenizer.ggml.merges'].data):,} merges,\nbos/eos ids, tokenizer.chat_template: "
         f"{100 * tokenizer_bytes / (infos_start - 24):.1f}% of the metadata's bytes"),
        ("tensor infos", infos_start, infos_end, "#dae8fc",
         "per tensor: name, number of dims, dims (innermost first), type, offset into the data; e.g.\n"
         + "\n".join(f"  {t.name}  {t.shape.tolist()}  {t.tensor_type.name}  offset {t.data_offset - r.data_offset:,}"
                     for t in r.tensors[:3])),
        (f"padding to {r.alignment} bytes", infos_end, r.data_offset, "white",
         f"the data starts at a multiple of the alignment ({r.alignment}: general.alignment, or 32 when absent)"
         + ("; here the infos already end on one" if infos_end == r.data_offset else "")),
        ("tensor data", r.data_offset, size, "#d5e8d4",
         f"{len(r.tensors)} tensors, each aligned to {r.alignment} bytes so it can be memory-mapped and used in place:\n"
         + ", ".join(f"{n} in {t}" for t, n in types.most_common())
         + " (norms stay f32; a tied output head is not written)"),
    ]
    fig, ax = plt.subplots(figsize=(12, 6.4))
    ax.set_xlim(0, 12)
    ax.set_ylim(-0.3, 6.6)
    ax.axis("off")
    # left: the file to scale (the data dwarfs the rest); right: each part, not to scale
    ax.text(0.2, 6.35, f"{os.path.basename(bundled_gguf_path())}: {size / 1e6:.1f} MB", fontsize=10, weight="bold")
    ax.text(0.2, 6.05, "to scale", fontsize=8, color="gray")
    y_top, height = 5.8, 5.6
    for name, start, end, color, _ in parts:
        y0, y1 = y_top - height * start / size, y_top - height * end / size
        ax.add_patch(plt.Rectangle((0.3, y1), 0.6, y0 - y1, facecolor=color, edgecolor="black", lw=0.6))
    heights = [0.55, 1.45, 1.2, 0.45, 0.9]
    y = 5.95
    for (name, start, end, color, text), h in zip(parts, heights):
        y -= h + 0.15
        _box(ax, 1.6, y, 2.2, h, f"{name}\nfrom byte {start:,}\n{end - start:,} bytes", color, fontsize=8)
        ax.text(4.0, y + h / 2, text, fontsize=7.8, va="center", family="monospace" if name == "tensor infos"
                else None)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


FIGURES = {"rope.png": rope, "nf4.png": nf4, "lora_shapes.png": lora_shapes, "memory.png": memory,
           "llama_block.png": llama_block, "loss_mask.png": loss_mask,
           "double_quant.png": double_quant, "grad_accum.png": grad_accum, "lifecycle.png": lifecycle,
           "tokens.png": tokens, "peft_attach.png": peft_attach, "triton_grid.png": triton_grid,
           "gguf_layout.png": gguf_layout}


def null_diffs(path, run_dir):
    """How well a trained model's no-answer score separates the questions: each test question's null_diff, split by
    whether the question has an answer, and the threshold train.py chose on validation questions."""
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "test_predictions.jsonl"), encoding="utf-8")]
    threshold = json.load(open(os.path.join(run_dir, "metrics.json")))["null_threshold"]
    answerable = [r["null_diff"] for r in rows if r["answers"]]
    unanswerable = [r["null_diff"] for r in rows if not r["answers"]]
    lo, hi = math.floor(min(answerable + unanswerable)), math.ceil(max(answerable + unanswerable))
    bins = [lo + 0.5 * i for i in range(int((hi - lo) / 0.5) + 2)]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.hist(answerable, bins=bins, alpha=0.6, color="tab:blue", label=f"answerable ({len(answerable)})")
    ax.hist(unanswerable, bins=bins, alpha=0.6, color="tab:orange", label=f"unanswerable ({len(unanswerable)})")
    ax.axvline(threshold, color="black", ls="--", lw=1)
    ax.text(threshold, ax.get_ylim()[1] * 0.95, f" threshold {threshold:.2f}\n (chosen on validation)", va="top",
            fontsize=8)
    ax.set_xlabel("null_diff = log p(no answer) - log p(best answer)   (abstain to the right of the threshold)")
    ax.set_ylabel("test questions")
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)



def main(argv=None):
    from configurator import configure
    cfg = configure(settings, argv)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    made = {name: (draw, ()) for name, draw in FIGURES.items()}
    if cfg["run_dir"]:
        made["null_diff.png"] = (null_diffs, (cfg["run_dir"],))
    for name, (draw, extra) in made.items():
        draw(os.path.join(cfg["out_dir"], name), *extra)
        print(f"wrote {os.path.join(cfg['out_dir'], name)}")


if __name__ == "__main__":
    main()
