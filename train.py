"""
Fine-tune a LLaMA with LoRA or QLoRA on question answering.

    python train.py config/quickstart.py                 # bundled SmolLM2, bundled Persian sample, CPU, minutes
    python train.py config/persian_qa.py                 # Llama 2 7B chat, QLoRA, one 12 GB GPU
    python train.py config/quickstart.py --init_from=resume   # continue a run exactly where it stopped
    torchrun --nproc_per_node=4 train.py config/persian_qa.py  # several GPUs: data parallel

Every setting below can be overridden by a config file and then by --key=value (configurator.py).
"""

import math
import os
import random
import sys
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

# -- settings (defaults) -------------------------------------------------------------------------------------------
init_from = "checkpoints/SmolLM2-135M-Instruct"  # base model folder, or "resume" to continue the run in out_dir
hub_id = ""                 # where `python prepare.py --hub_id=...` gets init_from; named when the folder is missing
out_dir = "out/quickstart"
train_data = "data/persian_qa_sample.jsonl"  # a file, or a tuple of files read as one set
val_data = ""               # "" -> hold out val_fraction of train_data's passages
val_fraction = 0.15
val_limit = 0               # validate on the first N validation rows only (0: all)
test_data = ""              # held-out questions answered once at the end, with the threshold chosen on validation
test_limit = 0              # answer only the first N test questions (0: all)
# LoRA: W0 + (alpha / r) B A on the target layers; see lora.py
lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
lora_targets = "all-linear"  # or a tuple of names such as ("q_proj", "v_proj")
lora_modules_to_save = ()    # ("lm_head",) / ("embed_tokens",) to train those fully
use_rslora = False
quantize = "none"            # "nf4": 4-bit base weights with double quantization (QLoRA); see quant.py
# batches: one optimizer step sees batch_size * grad_accum * n_gpus sequences
batch_size = 8
grad_accum = 1
max_seq_len = 512
# optimizer and schedule: linear warmup, then cosine decay to min_lr_ratio * learning_rate
optimizer = "adamw"          # or "paged_adamw" (optim.py): Adam states in CPU memory, paged through the GPU
learning_rate = 2e-4
min_lr_ratio = 0.1
warmup_iters = 10
lr_decay_iters = 0           # 0 -> max_iters
weight_decay = 0.0
beta1, beta2 = 0.9, 0.999
grad_clip = 1.0              # 0 disables
max_iters = 0                # optimizer steps; 0 -> epochs * steps per epoch
epochs = 1
# evaluation and logging
eval_interval = 50           # validation loss (and a checkpoint) every this many steps
eval_generate = 32           # validation questions answered before and after training, for EM/F1 and for choosing
                             # the no-answer threshold (answer.py: choose_threshold); 0: none
eval_batch_size = 0          # prompts read at once; 0 -> batch_size (inference needs far less memory per row)
max_new_tokens = 32
wandb_log = False
wandb_project = "lora-course"
wandb_run_name = "run"
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "auto"               # bfloat16 where the device computes it natively (recent GPUs, AVX-512-BF16 CPUs), else float32
gradient_checkpointing = False
seed = 1337
# -------------------------------------------------------------------------------------------------------------------
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple))}

from configurator import configure  # noqa: E402
import data  # noqa: E402
from checkpoint import load_model, read_checkpoint, restore_rng, save_checkpoint  # noqa: E402
from lora import apply_lora, trainable_report  # noqa: E402
from memory import (check_device, give_back_freed_memory, gib, memory_estimate, peak_memory,  # noqa: E402
                    resident_memory, resolve_dtype, trim_freed_memory)
from optim import PagedAdamW  # noqa: E402
from report import global_val_loss, judge_base_model, plot_losses, validate_then_test, write_report  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

# Settings that decide the shapes and scale of the LoRA layers: a resumed run must keep them.
LORA_SHAPE = ("lora_r", "lora_alpha", "lora_targets", "lora_modules_to_save", "use_rslora")


def fail(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


# -- the phases main runs, in its order: settings, processes, model, data, optimizer -----------------------------------

def read_settings(argv):
    """Defaults < config file < --key=value (configurator.py); to resume, the saved run's. -> (cfg, state or None)"""
    cfg = configure(settings, argv)
    if cfg["init_from"] != "resume":
        return cfg, None
    state = read_checkpoint(cfg["out_dir"])
    overrides = {k: v for k, v in cfg.items() if v != settings[k] and k != "init_from"}
    for k in LORA_SHAPE:  # the saved A and B matrices only fit a model with the same LoRA layers
        if k in overrides and overrides[k] != state["config"].get(k, settings[k]):
            fail(f"cannot resume with {k}={overrides[k]!r}: the run in {cfg['out_dir']} was trained with "
                 f"{k}={state['config'].get(k, settings[k])!r}; drop --{k}, or start a new run in another out_dir")
    return {**settings, **state["config"], **overrides}, state  # the run's settings, plus what this command changes


def setup(cfg):
    """The device, and under torchrun the process group: every process trains on its own slice of each global batch
    (on GPUs each on its own GPU, written into cfg["device"]). Then the seeds. -> (ddp, rank, world)"""
    check_device(cfg["device"])
    if not cfg["device"].startswith("cuda"):
        give_back_freed_memory()
    ddp = int(os.environ.get("RANK", -1)) != -1
    rank, world = 0, 1
    if ddp:
        on_cuda = cfg["device"].startswith("cuda")
        if on_cuda:  # this process's GPU first, then the process group bound to it (NCCL's communicator lives there)
            cfg["device"] = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(cfg["device"])
        dist.init_process_group(backend="nccl" if on_cuda else "gloo",
                                device_id=torch.device(cfg["device"]) if on_cuda else None)
        rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    return ddp, rank, world


def build_model(cfg, state, master):
    """Base weights frozen (optionally 4-bit), LoRA matrices trainable (the saved ones on resume).
    -> (model, tokenizer, the dtype it computes in)"""
    base, device = cfg["init_from"], cfg["device"]
    if not os.path.isdir(base):
        hint = f"--hub_id={cfg['hub_id']}" if cfg["hub_id"] else "[--hub_id=<hub repo id>]"
        fail(f"base model folder {base!r} not found. Get it with: python prepare.py {hint}")
    ptdtype = resolve_dtype(cfg["dtype"], device)
    try:  # room for the longest prompt and its answer, plus a margin
        model, _ = load_model(base, "", cfg["quantize"], ptdtype, device,
                              max_seq_len=cfg["max_seq_len"] + 64 + cfg["max_new_tokens"])
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    tok = Tokenizer(base)
    apply_lora(model, r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
               targets=cfg["lora_targets"], use_rslora=cfg["use_rslora"],
               modules_to_save=tuple(cfg["lora_modules_to_save"]))
    model.gradient_checkpointing = cfg["gradient_checkpointing"]
    if state is not None:
        named = dict(model.named_parameters())
        for n, t in state["trainable"].items():
            named[n].data.copy_(t)
    if master:
        print(trainable_report(model))
    return model, tok, ptdtype


def data_parallel(model, device):
    """
    DDP broadcasts every parameter and buffer from rank 0 at start and watches them all: keep it to the trained
    ones. The frozen weights (4-bit bytes included; their scales are plain tensors DDP never sees) are the same
    on every rank by construction: each loads the same file and quantizes it the same deterministic way.
    """
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DDP = torch.nn.parallel.DistributedDataParallel
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DDP(model, device_ids=[device] if device.startswith("cuda") else None)


def load_data(cfg, tok):
    """-> (training and validation examples, the validation questions answered before and after, test questions)"""
    train_files = cfg["train_data"] if isinstance(cfg["train_data"], (tuple, list)) else (cfg["train_data"],)
    for path in (*train_files, cfg["val_data"], cfg["test_data"]):
        if path and not os.path.exists(path):
            fail(f"data file {path!r} not found" + (" (get PersianQA with: python prepare.py --data=persian_qa)"
                                                     if "persian_qa/" in path else ""))
    try:
        rows = [row for path in train_files for row in data.load_qa_rows(path)[0]]
        if cfg["val_data"]:
            train_rows, (val_rows, _) = rows, data.load_qa_rows(cfg["val_data"])
        else:
            train_rows, val_rows = data.split_rows(rows, cfg["val_fraction"], cfg["seed"])
        if not train_rows:
            raise ValueError(f"no training rows left after holding out val_fraction={cfg['val_fraction']}")
        val_rows = val_rows[:cfg["val_limit"]] if cfg["val_limit"] else val_rows
        train_ex = data.encode_rows(tok, train_rows, cfg["max_seq_len"], cfg["seed"], name="training examples")
        val_ex = data.encode_rows(tok, val_rows, cfg["max_seq_len"], cfg["seed"], name="validation examples")
        test_rows = data.load_qa_rows(cfg["test_data"])[0] if cfg["test_data"] else []
        test_rows = test_rows[:cfg["test_limit"]] if cfg["test_limit"] else test_rows
    except ValueError as e:
        fail(str(e))
    return train_ex, val_ex, val_rows[:cfg["eval_generate"]], test_rows


def count_steps(cfg, train_ex, world):
    """-> (steps per epoch, steps of the run). Under torchrun every process needs a share of every batch: whole
    batches only (drop_last), counted on the very list the loop walks (training_batches). Every epoch has as many:
    only the shorter batch is dropped, and there is one."""
    n_batches = len(data.make_batches(train_ex, cfg["batch_size"] * world, cfg["seed"], 0, drop_last=world > 1))
    if n_batches == 0:
        fail(f"{len(train_ex)} training examples do not fill one batch of {cfg['batch_size']} x {world} processes")
    steps_per_epoch = max(1, n_batches // cfg["grad_accum"])
    return steps_per_epoch, cfg["max_iters"] or cfg["epochs"] * steps_per_epoch


def build_optimizer(cfg, params, state):
    """AdamW or paged AdamW; resumed: its saved state, the random states, where it stopped. -> (opt, pos, history)"""
    decay = [p for p in params if p.dim() >= 2]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    Opt = PagedAdamW if cfg["optimizer"] == "paged_adamw" else torch.optim.AdamW
    if cfg["optimizer"] not in ("adamw", "paged_adamw"):
        fail(f"optimizer must be 'adamw' or 'paged_adamw', got {cfg['optimizer']!r}")
    opt = Opt(groups, lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]))
    if state is None:
        return opt, {"iter": 0, "epoch": 0, "batch": 0}, {"train": [], "val": [], "before": None, "after": None}
    opt.load_state_dict(state["optimizer"])
    restore_rng(state["rng"], cfg["device"])
    return opt, state["pos"], state["history"]


def mixed_precision(cfg, ptdtype, state):
    """Autocast on a GPU computing in 16 bits, and fp16's loss scaler. -> (context for the forward pass, scaler)"""
    device = cfg["device"]
    use_autocast = device.startswith("cuda") and ptdtype != torch.float32
    ctx = torch.autocast("cuda", dtype=ptdtype) if use_autocast else nullcontext()
    # fp16 has 5 exponent bits: gradients below 6e-8 become 0. The scaler multiplies the loss so they stay
    # representable and divides them back before the update; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(device.split(":")[0]) if ptdtype == torch.float16 else None
    if scaler is not None and state is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    return ctx, scaler


def get_lr(it, cfg, total):
    """Warmup protects the freshly initialised LoRA matrices from large first steps; cosine then anneals."""
    decay = cfg["lr_decay_iters"] or total
    if it < cfg["warmup_iters"]:
        return cfg["learning_rate"] * (it + 1) / cfg["warmup_iters"]
    progress = min(1.0, (it - cfg["warmup_iters"]) / max(1, decay - cfg["warmup_iters"]))
    low = cfg["min_lr_ratio"] * cfg["learning_rate"]
    return low + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg["learning_rate"] - low)


def optimizer_step(opt, params, grad_clip, scaler=None):
    """
    One update, or none when a gradient is inf or NaN: the step is then skipped and its gradients dropped, as
    torch.amp.GradScaler does, instead of writing inf/NaN into every trained weight. In fp16 the loss was
    multiplied by the scaler's scale before backward (small gradients would flush to zero in fp16 otherwise):
    unscale first, so clipping sees the true gradients. Returns whether the weights moved.
    """
    if scaler is not None:
        scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))  # inf: no clipping
    stepped = bool(torch.isfinite(norm))
    if scaler is not None:
        scaler.step(opt)   # skips by itself when unscale_ found inf/NaN...
        scaler.update()    # ...and then halves the scale for the next step (it grows back after 2000 good ones)
    elif stepped:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return stepped


def training_batches(examples, pos, cfg, rank, world, pad_id):
    """This process's share of each global batch, in order, epoch after epoch, each epoch in its own seeded order.
    pos (epoch, batch) advances with every batch taken, so a checkpoint saved between steps resumes at the next one."""
    while True:
        batches = data.make_batches(examples, cfg["batch_size"] * world, cfg["seed"], pos["epoch"], drop_last=world > 1)
        while pos["batch"] < len(batches):
            b = batches[pos["batch"]]
            pos["batch"] += 1
            mine = b[rank * cfg["batch_size"]:(rank + 1) * cfg["batch_size"]] if world > 1 else b
            yield data.collate(examples, mine, pad_id)
        pos["epoch"], pos["batch"] = pos["epoch"] + 1, 0


def main(argv=None):
    # -- setup: settings, device, processes, seeds ---------------------------------------------------------------------
    resident = resident_memory()  # before loading anything: the process itself (memory.py: memory_estimate)
    cfg, state = read_settings(argv)
    ddp, rank, world = setup(cfg)
    master, device = rank == 0, cfg["device"]

    # -- model ---------------------------------------------------------------------------------------------------------
    raw_model, tok, ptdtype = build_model(cfg, state, master)
    params = [p for p in raw_model.parameters() if p.requires_grad]
    model = data_parallel(raw_model, device) if ddp else raw_model

    # -- data ----------------------------------------------------------------------------------------------------------
    train_ex, val_ex, eval_rows, test_rows = load_data(cfg, tok)
    pad_id = tok.eos_id if tok.eos_id is not None else 0
    steps_per_epoch, max_iters = count_steps(cfg, train_ex, world)

    # -- optimizer -----------------------------------------------------------------------------------------------------
    opt, pos, history = build_optimizer(cfg, params, state)
    ctx, scaler = mixed_precision(cfg, ptdtype, state)
    os.makedirs(cfg["out_dir"], exist_ok=True)
    if master:
        est = memory_estimate(raw_model, sum(p.numel() for p in params), cfg, 2 if ptdtype != torch.float32 else 4,
                              0 if device.startswith("cuda") else resident)
        print("memory estimate: " + ", ".join(f"{k} {gib(v)}" for k, v in est.items()))
        print(f"{len(train_ex)} training and {len(val_ex)} validation examples; {steps_per_epoch} steps per epoch; "
              f"training for {max_iters} steps")
    if cfg["wandb_log"] and master:
        import wandb
        wandb.init(project=cfg["wandb_project"], name=cfg["wandb_run_name"], config=cfg)

    # -- before training: the base model's numbers, what training has to beat (a resumed run has them) -----------------
    if state is None:
        judge_base_model(raw_model, tok, val_ex, eval_rows, test_rows, history, cfg, pad_id, ctx, rank, world)

    # -- the loop ------------------------------------------------------------------------------------------------------
    from tqdm import tqdm
    bar = tqdm(total=max_iters, initial=pos["iter"], disable=not master, dynamic_ncols=True)
    batches = training_batches(train_ex, pos, cfg, rank, world, pad_id)
    model.train()
    t0, tokens_seen = time.time(), 0
    try:
        while pos["iter"] < max_iters:
            it = pos["iter"]
            lr = get_lr(it, cfg, max_iters)
            for g in opt.param_groups:
                g["lr"] = lr
            micro = [next(batches) for _ in range(cfg["grad_accum"])]
            # Normalise by the answer tokens of the whole global batch, so every token weighs the same however the
            # batch is cut into micro-batches and processes (a mean per micro-batch would not).
            n_tok = torch.tensor(float(sum(int((t != -100).sum()) for _, t in micro)), device=device)
            if ddp:
                dist.all_reduce(n_tok)
            step_loss = 0.0
            for k, (idx, targets) in enumerate(micro):
                idx, targets = idx.to(device), targets.to(device)
                sync = not ddp or k == len(micro) - 1
                with (nullcontext() if sync else model.no_sync()), ctx:
                    _, loss = model(idx, targets)
                    n = (targets != -100).sum()
                    # DDP averages gradients over processes; multiply by world so the result is the global sum
                    scaled = loss * n / n_tok * world
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                step_loss += scaled.item() / world
                tokens_seen += idx.numel()
            if ddp:  # the loss printed is the global one
                t = torch.tensor(step_loss, device=device)
                dist.all_reduce(t)
                step_loss = t.item()
            # After the all_reduce every process holds the same step_loss, NaN if any process's loss was: all
            # stop here together (a process stopping alone would leave the others waiting in the next all_reduce).
            if not math.isfinite(step_loss) and scaler is None:  # fp16 overflow is the scaler's to handle
                fail(f"loss is {step_loss} at step {it}. Stopped; the last good checkpoint is kept in "
                     f"{cfg['out_dir']}. Try a lower learning_rate (now {cfg['learning_rate']}) or grad_clip=1.0")
            stepped = optimizer_step(opt, params, cfg["grad_clip"], scaler)
            if not device.startswith("cuda"):
                trim_freed_memory()  # what the step freed leaves the process (memory.py)
            if not stepped:
                history["skipped"] = history.get("skipped", 0) + 1
                if master:
                    bar.write(f"step {it + 1}: a gradient is inf or NaN, update skipped"
                              + (f" (fp16 loss scale now {scaler.get_scale():g})" if scaler is not None else ""))
            pos["iter"] += 1
            history["train"].append((pos["iter"], step_loss))
            if master:
                tps = tokens_seen * world / (time.time() - t0)
                bar.set_postfix(loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}",
                                mem=gib(peak_memory(device)))
                bar.update(1)
                if cfg["wandb_log"]:
                    wandb.log({"train/loss": step_loss, "lr": lr, "tokens_per_s": tps}, step=pos["iter"])
            last = pos["iter"] == max_iters
            if pos["iter"] % cfg["eval_interval"] == 0 or last:
                vl = global_val_loss(raw_model, val_ex, cfg, pad_id, ctx, rank, world) if val_ex else float("nan")
                history["val"].append((pos["iter"], vl))
                if master:
                    bar.write(f"step {pos['iter']}: train loss {step_loss:.4f}, val loss {vl:.4f}")
                    if cfg["wandb_log"]:
                        wandb.log({"val/loss": vl}, step=pos["iter"])
                    save_checkpoint(raw_model, opt, cfg, pos, history, scaler)
                    plot_losses(history, os.path.join(cfg["out_dir"], "loss.png"))
                if ddp:
                    dist.barrier()
    except KeyboardInterrupt:
        if master:  # parameters and optimizer are consistent between steps: keep the progress
            bar.write(f"interrupted: saving step {pos['iter']} to {cfg['out_dir']} (continue with --init_from=resume)")
            save_checkpoint(raw_model, opt, cfg, pos, history, scaler)
        sys.exit(130)
    bar.close()

    # -- the report: the fine-tuned model on the validation questions, then once on the test questions -----------------
    history["after"], tuned = validate_then_test(raw_model, tok, eval_rows, test_rows, cfg, ctx, rank, world,
                                                 "after training")
    if master:
        write_report(cfg, history, test_rows, tuned, est)
    if ddp:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
