"""
LoRA: fine-tune a big frozen weight through a small low-rank update.

A linear layer computes y = x W0^T with W0 of shape (out, in). Fine-tuning all of W0 means a gradient and two AdamW
states for each of its out * in numbers. LoRA freezes W0 and learns the update as a product of two thin matrices:

    W' = W0 + (alpha / r) * B A        A: (r, in), B: (out, r), r << min(in, out)

so a 4096 x 4096 projection with r = 8 trains 65,536 numbers instead of 16.8 million.
  - A starts random (Kaiming-uniform, as nn.Linear and PEFT do) and B starts at zero, so B A = 0: at step 0 the
    model is exactly the base model, and training starts from it, not from noise.
  - alpha / r lets r change without retuning the learning rate (the LoRA paper's choice); rsLoRA's
    alpha / sqrt(r) is the scale under which large ranks keep learning as fast as small ones.
  - The forward pass never builds the (out, in) matrix B A: it computes x A^T (r numbers per token), then B.
  - After training, B A can be added into W0 once ("merging"): the fine-tuned model is a plain model again.
QLoRA is the same layer on top of a frozen 4-bit base (quant.Linear4bit): only the base changes.

Files are PEFT's: an adapter saved here loads with peft.PeftModel.from_pretrained, and a PEFT adapter loads here.
Reading order: LoRALinear -> apply_lora (put it into a model) -> merge_lora -> save/load_adapter
(the base + an adapter, as every command loads them). Merging into a new checkpoint on disk is export.py's job.
"""

import json
import math
import os
import re

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from convert import atomic_write, write_json
from quant import Linear4bit

LINEAR = (nn.Linear, Linear4bit)  # the layers LoRA can sit on
PREFIX = "base_model.model."      # PEFT's adapter keys are the module path under this prefix


# ----------------------------------------------------------------------------------------------------------------
# The layer. It holds the base layer as `self.base`, so its parameters would be saved as "q_proj.base.weight".
# Two small state-dict hooks drop that ".base" on save and put it back on load: the base keeps its ORIGINAL keys
# (q_proj.weight, or the bitsandbytes keys q_proj.weight.absmax, ... of a 4-bit base), a checkpoint of the model
# still loads into it, and the adapter adds only q_proj.lora_A.weight and q_proj.lora_B.weight.
# (named_parameters() still says "q_proj.base.weight": the hooks change what is saved, not the module tree.)

def _hide_base_prefix(module, state_dict, prefix, local_metadata):
    for key in [k for k in state_dict if k.startswith(prefix + "base.")]:
        state_dict[prefix + key[len(prefix + "base."):]] = state_dict.pop(key)
    if module.merged:  # a checkpoint always holds the base weight itself, merged or not
        state_dict[prefix + "weight"] = module.weight_before_merge


def _restore_base_prefix(module, state_dict, prefix, *args):
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + "lora_")]:
        state_dict[prefix + "base." + key[len(prefix):]] = state_dict.pop(key)


def lora_scaling(r, alpha, use_rslora=False):
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def merge_weight(w, lora_A, lora_B, scaling):
    """w + scaling * B A, summed in fp32 and rounded once to w's dtype: a layer's merge, and export.py's merge of a
    checkpoint streamed from disk (stream.py), which must give the same bytes."""
    return (w.float() + ((lora_B @ lora_A) * scaling).float()).to(w.dtype)  # (out, r) @ (r, in) -> (out, in)


class LoRALinear(nn.Module):
    """y = base(x) + scaling * B(A(dropout(x))). The base is frozen; lora_A and lora_B are the trained part.

    A and B are kept in float32 (as PEFT does) whatever the base dtype: they are tiny, and AdamW's small updates
    would be rounded away in bf16. The LoRA path runs in their dtype and its result is cast to the base output dtype
    before the sum, so a bf16 (or 4-bit with bf16 compute) base works unchanged.
    """

    def __init__(self, base, r, alpha, dropout=0.0, use_rslora=False):
        super().__init__()
        if not isinstance(base, LINEAR):
            raise TypeError(f"LoRALinear wraps nn.Linear or quant.Linear4bit, got {type(base).__name__}")
        if not (isinstance(r, int) and r > 0):
            raise ValueError(f"the LoRA rank r must be a positive integer, got {r!r}")
        self.base, self.r, self.alpha = base, r, alpha
        base.requires_grad_(False)
        self.scaling = lora_scaling(r, alpha, use_rslora)
        device = base.weight.device
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=device, dtype=torch.float32)   # (r, in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=device, dtype=torch.float32)  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()  # on the LoRA path only
        self.merged = False
        # merge() keeps the unmerged weight here (not saved), because floating-point addition cannot be undone
        # exactly: (W + D) - D may differ from W in the last bit. unmerge() puts it back bit for bit.
        self.register_buffer("weight_before_merge", None, persistent=False)
        self.register_state_dict_post_hook(_hide_base_prefix)
        self.register_load_state_dict_pre_hook(_restore_base_prefix)
        self.train(base.training)  # a new module starts in training mode; follow the model it goes into

    def forward(self, x):
        shape = x.shape[:-1]                                          # (...): tokens
        x = x.reshape(-1, x.shape[-1])                                # (N, in): one row per token
        y = self.base(x)                                              # (N, out), frozen
        if self.merged:
            training = self.training and torch.is_grad_enabled()
            if training and (self.lora_A.weight.requires_grad or self.lora_B.weight.requires_grad):
                raise RuntimeError("this LoRA layer is merged into its base weight, so A and B would get no "
                                   "gradient: call unmerge() before training (or model.eval() to run inference)")
            return y.view(*shape, y.shape[-1])
        # Without autocast the product needs x in A's dtype (fp32 A and B next to 16-bit base weights). Under
        # autocast F.linear casts for us and runs A and B in 16 bits, as PEFT does: an fp32 copy of x here would
        # be cast straight back, and kept for the backward pass, a full-size copy of every LoRA layer's input.
        autocast = torch.is_autocast_enabled(x.device.type)
        if not autocast:
            x = x.to(self.lora_A.weight.dtype)
        h = self.lora_A(self.dropout(x))                              # (N, r)
        if h.dtype == y.dtype and not autocast:
            # y += scaling * h B^T inside the matrix call (addmm_ accumulates into y as it writes). Written as
            # y + B(h) * scaling it would allocate two more (N, out) tensors and pass over them twice, forward and
            # backward: on a CPU that costs more than the rank-r product itself. In place is safe: y is the
            # base's fresh output, and the base's backward never reads it.
            y.addmm_(h, self.lora_B.weight.t(), alpha=self.scaling)
        else:  # 16-bit or 4-bit base under fp32 adapters, or autocast: the product comes back in another dtype
            y = y + (self.lora_B(h) * self.scaling).to(y.dtype)
        return y.view(*shape, y.shape[-1])                            # (..., out)

    def delta_weight(self):
        """scaling * B A, the (out, in) update, in the dtype of A and B: for looking at it (its rank, its norm); the forward
        pass never builds it, and merging adds it in fp32 (merge_weight)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling  # (out, r) @ (r, in) -> (out, in)

    @torch.no_grad()
    def merge(self):
        """W0 <- W0 + scaling * B A, in place. Merging twice is merging once."""
        if isinstance(self.base, Linear4bit):
            raise TypeError("a 4-bit weight cannot take the update in place: merge_lora(model) dequantizes it "
                            "and merges into a dense nn.Linear")
        if self.merged:
            return
        w = self.base.weight                                          # (out, in)
        self.weight_before_merge = w.detach().clone()
        w.copy_(merge_weight(w, self.lora_A.weight, self.lora_B.weight, self.scaling))
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Undo merge(): the base weight is restored bit for bit."""
        if not self.merged:
            return
        self.base.weight.copy_(self.weight_before_merge)
        self.weight_before_merge, self.merged = None, False

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


# ----------------------------------------------------------------------------------------------------------------
# Putting LoRA into a model. Module names are matched as PEFT matches target_modules: a list entry matches a
# module whose name equals it or ends with "." + it; a string is a regular expression for the full name.

def _is_target(name, targets):
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _per_module(pattern, name, default):
    """PEFT's rank_pattern / alpha_pattern: {regex for the end of a module name: value}; first match wins."""
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model, r=8, alpha=16, dropout=0.05, targets=("q_proj", "v_proj"), use_rslora=False,
               modules_to_save=(), rank_pattern=None, alpha_pattern=None):
    """Wrap the target linear layers in LoRALinear, in place, and freeze everything else. Returns the model.

    targets: module names (["q_proj", "v_proj"]), a regex for the full name, or "all-linear" (every linear layer
    but lm_head). modules_to_save: modules trained fully and saved whole in the adapter (e.g. ("lm_head",)).
    Tied embeddings: on a model whose lm_head IS the embedding matrix, training either trains that one shared
    matrix, and the tie is kept (PEFT's ensure_weight_tying=True); the adapter stores it under both names.
    """
    if lora_layers(model):
        raise ValueError("this model already has LoRA layers: apply_lora once (load_adapter fills existing ones)")
    targets = targets if isinstance(targets, str) else list(targets)
    modules_to_save = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save)
    modules = dict(model.named_modules())
    if targets == "all-linear":
        chosen = [n for n, m in modules.items() if isinstance(m, LINEAR) and n.rsplit(".", 1)[-1] != "lm_head"]
    else:
        chosen = [n for n in modules if n and _is_target(n, targets)]
    if not chosen:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if isinstance(m, LINEAR)})
        raise ValueError(f"no module matches targets={targets!r}; this model's linear layers are named {linear} "
                         "(a string target is a regular expression for the full name, e.g. r'.*\\.q_proj')")
    for n in chosen:
        if not isinstance(modules[n], LINEAR):
            raise ValueError(f"target {n} is a {type(modules[n]).__name__}; LoRA wraps linear layers only "
                             "(train it fully with modules_to_save instead)")
    for m in modules_to_save:
        if not any(n and _is_target(n, [m]) for n in modules):
            raise ValueError(f"modules_to_save entry {m!r} matches no module of this model")
    both = [n for n in chosen if _is_target(n, modules_to_save)]
    if both:
        raise ValueError(f"{both} are both LoRA targets and modules_to_save: pick one")
    for n in chosen:
        sharing = [k for k, p in model.named_parameters(remove_duplicate=False) if p is modules[n].weight]
        if len(sharing) > 1:  # e.g. lm_head tied to embed_tokens
            raise ValueError(f"{n} shares its weight with {sharing}, so merging a LoRA on it "
                             "would change those too: leave it out of targets (or train it with modules_to_save)")

    for name in chosen:
        model.set_submodule(name, LoRALinear(modules[name], _per_module(rank_pattern, name, r),
                                             _per_module(alpha_pattern, name, alpha), dropout, use_rslora))
    model.lora_config = dict(   # PEFT's names, so save_adapter writes them as they are
        r=r, lora_alpha=alpha, lora_dropout=dropout, use_rslora=use_rslora,
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in chosen}) if targets == "all-linear" else targets,
        modules_to_save=list(modules_to_save) or None, rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}), base_model_name_or_path=None)
    mark_only_lora_as_trainable(model)
    return model


def _saved_params(model):
    """{state-dict key: parameter} of the modules_to_save, with every name a shared (tied) parameter goes by."""
    names = (getattr(model, "lora_config", None) or {}).get("modules_to_save") or []
    wanted = {id(p) for n, m in model.named_modules() if n and _is_target(n, names) for p in m.parameters()}
    return {k: p for k, p in model.named_parameters(remove_duplicate=False) if id(p) in wanted}


def _adapter_params(model):
    """{state-dict key: parameter} of what training updates and an adapter holds: lora_A, lora_B, modules_to_save."""
    params = {}
    for name, layer in lora_layers(model):
        params[f"{name}.lora_A.weight"] = layer.lora_A.weight
        params[f"{name}.lora_B.weight"] = layer.lora_B.weight
    return params | _saved_params(model)


def mark_only_lora_as_trainable(model):
    """requires_grad on lora_A, lora_B and the modules_to_save; off everywhere else."""
    trained = {id(p) for p in _adapter_params(model).values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)


def trainable_report(model):
    """PEFT's one-line summary. A shared (tied) parameter counts once. A 4-bit weight counts as the number of
    elements of the weight it encodes (out * in, from its QuantState), not as its packed bytes."""
    count = {id(p): p.numel() for p in model.parameters()}
    for m in model.modules():
        if isinstance(m, Linear4bit):
            count[id(m.weight)] = m.quant_state.shape.numel()
    total = sum(count.values())
    trainable = sum(count[id(p)] for p in model.parameters() if p.requires_grad)
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


# ----------------------------------------------------------------------------------------------------------------
# Merging for export: every LoRALinear becomes a plain nn.Linear holding W0 + scaling * B A.

@torch.no_grad()
def merge_lora(model):
    """Merge every LoRA layer into its base, in place, and return the model as a plain dense model.

    Every 4-bit layer is dequantized to its compute dtype first (a 4-bit LoRA base takes its update there), so
    that model.save_pretrained(dir) writes an ordinary Hugging Face folder.
    """
    for name, m in list(model.named_modules()):
        if isinstance(m, Linear4bit):
            dense = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")  # no init work
            dense.weight = nn.Parameter(m.dequantize(m.compute_dtype), requires_grad=False)          # (out, in)
            if m.bias is not None:
                dense.bias = nn.Parameter(m.bias.to(dense.weight.dtype), requires_grad=False)
            model.set_submodule(name, dense)
    for name, layer in lora_layers(model):
        layer.merge()
        layer.weight_before_merge = None  # no unmerge after export: free the copy now
        model.set_submodule(name, layer.base)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ----------------------------------------------------------------------------------------------------------------
# PEFT's adapter folder: adapter_config.json + adapter_model.safetensors ("base_model.model.<path>.lora_A.weight").

def save_adapter(model, out_dir, base_model_name_or_path=None):
    """Write the LoRA weights (and modules_to_save) as a PEFT adapter folder."""
    if not hasattr(model, "lora_config"):
        raise ValueError("this model has no LoRA layers: call apply_lora(model, ...) or load_adapter first")
    os.makedirs(out_dir, exist_ok=True)
    # copies: a tied parameter is written under two names, and safetensors refuses tensors that share memory
    tensors = {PREFIX + k: p.detach().cpu().clone().contiguous() for k, p in _adapter_params(model).items()}
    shared = _saved_params(model)
    config = dict(peft_type="LORA", task_type="CAUSAL_LM", bias="none", fan_in_fan_out=False, use_dora=False,
                  lora_bias=False, init_lora_weights=True, inference_mode=True, **model.lora_config,
                  ensure_weight_tying=len(shared) > len({id(p) for p in shared.values()}))  # a tie was kept
    config["base_model_name_or_path"] = base_model_name_or_path or config["base_model_name_or_path"]
    atomic_write(os.path.join(out_dir, "adapter_model.safetensors"),
                 lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    write_json(os.path.join(out_dir, "adapter_config.json"), config, indent=2, sort_keys=True)


# PEFT options that change what an adapter computes, and the only values of them this file implements (unset,
# None, [] and {} are fine too). init_lora_weights="pissa", "olora", "loftq", ... also rewrite the base weights.
SUPPORTED_ONLY = {"use_dora": (False,), "lora_bias": (False,), "bias": ("none",), "fan_in_fan_out": (False,),
                  "init_lora_weights": (True, False, "gaussian"), "use_qalora": (False,), "layers_to_transform": (),
                  "layer_replication": (), "exclude_modules": (), "target_parameters": (),
                  "trainable_token_indices": (), "alora_invocation_tokens": ()}


def read_adapter_config(adapter_dir):
    path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: an adapter folder holds adapter_config.json and "
                                "adapter_model.safetensors (as written by save_adapter or PEFT's save_pretrained)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): save the adapter again") from None
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {cfg.get('peft_type')!r}; only LoRA adapters are supported")
    for field, ok in SUPPORTED_ONLY.items():
        if cfg.get(field) not in (None, [], {}, *ok):
            raise ValueError(f"{path}: {field}={cfg[field]!r} is not supported here (plain LoRA only); "
                             "use PEFT for this adapter")
    if not cfg.get("target_modules"):
        raise ValueError(f"{path}: target_modules is empty; nothing to load")
    return cfg


def read_adapter_weights(adapter_dir):
    st, pt = (os.path.join(adapter_dir, f"adapter_model.{ext}") for ext in ("safetensors", "bin"))
    if os.path.exists(st):
        try:
            tensors = load_file(st)
        except Exception as e:  # safetensors' own error type: a truncated or foreign file
            raise ValueError(f"{st} is truncated or not a safetensors file ({e}): save the adapter again") from None
    elif os.path.exists(pt):  # older PEFT versions; weights_only: a file must never run code
        tensors = torch.load(pt, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{st} not found (nor adapter_model.bin): this folder has an adapter_config.json "
                                f"but no adapter weights; copy adapter_model.safetensors next to it")
    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise ValueError(f"{adapter_dir}: adapter keys should start with {PREFIX!r}, found {bad[:3]}")
    return {k[len(PREFIX):]: t for k, t in tensors.items()}


@torch.no_grad()
def load_adapter(model, adapter_dir):
    """Load a PEFT LoRA adapter into the model. If the model has no LoRA yet, it is applied first with the
    adapter's settings. Returns the model (frozen base, trainable LoRA: ready to infer or to train on)."""
    cfg = read_adapter_config(adapter_dir)
    tensors = read_adapter_weights(adapter_dir)
    r, alpha, rslora = cfg["r"], cfg["lora_alpha"], cfg.get("use_rslora", False)
    if not hasattr(model, "lora_config"):
        apply_lora(model, r, alpha, cfg.get("lora_dropout", 0.0), cfg["target_modules"], rslora,
                   cfg.get("modules_to_save") or (), cfg.get("rank_pattern"), cfg.get("alpha_pattern"))
    for name, layer in lora_layers(model):
        want = lora_scaling(_per_module(cfg.get("rank_pattern"), name, r),
                            _per_module(cfg.get("alpha_pattern"), name, alpha), rslora)
        if layer.merged:
            raise RuntimeError(f"{name} is merged: call unmerge() on the LoRA layers before loading new weights")
        if not math.isclose(layer.scaling, want):
            raise ValueError(f"{name} has LoRA scaling {layer.scaling:g} but the adapter was trained with "
                             f"{want:g} (r, lora_alpha, use_rslora differ): load it into a model without LoRA")

    params = _adapter_params(model)
    for p in {id(p): p for p in params.values()}.values():  # a tied weight must come with one value for all names
        names = [k for k, q in params.items() if q is p]
        given = [tensors[k] for k in names if k in tensors]
        apart = len(given) < len(names) or any(not torch.equal(g, given[0]) for g in given)
        if len(names) > 1 and given and apart:
            raise ValueError(f"{adapter_dir}: this model ties {' and '.join(names)} (one matrix), but the adapter "
                             "trained them apart (PEFT's ensure_weight_tying=False); train it with "
                             "ensure_weight_tying=True, or on an untied model")
    missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"{adapter_dir} does not fit this model (was it trained on another base model?): "
                         f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}; "
                         f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    for key, t in tensors.items():
        if t.shape != params[key].shape:
            raise ValueError(f"{adapter_dir} was trained on another base model: {key} expected "
                             f"{tuple(params[key].shape)}, found {tuple(t.shape)}; load it into the model it was "
                             f"trained on (its base_model_name_or_path: {cfg.get('base_model_name_or_path')!r})")
    for key, t in tensors.items():
        params[key].copy_(t)
    model.lora_config["base_model_name_or_path"] = cfg.get("base_model_name_or_path")
    return model
