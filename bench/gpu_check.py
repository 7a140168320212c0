"""
Does config/persian_qa.py fit on your GPU, and how fast is it? One command, no 7B download:

    python bench/gpu_check.py                  # Llama 2 7B's shapes, random weights, on the GPU
    python bench/gpu_check.py --shape=tiny     # the same code on a tiny model (CPU is fine): what the tests run

The settings, each with what it means, are the block at the top of the code.

It builds a model of Llama 2 7B's shapes through the real loading path (convert.py: load_state_one_by_one, each
linear layer quantized to NF4 as its tensor arrives, so 16-bit weights never pile up), then trains it the way
config/persian_qa.py does: LoRA r=32 on every linear layer, dropout 0.1, gradient checkpointing, paged AdamW, bf16
autocast, micro-batches of 4 x 1,024 tokens, the loss on the last 64 tokens of each (the answer). It prints:
  - memory after loading (allocated on the GPU; resident set on a CPU), next to train.py's weights estimate;
  - peak allocated and reserved memory over the training steps, next to memory.py's memory_estimate total;
  - seconds per micro-batch (one forward and backward of batch_size sequences) and seconds per optimizer step
    (grad_accum micro-batches, then the update), and tokens per second; the first step, with its one-off costs,
    is not timed;
  - evaluation memory: the KV cache train.py's evaluation allocates (eval batch x (max_seq_len + max_new_tokens)
    positions, every layer's keys and values), and on a GPU the peak allocated while reading a full-length batch;
  - decoding: milliseconds per token of a greedy generation from the 4-bit model at batch 1 and at the evaluation
    batch, with kernels.py's fused 4-bit product and with dequantize-then-matmul (the fused kernel needs a GPU).
The weights are random, so the loss means nothing; the memory and the speed are those of the real run.
"""

import os
import sys
import time

import torch

# -- settings (defaults; override with --key=value or a config file, see configurator.py) -------------------------
shape = "7b"                 # "7b": Llama 2 7B's shapes; "tiny": 2 layers of width 64, the same code in seconds
device = "cuda" if torch.cuda.is_available() else "cpu"  # 7B shapes need a GPU; on "cpu", shape="tiny"
steps = 3                    # training steps; the first is not timed
seq_len = 0                  # tokens per sequence (0: config/persian_qa.py's max_seq_len)
new_tokens = 32              # tokens generated greedily per decoding timing
# -------------------------------------------------------------------------------------------------------------------
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # first, even if already there: "import train" is the root's train.py, not bench/train.py

import kernels  # noqa: E402
import quant  # noqa: E402
import train  # noqa: E402  (settings, optimizer_step: the run and the step train.py uses)
from memory import gib, memory_estimate, peak_memory  # noqa: E402  (the estimate train.py prints, and the measurement)
from configurator import configure  # noqa: E402
from convert import expected_shape, load_state_one_by_one  # noqa: E402
from lora import apply_lora  # noqa: E402
from model import Llama, ModelArgs  # noqa: E402
from optim import PagedAdamW  # noqa: E402

SHAPES = {
    # Llama 2 7B: 32 layers, width 4,096, 32 heads (no grouped-query attention at 7B), MLP 11,008, vocab 32,000
    "7b": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, hidden_dim=11008, vocab_size=32000),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160, vocab_size=256),
}


ANSWER_TOKENS = 64  # per sequence: the answer span and its end-of-turn token, longer than most PersianQA answers


def memory_now(device):
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated(device)
    return peak_memory(device)  # on a CPU: the process's peak resident set, all it can tell


def random_tensors(args, device, dtype):
    """(key, tensor) pairs in checkpoint order, as convert.py's readers yield them: made on the device, one at a
    time, so the model never holds more than one 16-bit matrix before it is quantized."""
    with torch.device("meta"):
        keys = list(Llama(args).state_dict())
    g = torch.Generator(device=device).manual_seed(0)
    for key in keys:
        if args.tie_embeddings and key == "lm_head.weight":  # a tied head is the embedding: not stored
            continue
        shape = expected_shape(key, args)
        if key.endswith("norm.weight"):
            yield key, torch.ones(shape, dtype=dtype, device=device)
        else:  # the scale of trained Llama weights: std about 0.02
            yield key, torch.randn(shape, generator=g, dtype=dtype, device=device) * 0.02


def main(argv=None):
    run = configure(settings, argv)  # this check's settings; cfg below: the training config it checks
    if run["shape"] not in SHAPES:
        sys.exit(f"error: shape must be one of {', '.join(SHAPES)}, got {run['shape']!r}")
    cfg = configure(train.settings, [os.path.join(ROOT, "config", "persian_qa.py"), f"--device={run['device']}"])
    if run["seq_len"]:
        cfg["max_seq_len"] = run["seq_len"]
    device, on_gpu = run["device"], run["device"].startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        sys.exit("error: --device=cuda but torch sees no CUDA GPU; use --shape=tiny --device=cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32  # bf16 on a CPU without native support would crawl
    eval_bs = cfg["eval_batch_size"] or cfg["batch_size"]           # train.py's rule
    longest = cfg["max_seq_len"] + 64 + max(cfg["max_new_tokens"], run["new_tokens"])  # train.py's + the decode test
    args = ModelArgs(**SHAPES[run["shape"]], max_seq_len=longest)
    print(f"{run['shape']} shapes on {device}, {dtype}: micro-batch {cfg['batch_size']} x {cfg['max_seq_len']} tokens, "
          f"{cfg['grad_accum']} micro-batches per optimizer step, "
          f"LoRA r={cfg['lora_r']} on {cfg['lora_targets']}, dropout {cfg['lora_dropout']}, "
          f"checkpointing {cfg['gradient_checkpointing']}, {cfg['optimizer']}")

    # -- load: the real quantize-while-loading path --------------------------------------------------------------
    t0 = time.time()
    model = load_state_one_by_one(args, random_tensors(args, device, dtype), dtype, device, quantize="nf4")
    apply_lora(model, r=cfg["lora_r"], alpha=cfg["lora_alpha"], dropout=cfg["lora_dropout"],
               targets=cfg["lora_targets"])
    model.gradient_checkpointing = cfg["gradient_checkpointing"]
    params = [q for q in model.parameters() if q.requires_grad]
    n_trainable = sum(q.numel() for q in params)
    est = memory_estimate(model, n_trainable, cfg, 2 if dtype != torch.float32 else 4)
    loaded = memory_now(device)
    print(f"loaded in {time.time() - t0:.1f} s: {gib(loaded)} {'allocated' if on_gpu else 'resident (process)'}; "
          f"estimate: weights {gib(est['weights'])} + LoRA {gib(est['lora'])}")

    # -- train: train.py's step, on random tokens -------------------------------------------------------------------
    opt = PagedAdamW(params, lr=cfg["learning_rate"], weight_decay=cfg["weight_decay"])
    ctx = torch.autocast("cuda", dtype=dtype) if on_gpu else torch.autocast("cpu", enabled=False)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    B, T = cfg["batch_size"], cfg["max_seq_len"]
    g = torch.Generator().manual_seed(1)
    micro_times, step_times = [], []

    def now():
        if on_gpu:
            torch.cuda.synchronize(device)  # the GPU runs behind the Python code: wait for it before reading a clock
        return time.perf_counter()

    model.train()
    for step in range(run["steps"]):
        t_step = now()
        for _ in range(cfg["grad_accum"]):  # train.py's micro-batches: gradients add up, one update at the end
            idx = torch.randint(args.vocab_size, (B, T), generator=g).to(device)        # (B, T)
            targets = torch.randint(args.vocab_size, (B, T), generator=g)               # (B, T)
            targets[:, :-ANSWER_TOKENS] = -100  # answer-only loss, as in QA: the logits of the answers only
            targets = targets.to(device)
            t = now()
            with ctx:
                _, loss = model(idx, targets)
            (loss / cfg["grad_accum"]).backward()
            if step > 0:  # the first step pays one-off costs (kernel compilation, allocator growth)
                micro_times.append(now() - t)
        train.optimizer_step(opt, params, cfg["grad_clip"])
        if step > 0:
            step_times.append(now() - t_step)
        print(f"step {step + 1}: loss {loss.item():.3f}, {now() - t_step:.2f} s")
    if on_gpu:
        peak, reserved = torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
        print(f"training: peak allocated {gib(peak)}, reserved {gib(reserved)}; estimate {gib(est['total'])}")
    else:
        print(f"training: peak resident {gib(peak_memory(device))} (the whole process); "
              f"estimate {gib(est['total'])}")
    if step_times:
        s_micro, s_step = sum(micro_times) / len(micro_times), sum(step_times) / len(step_times)
        print(f"speed: {s_micro:.3g} s per micro-batch ({B} x {T} tokens, forward + backward), "
              f"{s_step:.3g} s per optimizer step ({cfg['grad_accum']} micro-batches + update), "
              f"{B * T * cfg['grad_accum'] / s_step:.0f} tokens/s")

    # -- evaluation memory: train.py reads eval_bs prompts at once, with a KV cache for the prompt and the answer ----
    model.eval()
    L = cfg["max_seq_len"] + cfg["max_new_tokens"]
    prompt = torch.randint(args.vocab_size, (eval_bs, cfg["max_seq_len"]), generator=g).to(device)
    before = memory_now(device)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    model.setup_cache(eval_bs, L)                              # what generate() allocates for this batch
    kv = sum(t.nbytes for layer in model.model.layers for t in (layer.self_attn.cache_k, layer.self_attn.cache_v))
    with torch.no_grad(), ctx:
        for _ in model.generate(prompt, 2, temperature=0, start_pos=0):  # a full-length prefill, one decode step
            pass
    model.clear_cache()
    peak_eval = f"; peak {gib(torch.cuda.max_memory_allocated(device) - before)} allocated above the model while " \
                f"reading it" if on_gpu else " (peak: measured on a GPU only)"
    print(f"evaluation memory: KV cache {gib(kv)} ({kv / 2**20:.3f} MiB) for {eval_bs} x {L} positions{peak_eval}")

    # -- decode: greedy, from the 4-bit model: the fused kernel (GPU) against dequantize-then-matmul ----------------
    def ms_per_token(batch):
        prompt = torch.randint(args.vocab_size, (batch, 16), generator=g).to(device)
        with torch.no_grad(), ctx:
            for _ in model.generate(prompt, 2, temperature=0):  # warm-up: kernels compiled, cache allocated
                pass
            t = now()
            n = sum(1 for _ in model.generate(prompt, run["new_tokens"], temperature=0))
            return 1000 * (now() - t) / n

    for batch in dict.fromkeys((1, eval_bs)):  # one sequence (a chat), and the evaluation's batch
        fused = quant.FUSED_DEVICES                            # where Linear4bit uses kernels.py's fused product
        quant.FUSED_DEVICES = ()
        plain = ms_per_token(batch)
        quant.FUSED_DEVICES = fused
        if on_gpu and kernels.triton is not None:
            fast = ms_per_token(batch)
            print(f"decoding batch {batch}: fused {fast:.1f} ms/token, dequantize-then-matmul {plain:.1f} ms/token "
                  f"({plain / fast:.2f}x), {run['new_tokens']} tokens")
        else:
            print(f"decoding batch {batch}: {plain:.1f} ms/token ({run['new_tokens']} tokens; dequantize-then-matmul: "
                  f"the fused kernel needs a GPU and triton)")


if __name__ == "__main__":
    main()
