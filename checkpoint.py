"""
A fine-tune on disk, both ways.

Loading: every command starts the same way, find the base model, load it (in 4 bits if asked), put the adapter on it
(load_model). train.py, sample.py, evaluate.py and export.py all call it, so they find the same base the same way.

Saving a run that can stop and continue exactly (lesson 11): one file, train_state.pt in out_dir, holds everything a
resume needs (the trainable weights, the optimizer's state, the random states, the position in the data), and is
written so that a crash mid-write never leaves a broken one. `python train.py ... --init_from=resume` reads it back.
"""

import os
import random
import sys

import torch

from convert import BUNDLED_DIR, atomic_write, write_json
from lora import load_adapter, read_adapter_config, save_adapter
from model import Llama


def find_base(init_from, adapter):
    """The checkpoint folder to load: init_from, else the base the adapter names (its base_model_name_or_path),
    else the bundled SmolLM2. Raises FileNotFoundError / ValueError with what to do."""
    base = init_from
    if adapter and not base:
        named = read_adapter_config(adapter).get("base_model_name_or_path")
        if named and not os.path.isdir(named):
            raise FileNotFoundError(f"the adapter's base model {named!r} (base_model_name_or_path in {adapter}/"
                                    f"adapter_config.json) is not a folder here; pass --init_from=<the base "
                                    f"checkpoint folder>")
        base = named
    base = base or BUNDLED_DIR
    if not os.path.isdir(base):
        raise FileNotFoundError(f"checkpoint folder {base!r} not found. Create it with: python prepare.py "
                                f"[--hub_id=<hub repo id>]")
    return base


def load_model(init_from="", adapter="", quantize="none", dtype=torch.float32, device="cpu", max_seq_len=None):
    """(model, base folder): the base model (quantize="nf4": its linear layers in 4 bits, as QLoRA trains them)
    with the adapter loaded when one is given. Raises FileNotFoundError / ValueError with what to do."""
    base = find_base(init_from, adapter)
    model = Llama.from_pretrained(base, dtype=dtype, device=device, max_seq_len=max_seq_len,
                                  quantize=None if quantize == "none" else quantize)  # the settings say "none"
    if adapter:
        load_adapter(model, adapter)
    return model, base


# -- a run saved so it can continue --------------------------------------------------------------------------------

STATE_FILE = "train_state.pt"


def save_checkpoint(model, opt, cfg, pos, history, scaler=None):
    """
    One file holds everything a resume needs (trainable weights, optimizer, RNG, data position), written to a
    temporary name and renamed, so a crash mid-write never leaves a broken checkpoint. The adapter is also written
    in PEFT's format for sample.py, export.py and PEFT itself.
    """
    state = {"trainable": {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
             "optimizer": opt.state_dict(), "pos": pos, "history": history, "config": cfg,
             "scaler": scaler.state_dict() if scaler is not None else None,  # fp16's loss scale, plain numbers
             "rng": rng_state(cfg["device"])}
    atomic_write(os.path.join(cfg["out_dir"], STATE_FILE), lambda p: torch.save(state, p))
    save_adapter(model, cfg["out_dir"], base_model_name_or_path=cfg["init_from"])  # the base (a resume keeps it)
    write_json(os.path.join(cfg["out_dir"], "config.json"), cfg, indent=2, default=list)


def rng_state(device):
    """The random states a resume restores: CPU, Python, and the GPU this process trains on (only that one: a
    checkpoint must resume on a machine with another number of GPUs)."""
    cuda = torch.cuda.get_rng_state(device) if str(device).startswith("cuda") else None
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "cuda": cuda}


def read_checkpoint(out_dir):
    """The saved state of the run in out_dir, or a one-line error that says why there is none."""
    path = os.path.join(out_dir, STATE_FILE)
    if not os.path.exists(path):
        sys.exit(f"error: init_from=resume but {path} does not exist (no run to continue in out_dir={out_dir!r})")
    try:  # weights_only: tensors and plain containers only, so a downloaded run folder can never run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        sys.exit(f"error: {path} is not a readable train.py checkpoint ({type(e).__name__}: "
                 f"{str(e).splitlines()[0]})")


def restore_rng(rng, device):
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    cuda = rng["cuda"]
    if isinstance(cuda, (list, tuple)):  # older checkpoints kept every GPU's state; the first was the one trained on
        cuda = cuda[0] if cuda else None
    if cuda is not None and str(device).startswith("cuda"):
        torch.cuda.set_rng_state(cuda, device)
