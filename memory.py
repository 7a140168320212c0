"""
Where the memory of a fine-tune goes, estimated before the run and measured during it (lesson 12).

A LoRA run holds the frozen weights, the trainable adapters with their gradients and Adam's two moments, and the
activations the forward pass keeps for the backward one. The first four follow from counting parameters; the
activations follow from what one transformer block keeps per token, which lesson 12 measures on our block, and for
a small adapter on a large batch they are the biggest part. memory_estimate adds up every part, as train.py
prints at the start of a run.

The measurement differs by device. On a GPU, torch counts what its tensors hold (max_memory_allocated): the
estimate's own terms, without the CUDA context. On a CPU only the whole process can be measured (its peak resident
set), so the estimate there starts with what the process holds before it loads anything, and glibc's malloc must be
kept from holding on to freed activations (give_back_freed_memory, trim_freed_memory), or the peak grows with
every step.
"""

import ctypes
import os
import resource

import torch

from lora import lora_layers


def memory_estimate(model, n_trainable, cfg, act_bytes, resident=0):
    """
    Bytes the run needs on the training device, from the transformer math of the notes:
      process      on a CPU, the process's resident memory before it loads anything (Python, torch's libraries):
                   measured, as no rule predicts it (a GPU's allocated memory holds none of it)
      weights      what the model holds (a 4-bit weight counts its packed bytes and its scales)
      lora         trainable parameters, fp32: 4 bytes each; their gradients another 4
      optimizer    Adam keeps two fp32 moments: 8 bytes per trainable parameter (paged: in CPU memory instead)
      activations  what one of our blocks keeps for backward per token per unit of width, measured in lesson 12 with
                   LoRA on every linear layer: 44 bytes under autocast, 34 for bf16 weights without it (the rule of
                   thumb's), 77 in fp32 (SDPA recomputes attention scores); with gradient checkpointing, each layer's
                   input plus one layer's full set while it is recomputed.
      lora_inputs  copies of their input that LoRA layers keep, T * B * (sum of their input widths) * bytes, one
                   layer's share with checkpointing. Under autocast (16-bit on a GPU) only dropout copies the input
                   (16-bit, plus a 1-byte mask); without autocast A and B are fp32, so next to 16-bit weights (bf16 on
                   a CPU) each keeps an fp32 copy, and dropout a dropped one (plus a 4-byte mask on a CPU).
    """
    args = model.args
    # Each storage once (a tied head is the embedding), trainable tensors excluded (they are the "lora" line).
    trainable = {p.untyped_storage().data_ptr() for p in model.parameters() if p.requires_grad}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
    weights = sum(n for ptr, n in storages.items() if ptr not in trainable)
    tokens = cfg["batch_size"] * cfg["max_seq_len"]
    on_gpu, dropout = str(cfg["device"]).startswith("cuda"), cfg["lora_dropout"] > 0
    autocast = on_gpu and act_bytes == 2                         # train.py's rule (train.py: mixed_precision)
    # Under autocast each RMSNorm keeps an fp32 copy of its input and autocast keeps its casts: 44, not 34.
    kept = 77 if act_bytes == 4 else (44 if autocast else 34)    # bytes per token per dim per layer (lesson 12)
    per_layer = kept * tokens * args.dim
    acts = (args.n_layers * tokens * args.dim * act_bytes + per_layer) if cfg["gradient_checkpointing"] \
        else args.n_layers * per_layer
    lora_in = sum(m.lora_A.in_features for _, m in lora_layers(model))  # all layers' LoRA input widths, summed
    mask = (1 if on_gpu else 4) if dropout else 0
    copy = (2 if dropout else 0) if autocast else (4 if dropout or act_bytes == 2 else 0)
    lora_inputs = tokens * lora_in * (copy + mask)
    est = {"process": resident} if resident else {}
    est |= {"weights": weights, "lora": 4 * n_trainable, "gradients": 4 * n_trainable,
           "optimizer": 0 if cfg["optimizer"] == "paged_adamw" else 8 * n_trainable, "activations": acts,
           "lora_inputs": lora_inputs / args.n_layers if cfg["gradient_checkpointing"] else lora_inputs}
    est["total"] = sum(est.values())
    return est


# -- the measurement ------------------------------------------------------------------------------------------------

def resident_memory():
    """The process's resident memory now, in bytes (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def peak_memory(device):
    """The most the run has held so far: allocated tensors on a GPU, the process's peak resident set on a CPU."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def give_back_freed_memory():
    """
    On a CPU, make freed tensors leave the process. glibc's malloc serves big blocks with mmap and unmaps them on
    free, but after the first such free it raises that threshold (up to 32 MiB) and later blocks come from the heap,
    which keeps freed memory for reuse: the measured peak then grows with every step's differently sized
    activations (5.9 GiB against 2.0 estimated in an earlier quickstart). A fixed 1 MiB threshold keeps the
    dynamic rule off, so the peak is what one step really holds (lesson 12 measures both). It costs time: every
    block of 1 MiB or more is mapped fresh, page by page. glibc's own MALLOC_MMAP_THRESHOLD_ in the environment
    (bytes) is the user's choice of that trade and is kept (README: "Time against memory").
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc (macOS, musl): nothing to set


def trim_freed_memory():
    """After each training step on a CPU: return the heap's free pages (glibc's malloc_trim). Blocks under the mmap
    threshold come from the heap, and batches of different lengths leave holes that later ones do not fill: without
    it the quickstart's resident memory between steps crept from 0.9 to 1.8 GiB over its 36 steps (bf16)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


# -- the device and the number format: where the run's bytes live, and how many each value takes ----------------

def torch_dtype(name):
    """A dtype setting ("bfloat16") -> the torch dtype, with the valid names in the error for anything else."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise SystemExit(f"error: dtype must be auto or one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]


def resolve_dtype(name, device):
    """dtype="auto": bfloat16 where the device computes it natively (a GPU from Ampere on; a CPU with AVX-512-BF16 or
    AMX, where oneDNN multiplies bf16 at about 3x fp32), else float32 (emulated bf16 is slower than fp32)."""
    if name != "auto":
        return torch_dtype(name)
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def check_device(name):
    """Fail early, in one line, on a device this machine does not have (instead of a traceback deep in torch)."""
    kind, _, index = str(name).partition(":")
    if kind == "cpu":
        return
    if kind != "cuda":
        raise SystemExit(f"error: device must be 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if not torch.cuda.is_available():
        raise SystemExit(f"error: device={name!r} but this PyTorch sees no CUDA GPU (a CPU-only build, or no driver); "
                         f"use --device=cpu")
    if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
        raise SystemExit(f"error: device={name!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s): "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")


def gib(n):
    return f"{n / 2**30:.2f} GiB"
