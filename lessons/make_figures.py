"""
Draw the course's figures into lessons/img/ (or --out DIR). Every number drawn comes from the course files.

  python lessons/make_figures.py

rope.png         lesson 02: a RoPE pair rotating with position; each pair's wavelength, with llama3 scaling
nf4.png          lesson 08: the 16 NF4 levels against the normal density they were cut from
lora_shapes.png  lesson 07: W0 (d x k) beside B (d x r) and A (r x k), to scale
memory.png       lesson 12: Llama 2 7B training memory, full fine-tuning vs LoRA vs QLoRA
The loss curve of lesson 15 is not drawn here: it is the curve train.py wrote during a real run.
"""
import argparse
import math
import os
import sys

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
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def lora_shapes(path):
    d, k, r = 64, 48, 4  # drawn to scale: a 64 x 48 weight and rank 4
    fig, ax = plt.subplots(figsize=(9, 4.2))

    def box(x, y, w, h, color, text):
        ax.add_patch(plt.Rectangle((x, y), w, h, facecolor=color, edgecolor="black"))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=10)

    box(0, 0, k, d, "#d9d9d9", f"W0\nd x k\nfrozen")
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
    act_full = layers * 34 * tokens * dim                     # bytes, 16-bit activations
    act_ckpt = layers * 2 * tokens * dim + 34 * tokens * dim  # gradient checkpointing
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


FIGURES = {"rope.png": rope, "nf4.png": nf4, "lora_shapes.png": lora_shapes, "memory.png": memory}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "img"))
    out = ap.parse_args(argv).out
    os.makedirs(out, exist_ok=True)
    for name, draw in FIGURES.items():
        draw(os.path.join(out, name))
        print(f"wrote {os.path.join(out, name)}")


if __name__ == "__main__":
    main()
