"""
LoRA and QLoRA fine-tuning speed and memory: our Llama + lora.apply_lora (+ quant's NF4 layers) against
Hugging Face transformers + PEFT (+ bitsandbytes 4-bit), on the same checkpoint, data, batch, sequence length,
LoRA settings, optimizer and loss.

    python bench/train.py                     # bundled SmolLM2, fp32 on CPU (bf16 on a GPU), LoRA and QLoRA
    python bench/train.py --mode=qlora --batch_size=4 --seq_len=256
    python bench/train.py --smoke=True        # one tiny step each, to check that it runs

The settings, each with what it means, are the block at the top of the code (and bench/common.py: SHARED_SETTINGS).

What is held equal:
  - data: random token batches from a fixed seed (the content does not change the speed);
  - loss: next-token cross-entropy averaged over the same positions, either the whole sequence (loss=full) or
    only the last answer_tokens of each row (loss=answer, like completion-only fine-tuning on QA). The two
    first-step losses are printed side by side: LoRA's B starts at zero, so both are the base model's loss and
    must agree to a few decimals, which shows both sides compute the same thing;
  - LoRA: r, alpha, dropout and target modules; adapters in fp32 on both sides; AdamW (torch's) on the adapters;
  - QLoRA: NF4, blocks of 64, double quantization, compute dtype = the model dtype; lm_head (tied to the
    embedding in SmolLM2) stays unquantized on both sides;
  - no gradient checkpointing unless gradient_checkpointing=True (then on both sides).
Speed: tokens/s = batch * seq_len * timed steps / their wall time, after `warmup` untimed steps; a step is
forward + backward + optimizer step.
Memory: each (system, mode, round) runs in a fresh Python process, so peaks never mix. On CPU, peak resident memory
(RSS) above the process's own RSS right after its imports: "load" while reading and building the model, "train"
over the steps (weights + activations + optimizer). On CUDA, torch.cuda.max_memory_allocated likewise.
Rounds alternate ours, reference, ours, reference ...; the summary reports medians.
With profile=True each worker times one more step under torch.profiler, and the summary adds the reference's step
time divided by the time of our step's matrix products and attention: the most any implementation doing our
arithmetic could reach against this reference, here.
"""

import json
import os
import sys

import torch

import common

# -- settings (defaults; override with --key=value or a config file, see configurator.py) -------------------------
init_from = common.DEFAULT_CHECKPOINT  # checkpoint folder in Hugging Face layout (default: the bundled SmolLM2)
mode = "both"                # "lora", "qlora" (4-bit base: quant.py against bitsandbytes), or "both"
batch_size = 2               # sequences per step
seq_len = 128                # tokens per sequence
steps = 3                    # timed steps per run
warmup = 1                   # untimed steps before them
reps = 2                     # runs per system and mode, interleaved
lora_r = 8                   # LoRA's rank: W0 + (lora_alpha / lora_r) B A on each target layer, on both sides
lora_alpha = 16
lora_dropout = 0.0           # on the adapters' input
lora_targets = "all-linear"  # or a tuple of module names such as ("q_proj", "v_proj")
learning_rate = 1e-4         # AdamW (torch's) on the adapters, on both sides
loss = "full"                # "full": every next token; "answer": only the last answer_tokens of each row
answer_tokens = 32           # loss="answer": the positions that carry the loss, at the end of each row
gradient_checkpointing = False  # on both sides
profile = False              # CPU: also run one more step under torch.profiler and report how much of it is matrix
                             # products and attention, the arithmetic no implementation can skip (see below)
worker = ""                  # internal: "ours" or "reference" runs that one system (and mode) in this process
# -------------------------------------------------------------------------------------------------------------------
settings = {**common.SHARED_SETTINGS,  # device, dtype, threads, seed, smoke: bench/common.py
            **{k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}}

from common import (Timer, check_checkpoint, check_choice, check_profile, machine_note, median,  # noqa: E402
                    peak_rss_mib, pick_device, pick_dtype, products_share, report_result, reset_peak_rss, rss_mib,
                    run_worker, set_threads, summary)
from configurator import configure  # noqa: E402

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # lora_targets="all-linear"
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}  # the header's name of a dtype


# --------------------------------------------------------------------------------------------------------------
# The two systems. Each returns the model, ready to train, and a function batch -> loss.

def build_ours(cfg, dtype, device):
    from lora import apply_lora
    from model import Llama
    model = Llama.from_pretrained(cfg["init_from"], dtype=dtype, device=device, max_seq_len=cfg["seq_len"],
                                  quantize="nf4" if cfg["mode"] == "qlora" else None)
    apply_lora(model, r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
               targets=list(cfg["lora_targets"]))
    model.gradient_checkpointing = cfg["gradient_checkpointing"]

    def loss_fn(idx, labels):
        # our targets are already shifted (targets[t] is the token after idx[t]); the last position has none
        targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)  # (B, T)
        return model(idx, targets)[1]
    return model, loss_fn


def build_reference(cfg, dtype, device):
    import transformers
    from peft import LoraConfig, get_peft_model
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    extra = {}
    if cfg["mode"] == "qlora":
        extra = dict(device_map=device, quantization_config=transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype))
    base = transformers.LlamaForCausalLM.from_pretrained(cfg["init_from"], dtype=dtype, **extra)
    if cfg["mode"] == "lora":
        base = base.to(device)
    if cfg["gradient_checkpointing"]:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(base, LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"],
                                            lora_dropout=cfg["lora_dropout"], target_modules=list(cfg["lora_targets"]),
                                            bias="none", task_type="CAUSAL_LM"))

    def loss_fn(idx, labels):
        # transformers shifts the labels itself: logits at t are scored against labels[t + 1]
        return model(input_ids=idx, labels=labels).loss
    return model, loss_fn


def make_batches(cfg, vocab_size, n):
    """n (idx, labels) pairs of shape (B, T); labels are -100 where no loss is taken."""
    g = torch.Generator().manual_seed(cfg["seed"])
    B, T = cfg["batch_size"], cfg["seq_len"]
    batches = []
    for _ in range(n):
        idx = torch.randint(0, vocab_size, (B, T), generator=g)                 # (B, T)
        labels = idx.clone()
        if cfg["loss"] == "answer":
            labels[:, :T - cfg["answer_tokens"]] = -100                         # prompt part: no loss
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


def measure(cfg):
    """Build one system (cfg["worker"]) for one mode, train it, and hand its numbers to the parent process."""
    set_threads(cfg["threads"])
    import_everything(cfg["worker"], cfg["mode"])
    device = pick_device(cfg["device"])
    dtype = pick_dtype(cfg["dtype"], device)
    batches = [(x.to(device), y.to(device)) for x, y in make_batches(cfg, vocab_size_of(cfg["init_from"]),
                                                                    cfg["warmup"] + cfg["steps"] + cfg["profile"])]
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        mem_now = lambda: torch.cuda.memory_allocated() / 2**20
        mem_peak = lambda: torch.cuda.max_memory_allocated() / 2**20
        mem_reset = torch.cuda.reset_peak_memory_stats
    else:
        mem_now, mem_peak, mem_reset = rss_mib, peak_rss_mib, reset_peak_rss
    base_mem = mem_now()  # after the imports and the data: what is left is the model and its training

    with Timer(device) as load:
        model, loss_fn = (build_ours if cfg["worker"] == "ours" else build_reference)(cfg, dtype, device)
    load_peak = mem_peak() - base_mem
    if mem_reset() is False:  # the kernel refused to reset the peak: "train" then includes loading
        print("note: cannot reset the peak RSS on this system; the train peak includes loading", file=sys.stderr)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["learning_rate"])

    def step(idx, labels):
        loss = loss_fn(idx, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    losses, seconds = [], []
    for i, (idx, labels) in enumerate(batches[:cfg["warmup"] + cfg["steps"]]):
        with Timer(device) as t:
            losses.append(step(idx, labels))
        if i >= cfg["warmup"]:
            seconds.append(t.seconds)
    train_peak = mem_peak() - base_mem  # read before the profiler, which holds memory of its own
    products_s, profiled_s = products_share(lambda: step(*batches[-1])) if cfg["profile"] else (None, None)
    report_result(dict(products_s=products_s, profiled_s=profiled_s,
        tokens_per_s=cfg["batch_size"] * cfg["seq_len"] * cfg["steps"] / sum(seconds),
        load_peak_mib=load_peak, train_peak_mib=train_peak, load_s=load.seconds,
        first_loss=losses[0], last_loss=losses[-1], trainable=sum(p.numel() for p in params)))


# --------------------------------------------------------------------------------------------------------------

def parse(argv):
    cfg = configure(settings, argv)
    if cfg["smoke"]:
        cfg.update(batch_size=1, seq_len=16, steps=1, warmup=0, reps=1, answer_tokens=4)
    for key, choices in (("mode", ("lora", "qlora", "both")), ("loss", ("full", "answer")),
                         ("worker", ("", "ours", "reference"))):
        check_choice(key, cfg[key], choices)
    if isinstance(cfg["lora_targets"], str):  # "all-linear", or one module name
        cfg["lora_targets"] = ALL_LINEAR if cfg["lora_targets"] == "all-linear" else (cfg["lora_targets"],)
    if min(cfg["batch_size"], cfg["seq_len"], cfg["steps"], cfg["reps"], cfg["lora_r"]) < 1 or cfg["warmup"] < 0:
        sys.exit("error: batch_size, seq_len, steps, reps and lora_r must be at least 1, warmup at least 0")
    check_profile(cfg)
    if cfg["loss"] == "answer" and not 1 <= cfg["answer_tokens"] < cfg["seq_len"]:
        sys.exit(f"error: answer_tokens must be between 1 and seq_len - 1 ({cfg['seq_len'] - 1})")
    return cfg


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = parse(argv)
    if cfg["worker"]:
        return measure(cfg)
    check_checkpoint(cfg["init_from"])
    set_threads(cfg["threads"])  # here only for the header's note; each worker sets its own
    device = pick_device(cfg["device"])
    dtype = pick_dtype(cfg["dtype"], device)
    loss = "every next token" if cfg["loss"] == "full" else f"last {cfg['answer_tokens']} tokens of each row"
    print(f"train: {cfg['init_from']}, {device}, {SHORT[dtype]}, batch {cfg['batch_size']} x {cfg['seq_len']} tokens, "
          f"LoRA r={cfg['lora_r']} alpha={cfg['lora_alpha']:g} dropout={cfg['lora_dropout']:g} on "
          f"{','.join(cfg['lora_targets'])}, loss on {loss}, {cfg['warmup']} warm-up + {cfg['steps']} timed steps, "
          f"{cfg['reps']} interleaved rounds{', gradient checkpointing' if cfg['gradient_checkpointing'] else ''}; "
          f"{machine_note()}", flush=True)
    for mode in ("lora", "qlora") if cfg["mode"] == "both" else (cfg["mode"],):
        runs = {"ours": [], "reference": []}
        for rep in range(cfg["reps"]):
            for system in runs:
                r = run_worker(os.path.abspath(__file__), argv + [f"--worker={system}", f"--mode={mode}"])
                runs[system].append(r)
                print(f"  {mode} round {rep} {system:9s}: {r['tokens_per_s']:8.1f} tok/s, peak MiB load "
                      f"{r['load_peak_mib']:7.1f} train {r['train_peak_mib']:7.1f}, load {r['load_s']:5.1f} s, "
                      f"loss {r['first_loss']:.4f} -> {r['last_loss']:.4f}, trainable {r['trainable']:,d}",
                      flush=True)
                if cfg["profile"]:
                    print(f"    profiled step: {r['profiled_s'] * 1e3:.0f} ms, of which matrix products and attention "
                          f"{r['products_s'] * 1e3:.0f} ms", flush=True)
        ours, ref = runs["ours"], runs["reference"]
        if ours[0]["trainable"] != ref[0]["trainable"]:
            print(f"warning: {mode}: trainable parameter counts differ ({ours[0]['trainable']:,d} vs "
                  f"{ref[0]['trainable']:,d}): the LoRA settings are not the same on both sides")
        med = lambda rs, key: median([r[key] for r in rs])
        summary(f"{mode}_first_step_loss", ours[0]["first_loss"], ref[0]["first_loss"], "nats", digits=4)
        summary(f"{mode}_train_tokens_per_s", med(ours, "tokens_per_s"), med(ref, "tokens_per_s"), "tok/s")
        summary(f"{mode}_train_peak_mem", med(ours, "train_peak_mib"), med(ref, "train_peak_mib"), "MiB")
        summary(f"{mode}_load_peak_mem", med(ours, "load_peak_mib"), med(ref, "load_peak_mib"), "MiB")
        if cfg["profile"]:
            ref_step = cfg["batch_size"] * cfg["seq_len"] / med(ref, "tokens_per_s")        # seconds, unprofiled
            floor = med(ours, "products_s")
            print(f"{mode}_products_floor: our matrix products and attention {floor * 1e3:.0f} ms per step, the "
                  f"reference's whole step {ref_step * 1e3:.0f} ms: no implementation doing our arithmetic can be "
                  f"more than {ref_step / floor:.2f}x faster here; ours is "
                  f"{med(ours, 'tokens_per_s') / med(ref, 'tokens_per_s'):.2f}x", flush=True)


if __name__ == "__main__":
    main()
