"""
Greedy generation speed: our Llama with its preallocated KV cache (model.generate) against Hugging Face
transformers' generate, on the same checkpoint, prompt and number of new tokens.

    python bench/generate.py                  # bundled SmolLM2, fp32 on CPU (bf16 on a GPU)
    python bench/generate.py --smoke          # a few tokens, to check that it runs
    python bench/generate.py --quantize nf4   # 4-bit linear layers on both sides (the reference: bitsandbytes)

Both decode greedily (temperature 0 / do_sample=False) with end-of-sequence disabled, so both produce exactly
--new-tokens tokens, and the script says whether the two token streams are identical (they should be: same model,
same arithmetic; a difference can only come from a near tie between two logits).
tokens/s = batch * new tokens / wall time of the whole call, prompt processing (prefill) included.
With --quantize nf4 every linear layer but the output head is NF4 with double quantization: ours through
Llama.from_pretrained(quantize="nf4") (on a GPU its decode steps take kernels.py's fused kernel), the reference
through transformers' BitsAndBytesConfig. The two quantize the same weights a little differently (bitsandbytes'
approximate absmax lookup on CPU), so their greedy tokens can part after a near tie.
Runs alternate ours, reference, ours, reference ... after one untimed warm-up each; medians are reported.
"""

import argparse

import torch

from common import (DEFAULT_CHECKPOINT, Timer, add_common_args, check_checkpoint, machine_note, median, pick_device,
                    set_threads, summary)


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="Hugging Face-layout folder (default: bundled)")
    add_common_args(p, "auto: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3, help="timed runs per system, interleaved")
    p.add_argument("--quantize", default="none", choices=["none", "nf4"], help="nf4: 4-bit linear layers on both sides")
    a = p.parse_args(argv)
    if a.smoke:
        a.prompt_tokens, a.new_tokens, a.reps = 8, 4, 1
    if min(a.batch, a.prompt_tokens, a.new_tokens, a.reps) < 1:
        p.error("--batch, --prompt-tokens, --new-tokens and --reps must be at least 1")
    check_checkpoint(a.checkpoint)
    set_threads(a.threads)
    device = pick_device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)

    quantize = None if a.quantize == "none" else a.quantize
    ours = load_ours(a.checkpoint, dtype, device, a.prompt_tokens + a.new_tokens, quantize)
    ref = load_reference(a.checkpoint, dtype, device, quantize)
    g = torch.Generator().manual_seed(a.seed)
    prompt = torch.randint(0, ours.args.vocab_size, (a.batch, a.prompt_tokens), generator=g).to(device)  # (B, P)
    print(f"generate: {a.checkpoint}, {device}, {dtype}, linear layers {a.quantize}, batch {a.batch}, prompt {a.prompt_tokens} tokens, "
          f"{a.new_tokens} new tokens, {a.reps} interleaved reps; {machine_note()}")

    generate_ours(ours, prompt, a.new_tokens)             # warm-up: first calls pay for allocation and dispatch setup
    generate_reference(ref, prompt, a.new_tokens)
    speed, tokens = {"ours": [], "reference": []}, {}
    for rep in range(a.reps):
        for name, model, fn in (("ours", ours, generate_ours), ("reference", ref, generate_reference)):
            with Timer(device) as t:
                tokens[name] = fn(model, prompt, a.new_tokens)                     # (B, new_tokens)
            speed[name].append(a.batch * a.new_tokens / t.seconds)
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
        print(f"greedy tokens: first difference at new token {first} of {a.new_tokens} ({why})")
    name = "generate_tokens_per_s" if quantize is None else f"generate_{quantize}_tokens_per_s"
    summary(name, median(speed["ours"]), median(speed["reference"]), "tok/s")


if __name__ == "__main__":
    main()
