"""
Generate text from a base model, a base model + LoRA adapter, or a merged model.

    python sample.py --prompt="Once upon a time"
    python sample.py --chat=True --prompt="پایتخت ایران کجاست؟"
    python sample.py --adapter=out/quickstart --chat=True --prompt=FILE:question.txt
    python sample.py --init_from=checkpoints/Llama-2-7b-chat-hf --quantize=nf4 --chat=True --prompt="..."
    python sample.py --adapter=out/quickstart --chat=True --interactive=True     # a conversation on stdin

In a conversation, /system TEXT sets the system message, /reset forgets the turns, Ctrl-C stops an answer,
Ctrl-D or /exit leaves.
"""

import sys

import torch

# -- settings (defaults; override with --key=value or a config file, see configurator.py) -------------------------
init_from = ""               # checkpoint folder; "" -> the adapter's base model, else the bundled SmolLM2
adapter = ""                 # a LoRA adapter folder (PEFT format, e.g. a train.py out_dir)
prompt = "The three most useful things to know about fine-tuning are"
chat = False                 # wrap the prompt in the model's chat template
interactive = False          # with chat=True: a conversation, user turns read from stdin (prompt is not used)
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

from configurator import configure  # noqa: E402
from memory import check_device, resolve_dtype  # noqa: E402
from checkpoint import load_model  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402


def stream(model, tok, ids, cfg, start_pos=None):
    """Print tokens as they come. A Persian letter or an emoji can span several byte tokens: hold back a partial one.
    Returns (the answer's text, every token generated, the stop token included). start_pos: see Llama.generate."""
    out, shown, made = [], "", []
    x = torch.tensor([ids], device=cfg["device"])
    for nxt in model.generate(x, cfg["max_new_tokens"], cfg["temperature"], cfg["top_k"] or None, cfg["top_p"],
                              start_pos=start_pos):
        made.append(nxt.item())
        if nxt.item() in tok.stop_ids:
            break
        out.append(nxt.item())
        text = tok.decode(out)
        if not text.endswith("\ufffd"):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    print()
    return tok.decode(out), made


# ----------------------------------------------------------------------------------------------------------------
# A conversation. Each turn renders the WHOLE history with the chat template (the model only ever sees one
# text), but the keys/values of the tokens that did not change since the last turn are still in the cache:
# only the new part (the last answer as the template writes it, and the new question) goes through the model.

def common_prefix(a, b):
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


CHAT_CACHE = 256  # positions a conversation's KV cache starts with


def conversation(model, tok, cfg, read=input):
    """Read user turns with read() until EOF or /exit; stream each answer. Returns one record per answered turn:
    {"tokens": the prompt's length, "reused": how many of them came from the cache, "answer": the text}."""
    system, history, turns = cfg["system"], [], []
    cached = []                        # the token ids whose keys/values the cache holds, position by position
    model.setup_cache(1, min(CHAT_CACHE, model.args.max_seq_len))  # grown turn by turn (Llama.grow_cache)
    while True:
        try:
            line = read("> ").strip()
        except EOFError:               # Ctrl-D, or the end of piped input
            print()
            break
        except KeyboardInterrupt:      # Ctrl-C at the prompt: nothing to stop, ask again
            print()
            continue
        if line == "/exit":
            break
        if line == "/reset":
            history = []
            print("(history cleared)")
            continue
        if line.startswith("/system"):
            system = line[len("/system"):].strip()
            print(f"(system message {'set' if system else 'removed'})")
            continue
        if not line:
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history + \
                   [{"role": "user", "content": line}]
        ids = tok.encode_chat(messages)
        if len(ids) >= model.args.max_seq_len:
            print(f"(the conversation is {len(ids)} tokens, the model's context is {model.args.max_seq_len}: /reset)")
            continue
        # At least the last prompt token goes through the model: its logits choose the first answer token.
        keep = min(common_prefix(cached, ids), len(ids) - 1)
        model.grow_cache(min(len(ids) + cfg["max_new_tokens"], model.args.max_seq_len))
        try:
            answer, made = stream(model, tok, ids[keep:], cfg, start_pos=keep)
            # The last token generated was sampled but never fed back, so the cache ends just before it.
            cached = ids + made[:-1]
        except KeyboardInterrupt:      # Ctrl-C: stop this answer, keep the conversation
            print("\n(stopped)")
            answer, cached = "", ids[:keep]  # positions past keep may be half-written: trust only the prefix
        history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
        turns.append({"tokens": len(ids), "reused": keep, "answer": answer})
    model.clear_cache()
    return turns


def main(argv=None):
    cfg = configure(settings, argv)
    check_device(cfg["device"])
    if cfg["interactive"] and not cfg["chat"]:
        sys.exit("error: interactive=True is a conversation: pass --chat=True too")
    try:
        model, base = load_model(cfg["init_from"], cfg["adapter"], cfg["quantize"],
                                 resolve_dtype(cfg["dtype"], cfg["device"]), cfg["device"])
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    model.eval()
    tok = Tokenizer(base)

    torch.manual_seed(cfg["seed"])
    if cfg["interactive"]:
        conversation(model, tok, cfg)
        return
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
    for i in range(cfg["num_samples"]):
        if not cfg["chat"]:
            sys.stdout.write(text)
        stream(model, tok, ids, cfg)
        if i + 1 < cfg["num_samples"]:
            print("-" * 40)


if __name__ == "__main__":
    main()
