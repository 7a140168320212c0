"""
Greedy generation speed: our Llama with its preallocated KV cache (model.generate) against Hugging Face
transformers' generate, on the same checkpoint, prompt and number of new tokens.

    python bench/generate.py                    # bundled SmolLM2, fp32 on CPU (bf16 on a GPU)
    python bench/generate.py --smoke=True       # a few tokens, to check that it runs
    python bench/generate.py --quantize=nf4     # 4-bit linear layers on both sides (the reference: bitsandbytes)
    python bench/generate.py --init_from=DIR    # another checkpoint folder (Hugging Face layout)

The settings, each with what it means, are the block at the top of the code (and bench/common.py: SHARED_SETTINGS).

Both decode greedily (temperature 0 / do_sample=False) with end-of-sequence disabled, so both produce exactly
new_tokens tokens, and the script says whether the two token streams are identical (they should be: same model,
same arithmetic; a difference can only come from a near tie between two logits).
tokens/s = batch * new tokens / wall time of the whole call, prompt processing (prefill) included.
With quantize=nf4 every linear layer but the output head is NF4 with double quantization: ours through
Llama.from_pretrained(quantize="nf4") (on a GPU its decode steps take kernels.py's fused kernel), the reference
through transformers' BitsAndBytesConfig. The two quantize the same weights a little differently (bitsandbytes'
approximate absmax lookup on CPU), so their greedy tokens can part after a near tie.
Runs alternate ours, reference, ours, reference ... after one untimed warm-up each; medians are reported.
With profile=True the summary adds the reference's time per token divided by the time per token of our matrix
products and attention: the most any implementation doing our arithmetic could reach against this reference, here.
"""

import sys

import torch

import common

# -- settings (defaults; override with --key=value or a config file, see configurator.py) -------------------------
init_from = common.DEFAULT_CHECKPOINT  # checkpoint folder in Hugging Face layout (default: the bundled SmolLM2)
quantize = "none"            # "nf4": 4-bit linear layers on both sides (ours: quant.py; the reference: bitsandbytes)
batch_size = 1               # sequences generated together
prompt_tokens = 64           # random prompt tokens per sequence
new_tokens = 128             # tokens generated after the prompt, exactly (end of sequence is disabled on both sides)
reps = 3                     # timed runs per system, interleaved
profile = False              # CPU: also run our generation once under torch.profiler and report how much of it is
                             # matrix products and attention, the arithmetic no implementation can skip
# -------------------------------------------------------------------------------------------------------------------
settings = {**common.SHARED_SETTINGS,  # device, dtype, threads, seed, smoke: bench/common.py
            **{k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}}

from common import (Timer, check_checkpoint, check_choice, check_profile, machine_note, median,  # noqa: E402
                    pick_device, pick_dtype, products_share, set_threads, summary)
from configurator import configure  # noqa: E402


def load_ours(path, dtype, device, max_seq_len, quantize=None):
    from model import Llama
    return Llama.from_pretrained(path, dtype=dtype, device=device, max_seq_len=max_seq_len, quantize=quantize).eval()


def load_reference(path, dtype, device, quantize=None):
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if quantize == "nf4":
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype, device_map=device,
                                                              quantization_config=config).eval()
    else:
        model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    gc = model.generation_config
    gc.eos_token_id = None                         # never stop early: both sides make exactly new_tokens tokens
    gc.pad_token_id = 0                            # (only silences a warning; there is no padding)
    gc.temperature = gc.top_p = gc.top_k = None    # greedy: no sampling settings, no warnings about them
    return model


def generate_ours(model, prompt, new_tokens):
    return torch.cat(list(model.generate(prompt, new_tokens, temperature=0)), dim=1)  # (B, new_tokens)


@torch.no_grad()
def generate_reference(model, prompt, new_tokens):
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False)
    return out[:, prompt.shape[1]:]                                                  # (B, new_tokens)


def main(argv=None):
    cfg = configure(settings, argv)
    if cfg["smoke"]:
        cfg.update(prompt_tokens=8, new_tokens=4, reps=1)
    batch, prompt_tokens, new_tokens, reps = cfg["batch_size"], cfg["prompt_tokens"], cfg["new_tokens"], cfg["reps"]
    if min(batch, prompt_tokens, new_tokens, reps) < 1:
        sys.exit("error: batch_size, prompt_tokens, new_tokens and reps must be at least 1")
    check_choice("quantize", cfg["quantize"], ("none", "nf4"))
    check_checkpoint(cfg["init_from"])
    check_profile(cfg)
    set_threads(cfg["threads"])
    device = pick_device(cfg["device"])
    dtype = pick_dtype(cfg["dtype"], device)

    quantize = None if cfg["quantize"] == "none" else cfg["quantize"]
    ours = load_ours(cfg["init_from"], dtype, device, prompt_tokens + new_tokens, quantize)
    ref = load_reference(cfg["init_from"], dtype, device, quantize)
    g = torch.Generator().manual_seed(cfg["seed"])
    prompt = torch.randint(0, ours.args.vocab_size, (batch, prompt_tokens), generator=g).to(device)  # (B, P)
    print(f"generate: {cfg['init_from']}, {device}, {dtype}, linear layers {cfg['quantize']}, batch {batch}, "
          f"prompt {prompt_tokens} tokens, {new_tokens} new tokens, {reps} interleaved reps; {machine_note()}")

    generate_ours(ours, prompt, new_tokens)               # warm-up: first calls pay for allocation and dispatch setup
    generate_reference(ref, prompt, new_tokens)
    speed, tokens = {"ours": [], "reference": []}, {}
    for rep in range(reps):
        for name, model, fn in (("ours", ours, generate_ours), ("reference", ref, generate_reference)):
            with Timer(device) as t:
                tokens[name] = fn(model, prompt, new_tokens)                       # (B, new_tokens)
            speed[name].append(batch * new_tokens / t.seconds)
        print(f"  rep {rep}: ours {speed['ours'][-1]:.1f} tok/s, reference {speed['reference'][-1]:.1f} tok/s")

    if tokens["ours"].shape != tokens["reference"].shape:
        raise RuntimeError(f"ours made {tuple(tokens['ours'].shape)} tokens, the reference "
                           f"{tuple(tokens['reference'].shape)}")
    same = (tokens["ours"] == tokens["reference"]).all(dim=0)                         # (new_tokens,)
    if bool(same.all()):
        print("greedy tokens: identical")
    else:
        first = int((~same).nonzero()[0])
        why = ("the two 4-bit models round a few absmax values differently" if quantize else
               "after a near tie between two logits, both continuations are valid greedy outputs")
        print(f"greedy tokens: first difference at new token {first} of {new_tokens} ({why})")
    name = "generate_tokens_per_s" if quantize is None else f"generate_{quantize}_tokens_per_s"
    summary(name, median(speed["ours"]), median(speed["reference"]), "tok/s")
    if cfg["profile"]:
        products_s, profiled_s = products_share(lambda: generate_ours(ours, prompt, new_tokens))
        per_token = lambda seconds: seconds / (batch * new_tokens) * 1e3                   # ms per new token
        ref_ms = per_token(batch * new_tokens / median(speed["reference"]))
        print(f"profiled: {per_token(profiled_s):.1f} ms per token, of which matrix products and attention "
              f"{per_token(products_s):.1f} ms; the reference takes {ref_ms:.1f} ms per token unprofiled: no "
              f"implementation doing our arithmetic can be more than {ref_ms / per_token(products_s):.2f}x faster "
              f"here; ours is {median(speed['ours']) / median(speed['reference']):.2f}x")


if __name__ == "__main__":
    main()
