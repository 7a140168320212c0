"""
Generate text from a base model, a base model + LoRA adapter, or a merged model.

    python sample.py --prompt="Once upon a time"
    python sample.py --chat=True --prompt="پایتخت ایران کجاست؟"
    python sample.py --adapter=out/quickstart --chat=True --prompt=FILE:question.txt
    python sample.py --init_from=checkpoints/Llama-2-7b-chat-hf --quantize=nf4 --chat=True --prompt="..."
"""

import os
import sys

import torch

# -- settings (defaults; override with --key=value or a config file, see configurator.py) -------------------------
init_from = ""               # checkpoint folder; "" -> the adapter's base model, else the bundled SmolLM2
adapter = ""                 # a LoRA adapter folder (PEFT format, e.g. a train.py out_dir)
prompt = "The three most useful things to know about fine-tuning are"
chat = False                 # wrap the prompt in the model's chat template
system = ""                  # optional system message when chat=True
max_new_tokens = 200
temperature = 0.8            # 0 = greedy
top_k = 200
top_p = 1.0
seed = 1337
num_samples = 1
quantize = "none"            # "nf4": load the base in 4 bits (QLoRA models on a small GPU)
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "auto"               # bfloat16 where the device computes it natively, else float32 (configurator.py)
# -------------------------------------------------------------------------------------------------------------------
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}

from configurator import check_device, configure, resolve_dtype  # noqa: E402
from lora import load_adapter, read_adapter_config  # noqa: E402
from model import Llama  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

BUNDLED = os.path.join("checkpoints", "SmolLM2-135M-Instruct")


def stream(model, tok, ids, cfg):
    """Print tokens as they come. A Persian letter or an emoji can span several byte tokens: hold back a partial one."""
    out, shown = [], ""
    x = torch.tensor([ids], device=cfg["device"])
    for nxt in model.generate(x, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"] or None, cfg["top_p"]):
        if nxt.item() in tok.stop_ids:
            break
        out.append(nxt.item())
        text = tok.decode(out)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    print()
    return tok.decode(out)


def main(argv=None):
    cfg = configure(settings, argv)
    check_device(cfg["device"])
    base = cfg["init_from"]
    if cfg["adapter"]:
        try:
            named = read_adapter_config(cfg["adapter"]).get("base_model_name_or_path")
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        if not base and named and not os.path.isdir(named):
            sys.exit(f"error: the adapter's base model {named!r} (base_model_name_or_path in {cfg['adapter']}/"
                     f"adapter_config.json) is not a folder here; pass --init_from=<the base checkpoint folder>")
        base = base or named or ""
    base = base or BUNDLED
    if not os.path.isdir(base):
        sys.exit(f"error: checkpoint folder {base!r} not found. Create it with: python prepare.py [<hub repo id>]")
    ptdtype = resolve_dtype(cfg["dtype"], cfg["device"])
    try:
        model = Llama.from_pretrained(base, dtype=ptdtype, device=cfg["device"],
                                      quantize=None if cfg["quantize"] == "none" else cfg["quantize"])
        if cfg["adapter"]:
            load_adapter(model, cfg["adapter"])
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    model.eval()
    tok = Tokenizer(base)

    text = cfg["prompt"]
    if text.startswith("FILE:"):
        with open(text[5:], encoding="utf-8") as f:
            text = f.read()
    if cfg["chat"]:
        messages = ([{"role": "system", "content": cfg["system"]}] if cfg["system"] else []) + \
                   [{"role": "user", "content": text}]
        ids = tok.encode_chat(messages)
    else:
        ids = tok.encode(text, bos=tok.add_bos)
    torch.manual_seed(cfg["seed"])
    for i in range(cfg["num_samples"]):
        if not cfg["chat"]:
            sys.stdout.write(text)
        stream(model, tok, ids, cfg)
        if i + 1 < cfg["num_samples"]:
            print("-" * 40)


if __name__ == "__main__":
    main()
