"""
LoRA and QLoRA fine-tuning speed and memory: our Llama + lora.apply_lora (+ quant's NF4 layers) against
Hugging Face transformers + PEFT (+ bitsandbytes 4-bit), on the same checkpoint, data, batch, sequence length,
LoRA settings, optimizer and loss.

    python bench/train.py                     # bundled SmolLM2, fp32 on CPU (bf16 on a GPU), LoRA and QLoRA
    python bench/train.py --modes qlora --batch 4 --seq-len 256
    python bench/train.py --smoke             # one tiny step each, to check that it runs

What is held equal:
  - data: random token batches from a fixed seed (the content does not change the speed);
  - loss: next-token cross-entropy averaged over the same positions, either the whole sequence (--loss full) or
    only the last --answer-tokens of each row (--loss answer, like completion-only fine-tuning on QA). The two
    first-step losses are printed side by side: LoRA's B starts at zero, so both are the base model's loss and
    must agree to a few decimals, which shows both sides compute the same thing;
  - LoRA: r, alpha, dropout and target modules; adapters in fp32 on both sides; AdamW (torch's) on the adapters;
  - QLoRA: NF4, blocks of 64, double quantization, compute dtype = the model dtype; lm_head (tied to the
    embedding in SmolLM2) stays unquantized on both sides;
  - no gradient checkpointing unless --grad-ckpt (then on both sides).
Speed: tokens/s = batch * seq_len * timed steps / their wall time, after --warmup untimed steps; a step is
forward + backward + optimizer step.
Memory: each (system, mode, round) runs in a fresh Python process, so peaks never mix. On CPU, peak resident memory
(RSS) above the process's own RSS right after its imports: "load" while reading and building the model, "train"
over the steps (weights + activations + optimizer). On CUDA, torch.cuda.max_memory_allocated likewise.
Rounds alternate ours, reference, ours, reference ...; the summary reports medians.
"""

import argparse
import json
import os
import sys

import torch

from common import (DEFAULT_CHECKPOINT, Timer, check_checkpoint, machine_note, median, peak_rss_mib, pick_device,
                    report_result, reset_peak_rss, rss_mib, run_worker, set_threads, summary)

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------------------------------------------
# The two systems. Each returns the model, ready to train, and a function batch -> loss.

def build_ours(a, dtype, device):
    from lora import apply_lora
    from model import Llama
    model = Llama.from_pretrained(a.checkpoint, dtype=dtype, device=device, max_seq_len=a.seq_len,
                                  quantize="nf4" if a.mode == "qlora" else None)
    apply_lora(model, r=a.r, alpha=a.alpha, dropout=a.dropout, targets=list(a.targets))
    model.gradient_checkpointing = a.grad_ckpt

    def loss_fn(idx, labels):
        # our targets are already shifted (targets[t] is the token after idx[t]); the last position has none
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)  # (B, T)
        return model(idx, targets)[1]
    return model, loss_fn


def build_reference(a, dtype, device):
    import transformers
    from peft import LoraConfig, get_peft_model
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    extra = {}
    if a.mode == "qlora":
        extra = dict(device_map=device, quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype))
    base = transformers.LlamaForCausalLM.from_pretrained(a.checkpoint, dtype=dtype, **extra)
    if a.mode == "lora":
        base = base.to(device)
    if a.grad_ckpt:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout,
                                            target_modules=list(a.targets), bias="none", task_type="CAUSAL_LM"))

    def loss_fn(idx, labels):
        # transformers shifts the labels itself: logits at t are scored against labels[t + 1]
        return model(input_ids=idx, labels=labels).loss
    return model, loss_fn


def make_batches(a, vocab_size, n):
    """n (idx, labels) pairs of shape (B, T); labels are -100 where no loss is taken."""
    g = torch.Generator().manual_seed(a.seed)
    batches = []
    for _ in range(n):
        idx = torch.randint(0, vocab_size, (a.batch, a.seq_len), generator=g)   # (B, T)
        labels = idx.clone()
        if a.loss == "answer":
            labels[:, :a.seq_len - a.answer_tokens] = -100                      # prompt part: no loss
        batches.append((idx, labels))
    return batches


def vocab_size_of(checkpoint):
    with open(os.path.join(checkpoint, "config.json")) as f:
        return json.load(f)["vocab_size"]


# --------------------------------------------------------------------------------------------------------------
# One system, one mode, in its own process.

def import_everything(system, mode):
    """Import what building the model will import, before the memory baseline is taken: library code (some
    300 MiB for transformers + PEFT) is a fixed cost, not memory that the model or its training uses."""
    if system == "ours":
        import lora, model, quant  # noqa: F401
        # Building our model on the "meta" device runs nn.init on meta tensors, which makes torch import its
        # compiler stack (torch._dynamo, sympy: ~70 MiB, ~2 s) on first use. transformers imports it anyway.
        import torch._dynamo  # noqa: F401
        return
    import peft  # noqa: F401
    import transformers
    from transformers.models.llama import modeling_llama  # noqa: F401  (the library loads it lazily)
    if mode == "qlora":
        import bitsandbytes  # noqa: F401
        from transformers.integrations import bitsandbytes as _  # noqa: F401
        from transformers.quantizers import quantizer_bnb_4bit  # noqa: F401


def worker(a):
    set_threads(a.threads)
    import_everything(a.worker, a.mode)
    device = pick_device(a.device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    batches = [(x.to(device), y.to(device)) for x, y in make_batches(a, vocab_size_of(a.checkpoint),
                                                                    a.warmup + a.steps)]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        mem_now = lambda: torch.cuda.memory_allocated() / 2**20
        mem_peak = lambda: torch.cuda.max_memory_allocated() / 2**20
        mem_reset = torch.cuda.reset_peak_memory_stats
    else:
        mem_now, mem_peak, mem_reset = rss_mib, peak_rss_mib, reset_peak_rss
    base_mem = mem_now()  # after the imports and the data: what is left is the model and its training

    with Timer(device) as load:
        model, loss_fn = (build_ours if a.worker == "ours" else build_reference)(a, dtype, device)
    load_peak = mem_peak() - base_mem
    if mem_reset() is False:  # the kernel refused to reset the peak: "train" then includes loading
        print("note: cannot reset the peak RSS on this system; the train peak includes loading", file=sys.stderr)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr)

    losses, seconds = [], []
    for i, (idx, labels) in enumerate(batches):
        with Timer(device) as t:
            loss = loss_fn(idx, labels)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i >= a.warmup:
            seconds.append(t.seconds)
    report_result(dict(
        tokens_per_s=a.batch * a.seq_len * a.steps / sum(seconds),
        load_peak_mib=load_peak, train_peak_mib=mem_peak() - base_mem, load_s=load.seconds,
        first_loss=losses[0], last_loss=losses[-1], trainable=sum(p.numel() for p in params)))


# --------------------------------------------------------------------------------------------------------------

def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="Hugging Face-layout folder (default: bundled)")
    p.add_argument("--modes", nargs="+", default=["lora", "qlora"], choices=["lora", "qlora"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda if available; the model runs in fp32 on CPU, bf16 on CUDA")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    p.add_argument("--reps", type=int, default=2, help="runs per system and mode, interleaved")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--targets", nargs="+", default=list(ALL_LINEAR))
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--loss", default="full", choices=["full", "answer"],
                   help="full: every next token; answer: only the last --answer-tokens of each row")
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing on both sides")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="one tiny step each: checks that it runs, times nothing")
    p.add_argument("--worker", choices=["ours", "reference"], help=argparse.SUPPRESS)  # internal: run one system
    p.add_argument("--mode", choices=["lora", "qlora"], help=argparse.SUPPRESS)        # internal: with --worker
    a = p.parse_args(argv)
    if a.smoke:
        a.batch, a.seq_len, a.steps, a.warmup, a.reps, a.answer_tokens = 1, 16, 1, 0, 1, 4
    if min(a.batch, a.seq_len, a.steps, a.reps, a.r) < 1 or a.warmup < 0:
        p.error("--batch, --seq-len, --steps, --reps and --r must be at least 1, --warmup at least 0")
    if a.loss == "answer" and not 1 <= a.answer_tokens < a.seq_len:
        p.error(f"--answer-tokens must be between 1 and --seq-len - 1 ({a.seq_len - 1})")
    return a


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if a.worker:
        return worker(a)
    check_checkpoint(a.checkpoint)
    set_threads(a.threads)  # here only for the header's note; each worker sets its own
    device = pick_device(a.device)
    loss = "every next token" if a.loss == "full" else f"last {a.answer_tokens} tokens of each row"
    print(f"train: {a.checkpoint}, {device}, {'bf16' if device == 'cuda' else 'fp32'}, batch {a.batch} x "
          f"{a.seq_len} tokens, LoRA r={a.r} alpha={a.alpha:g} dropout={a.dropout:g} on {','.join(a.targets)}, "
          f"loss on {loss}, {a.warmup} warm-up + {a.steps} timed steps, {a.reps} interleaved rounds"
          f"{', gradient checkpointing' if a.grad_ckpt else ''}; {machine_note()}", flush=True)
    for mode in a.modes:
        runs = {"ours": [], "reference": []}
        for rep in range(a.reps):
            for system in runs:
                r = run_worker(os.path.abspath(__file__), argv + ["--worker", system, "--mode", mode])
                runs[system].append(r)
                print(f"  {mode} round {rep} {system:9s}: {r['tokens_per_s']:8.1f} tok/s, peak MiB load "
                      f"{r['load_peak_mib']:7.1f} train {r['train_peak_mib']:7.1f}, load {r['load_s']:5.1f} s, "
                      f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}, trainable {r['trainable']:,d}",
                      flush=True)
        ours, ref = runs["ours"], runs["reference"]
        if ours[0]["trainable"] != ref[0]["trainable"]:
            print(f"warning: {mode}: trainable parameter counts differ ({ours[0]['trainable']:,d} vs "
                  f"{ref[0]['trainable']:,d}): the LoRA settings are not the same on both sides")
        med = lambda rs, key: median([r[key] for r in rs])
        summary(f"{mode}_first_step_loss", ours[0]["first_loss"], ref[0]["first_loss"], "nats", digits=4)
        summary(f"{mode}_train_tokens_per_s", med(ours, "tokens_per_s"), med(ref, "tokens_per_s"), "tok/s")
        summary(f"{mode}_train_peak_mem", med(ours, "train_peak_mib"), med(ref, "train_peak_mib"), "MiB")
        summary(f"{mode}_load_peak_mem", med(ours, "load_peak_mib"), med(ref, "load_peak_mib"), "MiB")


if __name__ == "__main__":
    main()
