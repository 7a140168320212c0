"""
Weights one tensor at a time: how export.py merges a 7B fine-tune on a laptop.

Loading a model to merge an adapter into it holds every weight at once: 27 GB for Llama 2 7B in fp32. But a merge
is a job per tensor: W0 + scaling * B A needs one layer's W0, A and B, nothing else. So export.py never builds the
model. For each tensor, in the order the file being written wants them, it
  1. reads that tensor's bytes from the checkpoint (the safetensors header says where they are);
  2. merges the adapter into it in fp32 exactly as a loaded model would (lora.py: merge_weight), or takes the
     adapter's own copy of it (modules_to_save);
  3. hands it to the writer, which converts and writes it, and lets it go.
Peak memory is then the largest tensor a few times over (as read, in fp32, converted) plus the adapter, whatever
the size of the model.

Each tensor is read with a plain file read into a buffer of its own. A memory map (safetensors' safe_open) would
read the same bytes, but every page it touches stays mapped, and resident, until the whole file is closed: the
process would end up holding the file anyway.

The safetensors layout: 8 bytes (the header's length, little-endian), a JSON header
{"__metadata__": {...}, name: {"dtype": "BF16", "shape": [out, in], "data_offsets": [begin, end]}, ...} padded with
spaces to a multiple of 8 bytes, then the tensors' bytes, each at its offsets from the end of the header.
"""

import json
import math
import os
import shutil
import tempfile
from typing import Callable, NamedTuple

import torch

from convert import IGNORED, args_from_hf_config, atomic_write, check_keys, check_shape, hf_config, hf_files, write_json
from checkpoint import load_model
from lora import load_adapter, lora_layers, merge_lora, merge_weight, read_adapter_weights
from model import Llama, ModelArgs

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # a 16- or 32-bit checkpoint's types
NAMES = {dtype: name for name, dtype in DTYPES.items()}


class Weights(NamedTuple):
    """A model's weights as the writers take them: its args, {name: shape} of every tensor a checkpoint stores (in
    the model's order; a tied head is the embedding and not stored twice), and get(name) -> that tensor."""
    args: ModelArgs
    shapes: dict
    get: Callable


# ----------------------------------------------------------------------------------------------------------------
# Reading: the headers first (every name, shape and offset, a few kilobytes), then one tensor when it is asked for.

def read_header(path):
    """{name: {"dtype", "shape", "data_offsets"}} of a safetensors file, and the file offset its data starts at."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(n)) if 8 + n <= size else None
        except ValueError:
            header = None
    ends = [e["data_offsets"][1] for k, e in (header or {}).items() if k != "__metadata__"]
    if header is None or 8 + n + max(ends, default=0) > size:
        raise ValueError(f"{path} is truncated or not a safetensors file: download or convert it again")
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensor(path, entry, start):
    """One tensor's bytes, read into a buffer of its own (no memory map: see the top of the file)."""
    if entry["dtype"] not in DTYPES:
        raise ValueError(f"{path}: a tensor of type {entry['dtype']}; this reader streams 16- and 32-bit floats")
    begin, end = entry["data_offsets"]
    buf = bytearray(end - begin)
    with open(path, "rb") as f:
        f.seek(start + begin)
        f.readinto(buf)
    return torch.frombuffer(buf, dtype=DTYPES[entry["dtype"]]).view(entry["shape"])


def checkpoint_index(base):
    """(ModelArgs, {name: (file, header entry, data start)}) of a Hugging Face checkpoint, sharded or not."""
    with open(os.path.join(base, "config.json")) as f:
        args = args_from_hf_config(json.load(f))
    index = {}
    for file in hf_files(base):
        header, start = read_header(file)
        index.update({name: (file, entry, start) for name, entry in header.items()})
    return args, index


def model_shapes(model):
    """{name: shape} of every tensor a checkpoint of `model` stores, in its state dict's order (no tied head)."""
    tied = model.args.tie_embeddings
    return {k: tuple(t.shape) for k, t in model.state_dict().items() if not (tied and k == "lm_head.weight")}


# ----------------------------------------------------------------------------------------------------------------
# Merging, tensor by tensor.

def merged_weights(base, adapter="", dtype=torch.float32):
    """
    The checkpoint `base` (Hugging Face layout, 16 or 32 bits) with `adapter` merged in, as Weights whose get(name)
    reads, merges and returns one tensor in `dtype`: the tensor checkpoint.load_model(..., dtype) + merge_lora would hold,
    bit for bit. The adapter is checked as loading it does (same errors), on a model without memory.
    """
    args, index = checkpoint_index(base)
    with torch.device("meta"):
        model = Llama(args)                              # names and shapes only, no memory
    shapes = model_shapes(model)
    stored = [k for k in index if not IGNORED.search(k) and not (args.tie_embeddings and k == "lm_head.weight")]
    check_keys(base, sorted(shapes.keys() - index.keys()), [k for k in stored if k not in shapes])
    for name, shape in shapes.items():
        check_shape(base, name, shape, index[name][1]["shape"])
    factors, whole = {}, {}
    if adapter:
        load_adapter(model, adapter)                     # every check of loading it for real: shapes, ties, options
        tensors = read_adapter_weights(adapter)          # {"model.layers.0.self_attn.q_proj.lora_A.weight": (r, in)...}
        for name, layer in lora_layers(model):
            # fp32 factors, as a LoRALinear holds them whatever dtype the file has
            factors[name + ".weight"] = (tensors[name + ".lora_A.weight"].float(),      # (r, in)
                                         tensors[name + ".lora_B.weight"].float(), layer.scaling)  # (out, r)
        whole = {k: t for k, t in tensors.items() if not k.endswith((".lora_A.weight", ".lora_B.weight"))}

    def get(name):
        if name in whole:                                # modules_to_save: trained whole, the adapter holds it
            return whole[name].to(dtype)
        w = read_tensor(*index[name]).to(dtype)          # (out, in) or (dim,)
        if name in factors:
            w = merge_weight(w, *factors[name])
        return w
    return Weights(args, shapes, get)


def model_weights(model):
    """A model in memory (merged with lora.merge_lora) as Weights: the writers' source for what does not stream
    (Meta's layout, 4-bit checkpoints)."""
    sd = model.state_dict()
    return Weights(model.args, model_shapes(model), lambda name: sd[name].detach())


# ----------------------------------------------------------------------------------------------------------------
# Which weights an export takes. A checkpoint in 16 or 32 bits streams (above); Meta's layout and a 4-bit (NF4)
# checkpoint are loaded whole, the 4-bit one dequantized. An adapter trained by QLoRA (train.py's config.json beside
# it says quantize="nf4") learned its update on the NF4 rounding of a 16-bit base; when that base is on disk (the
# adapter names it, or --init_from), its 16-bit weights are the ones merged: the originals the 4-bit ones
# approximated.

def read_config(folder, name="config.json"):
    """A folder's config.json (or another JSON file: name) as a dict, {} when it has none (Meta's layout, an adapter
    not written by train.py)."""
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def base_type(base):
    """The dtype a checkpoint was saved in (its config.json), as export.py's --type name; f32 when it does not say."""
    cfg = read_config(base)
    names = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
    return names.get(cfg.get("torch_dtype") or cfg.get("dtype"), "f32")


def open_weights(base, adapter, dtype):
    """(Weights of base + adapter in `dtype`, a line saying which weights they are)."""
    config = read_config(base)
    if config and not config.get("quantization_config"):
        weights = merged_weights(base, adapter, dtype)
        which = f"{base} ({base_type(base)}), read one tensor at a time"
    else:  # Meta's layout, or 4-bit: loaded whole and merged in memory (4-bit layers dequantized)
        model, _ = load_model(base, adapter, dtype=dtype)
        weights = model_weights(merge_lora(model))
        which = f"{base} ({'4-bit NF4, dequantized' if config else 'Meta layout'}), loaded whole"
    if adapter and read_config(adapter).get("quantize") == "nf4" and not config.get("quantization_config"):
        which += (f"; {adapter} was trained on their 4-bit NF4 rounding (its config.json: quantize='nf4'), and is "
                  f"merged here into these {base_type(base)} originals")
    return weights, which


# ----------------------------------------------------------------------------------------------------------------
# Writing a merged Hugging Face folder one tensor at a time: what transformers, vLLM or llama.cpp's own converter
# load as a normal model.

def write_safetensors(path, weights, dtype):
    """Every tensor of `weights` in `dtype`, in the bytes safetensors' save_file(state_dict, path,
    metadata={"format": "pt"}) writes: tensors ordered by dtype (larger first) then name; here one dtype, so by
    name; offsets back to back; header JSON without spaces, padded with spaces to a multiple of 8."""
    names = sorted(weights.shapes)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name in names:
        shape = list(weights.shapes[name])
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for name in names:
                t = weights.get(name).to(dtype).contiguous()
                f.write(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, little-endian as in memory
    atomic_write(path, write)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "generation_config.json")


def write_folder(weights, base, out_dir, dtype):
    """model.safetensors (one tensor at a time), config.json and the base's tokenizer files into a temporary folder
    beside out_dir, then rename it: a crash leaves no half model. Returns the tokenizer files copied."""
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)), prefix=os.path.basename(out_dir) + ".tmp-")
    try:
        write_safetensors(os.path.join(tmp, "model.safetensors"), weights, dtype)
        write_json(os.path.join(tmp, "config.json"), hf_config(weights.args, dtype), indent=2)
        copied = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(base, f))]
        for f in copied:
            shutil.copyfile(os.path.join(base, f), os.path.join(tmp, f))
        os.chmod(tmp, 0o755)  # mkdtemp makes a private folder; a model folder is an ordinary one
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (export.py checked)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return copied
