"""
4-bit NormalFloat (NF4) quantization, the storage half of QLoRA.

QLoRA fine-tunes a model whose frozen weights are stored in 4 bits but multiplied in 16 bits. Three ideas:

1. NF4: a 4-bit code whose 16 levels sit at quantiles of a normal distribution, because trained weights are
   roughly normal. Each block of 64 weights is scaled by its absolute maximum into [-1, 1], and each scaled value
   is stored as the index (a nibble) of the nearest level. Two nibbles fit in a byte.
2. Double quantization: the fp32 absmax per block costs 32/64 = 0.5 bits per weight. Quantizing those absmax values
   themselves to 8 bits (in blocks of 256, with one fp32 scale each) cuts this to about 0.127 bits.
3. Compute in 16 bits: a matmul never sees the 4-bit codes. The weight is rebuilt (dequantized) in bf16 right
   before the matmul, in the forward pass and again in the backward pass, and thrown away after each.
   Decoding (a few rows of x, no gradient) on a GPU does not even build W: `kernels.py: matvec_nf4` rebuilds it
   tile by tile in registers, as a 16-bit W written out and read back moves 8x the bytes of the 4-bit one.

Everything here is byte-compatible with bitsandbytes (what `*-bnb-4bit` checkpoints on the Hub contain), so a
layer can be loaded from, and saved to, its state dict format. bitsandbytes itself is used only by the tests.
"""

import json
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels  # rebuilding the weight: Triton kernels (optional: kernels.triton is None) and their torch twins

# -----------------------------------------------------------------------------
# The two code tables

# NF4: 16 levels at quantiles of N(0, 1), normalized to [-1, 1]. It is asymmetric (7 negative, 8 positive levels)
# so that 0.0 is exactly representable: zeros (padding, pruned weights) stay exactly zero.
NF4_TABLE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


def dynamic_map_8bit():
    """bitsandbytes' signed dynamic 8-bit map: 256 sorted levels in [-1, 1], used for the absmax values.

    Like a tiny float: for each decade 10^-6 .. 10^0 there are 2^i evenly spaced levels (i = 0..6), so small
    numbers get fine steps and large numbers coarse ones. Built in fp32 exactly as bitsandbytes builds it.
    """
    levels = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32)  # (2^i + 1,)
        mids = (edges[:-1] + edges[1:]) / 2.0                           # (2^i,) the levels of this decade
        levels += ((10.0 ** (i - 6)) * torch.cat([mids, -mids])).tolist()  # both signs
    return torch.tensor(sorted(levels), dtype=torch.float32)           # (256,)


# -----------------------------------------------------------------------------
# Quantization

@dataclass
class QuantState:
    """Everything needed to turn the packed nibbles back into a weight."""
    absmax: torch.Tensor          # (n_blocks,) fp32 scale per block, or uint8 codes into nested_code with double quant
    code: torch.Tensor            # (16,) the NF4 table the nibbles index
    blocksize: int                # weights per absmax block
    dtype: torch.dtype            # dtype of the weight that was quantized (the default dequantization dtype)
    shape: torch.Size             # shape of that weight
    nested_absmax: torch.Tensor | None = None  # (n_blocks2,) fp32 scale per block of absmax codes
    nested_code: torch.Tensor | None = None    # (256,) the dynamic 8-bit map
    nested_blocksize: int = 256
    offset: float = 0.0           # mean of the fp32 absmax, removed before the 8-bit step (exact in fp32)

    @property
    def double_quant(self):
        return self.nested_absmax is not None

    def to(self, device):
        move = lambda t: None if t is None else t.to(device)
        return replace(self, absmax=move(self.absmax), code=move(self.code),
                       nested_absmax=move(self.nested_absmax), nested_code=move(self.nested_code))


BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # the block sizes bitsandbytes accepts


def _absmax_quantize(x, table, blocksize):
    """Blockwise absmax quantization of a flat fp32 tensor to indices of a sorted table (used twice below):
    the codes, padded with zeros to whole blocks, and the fp32 absmax of each block."""
    blocks = F.pad(x, (0, -x.numel() % blocksize)).view(-1, blocksize)     # (n_blocks, blocksize), pad = 0.0
    absmax = blocks.abs().amax(dim=1)                                      # (n_blocks,)
    # multiply by the reciprocal (as bitsandbytes does); an all-zero block would give 0 * inf, hence the clamp
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1)  # (n_blocks, blocksize)
    # nearest level = which gap between midpoints the value falls in; bucketize sends a tie to the lower level
    midpoints = (table[:-1] + table[1:]) / 2                               # (len(table) - 1,)
    codes = torch.bucketize(scaled, midpoints).to(torch.uint8)             # (n_blocks, blocksize)
    return codes.view(-1), absmax


def quantize_nf4(weight, blocksize=64, double_quant=True):
    """Quantize a weight to packed NF4 nibbles. Returns (packed uint8 of shape ((n + 1) // 2, 1), QuantState)."""
    if weight.dtype not in kernels.DTYPES:
        raise TypeError(f"quantize_nf4 takes a float32/bfloat16/float16 weight, got {weight.dtype}")
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES} (as in bitsandbytes), got {blocksize}")
    if weight.numel() == 0:
        raise ValueError("cannot quantize an empty weight")
    flat = weight.detach().reshape(-1)                                     # (n,)
    n, device = flat.numel(), flat.device
    table = NF4_TABLE.to(device)
    packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32, device=device)
    # Work in chunks so the fp32 temporaries stay small even for a 4096 x 11008 weight.
    for start in range(0, n, kernels.CHUNK):
        x = flat[start:start + kernels.CHUNK].float()                      # (L,)
        codes, chunk_absmax = _absmax_quantize(x, table, blocksize)        # (L padded to blocks,), (L / blocksize,)
        codes = codes[:x.numel() + x.numel() % 2]                          # odd count: keep one padding nibble (7)
        # two nibbles per byte, the FIRST value in the HIGH nibble
        packed[start // 2:start // 2 + codes.numel() // 2, 0] = (codes[0::2] << 4) | codes[1::2]
        absmax[start // blocksize:start // blocksize + chunk_absmax.numel()] = chunk_absmax
    state = QuantState(absmax=absmax, code=table, blocksize=blocksize, dtype=weight.dtype, shape=weight.shape)
    if double_quant:
        # absmax values are all positive and similar; centering them first uses the signed 8-bit range well
        offset = absmax.mean()
        nested_code = dynamic_map_8bit().to(device)
        codes, nested_absmax = _absmax_quantize(absmax - offset, nested_code, 256)
        state = replace(state, absmax=codes[:absmax.numel()], nested_absmax=nested_absmax,
                        nested_code=nested_code, offset=offset.item())
    return packed, state


def bits_per_param(packed, state):
    """Storage cost of a quantized weight in bits per weight, from the real tensor sizes.

    With blocksize B = 64 and nested blocks of B2 = 256:
        plain NF4:        4 + 32/B             = 4.5
        double quantized: 4 + 8/B + 32/(B*B2)  = 4.127  (+ one fp32 offset per matrix)
    The code tables (16 and 256 fp32 values) are constants shared by every layer and are not counted.
    """
    tensors = [packed, state.absmax] + ([state.nested_absmax] if state.double_quant else [])
    bits = sum(t.numel() * t.element_size() * 8 for t in tensors) + (32 if state.double_quant else 0)
    return bits / state.shape.numel()


# -----------------------------------------------------------------------------
# Rebuilding the weight for a matmul. kernels.py does it with a Triton kernel or with its pure-torch twin, which
# compute the same bits in the same order:
#   absmax = nested_code[q] * nested_absmax + offset   (fp32; just absmax without double quant)
#   w      = NF4[nibble] * absmax                       (fp32), then one rounding to the output dtype

def dequantize_nf4(packed, state, dtype=None, backend=None):
    """Rebuild the weight (state.shape) in `dtype` (default: the dtype it was quantized from).
    backend: "triton" (the kernel; on CPU only under TRITON_INTERPRET=1), "torch", or None for triton when the
    tensor is on CUDA and triton is installed, torch otherwise. Both give the same bits."""
    dtype = dtype or state.dtype
    if dtype not in kernels.DTYPES:
        raise TypeError(f"can dequantize to float32/bfloat16/float16 only, got {dtype}")
    if packed.numel() != (state.shape.numel() + 1) // 2:
        raise ValueError(f"{packed.numel()} packed bytes do not hold a weight of shape {tuple(state.shape)}")
    if kernels.pick_backend(packed, backend) == "torch":
        return kernels.dequantize_torch(packed, state, dtype)
    return kernels.dequantize_triton(packed, state, dtype)


# -----------------------------------------------------------------------------
# bitsandbytes serialization: tensors next to "weight", plus the small fields as JSON bytes in a uint8 tensor

def _state_to_bnb(state):
    fields = {"quant_type": "nf4", "blocksize": state.blocksize, "dtype": str(state.dtype).removeprefix("torch."),
              "shape": list(state.shape)}
    # clones: safetensors refuses tensors that share memory, and every layer's table starts as the same one
    tensors = {"absmax": state.absmax, "quant_map": state.code.clone()}
    if state.double_quant:
        tensors.update(nested_absmax=state.nested_absmax, nested_quant_map=state.nested_code.clone())
        fields.update(nested_blocksize=state.nested_blocksize, nested_dtype="float32", nested_offset=state.offset)
    blob = bytearray(json.dumps(fields).encode("utf-8"))
    tensors["quant_state.bitsandbytes__nf4"] = torch.frombuffer(blob, dtype=torch.uint8)
    return tensors


def _state_from_bnb(tensors):
    missing = [k for k in ("weight", "weight.absmax", "weight.quant_map") if k not in tensors]
    if "weight.quant_state.bitsandbytes__fp4" in tensors:
        raise ValueError("this checkpoint is FP4 (bnb_4bit_quant_type='fp4'); only NF4 is supported")
    if missing or "weight.quant_state.bitsandbytes__nf4" not in tensors:
        raise KeyError(f"not a bitsandbytes NF4 weight (missing {missing or 'weight.quant_state.bitsandbytes__nf4'});"
                       " to quantize a dense weight use Linear4bit.from_weight / from_linear")
    fields = json.loads(bytes(tensors["weight.quant_state.bitsandbytes__nf4"].cpu().tolist()).decode("utf-8"))
    if fields["dtype"] not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported weight dtype {fields['dtype']!r} in the quant state")
    packed = tensors["weight"].view(torch.uint8).reshape(-1, 1)  # some checkpoints store the bytes as another dtype
    device = packed.device
    state = QuantState(absmax=tensors["weight.absmax"].to(device), code=tensors["weight.quant_map"].to(device),
                       blocksize=fields["blocksize"], dtype=getattr(torch, fields["dtype"]),
                       shape=torch.Size(fields["shape"]))
    if "weight.nested_absmax" in tensors:
        state = replace(state, nested_absmax=tensors["weight.nested_absmax"].to(device),
                        nested_code=tensors["weight.nested_quant_map"].to(device),
                        nested_blocksize=fields["nested_blocksize"], offset=float(fields["nested_offset"]))
    if packed.numel() != (state.shape.numel() + 1) // 2:
        raise ValueError(f"{packed.numel()} packed bytes do not hold a weight of shape {fields['shape']}")
    return packed, state


# -----------------------------------------------------------------------------
# The 4-bit linear layer

class _NF4Linear(torch.autograd.Function):
    """y = x @ W.T + b, with W rebuilt from 4 bits in forward and rebuilt AGAIN in backward (three rebuilds in all
    with gradient checkpointing, whose backward runs the forward once more). Only the packed bytes are saved for
    backward, never the 16-bit W: keeping W alive between the two passes would cost about 4x the 4-bit storage
    itself, 1.35x what quantizing saved (16 bits against 16 - 4.127)."""

    @staticmethod
    def forward(ctx, x, packed, state, bias):
        w = dequantize_nf4(packed, state, x.dtype)                 # (out, in), freed when forward returns
        ctx.state = state
        ctx.save_for_backward(packed)
        return F.linear(x, w, bias)                                # (..., out)

    @staticmethod
    def backward(ctx, grad_y):
        (packed,) = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            w = dequantize_nf4(packed, ctx.state, grad_y.dtype)    # (out, in)
            grad_x = grad_y @ w                                    # (..., out) @ (out, in) -> (..., in)
        if ctx.needs_input_grad[3]:  # the bias is frozen unless someone unfreezes it
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)  # (out,)
        return grad_x, None, None, grad_bias


FUSED_DEVICES = ("cuda",)  # where Linear4bit runs the fused kernel (on CPU Triton only interprets: for tests)


def _use_fused(x, packed, bias):
    """Decoding: few rows, nothing to differentiate, a GPU and triton. Else dequantize, then cuBLAS's matmul."""
    rows = x.numel() // max(1, x.shape[-1])
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    return (packed.device.type in FUSED_DEVICES and kernels.triton is not None
            and rows <= kernels.MATVEC_MAX_ROWS and not needs_grad)


def _frozen(t):
    return nn.Parameter(t, requires_grad=False)


class Linear4bit(nn.Module):
    """A frozen nn.Linear stored as NF4: packed weight + QuantState, computed in `compute_dtype`.

    `Linear4bit(in, out)` is an all-zero layer to load a state dict into; the from_* classmethods build real ones.
    The state dict uses bitsandbytes' keys (_state_to_bnb): weight, weight.absmax, weight.quant_map, ..., bias.
    """

    def __init__(self, in_features, out_features, bias=True, compute_dtype=torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        n = in_features * out_features
        # all nibbles 7 (the code of 0.0) and all absmax 0: a valid quantized zero matrix
        self.weight = _frozen(torch.full(((n + 1) // 2, 1), 0x77, dtype=torch.uint8, device=device))
        self.quant_state = QuantState(absmax=torch.zeros(-(-n // 64), device=device), code=NF4_TABLE.to(device),
                                      blocksize=64, dtype=compute_dtype, shape=torch.Size((out_features, in_features)))
        self.bias = _frozen(torch.zeros(out_features, dtype=compute_dtype, device=device)) if bias else None

    @classmethod
    def from_weight(cls, weight, bias=None, compute_dtype=torch.bfloat16, blocksize=64, double_quant=True):
        if weight.dim() != 2:
            raise ValueError(f"a linear weight is (out_features, in_features), got shape {tuple(weight.shape)}")
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, compute_dtype, weight.device)
        packed, layer.quant_state = quantize_nf4(weight, blocksize, double_quant)
        layer.weight = _frozen(packed)
        if bias is not None:
            layer.bias = _frozen(bias.detach().clone())  # kept in its own dtype, cast in forward
        return layer

    @classmethod
    def from_linear(cls, linear, compute_dtype=torch.bfloat16, blocksize=64, double_quant=True):
        return cls.from_weight(linear.weight, linear.bias, compute_dtype, blocksize, double_quant)

    @classmethod
    def from_bnb_state(cls, tensors, compute_dtype=torch.bfloat16):
        """Build from bitsandbytes tensors keyed by suffix: "weight", "weight.absmax", ..., optional "bias"."""
        packed, state = _state_from_bnb(tensors)
        layer = cls(state.shape[1], state.shape[0], "bias" in tensors, compute_dtype, packed.device)
        layer.weight, layer.quant_state = _frozen(packed), state
        if "bias" in tensors:
            layer.bias = _frozen(tensors["bias"].to(packed.device))
        return layer

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        x = x.to(self.compute_dtype)                               # (..., in)
        if _use_fused(x, self.weight, bias):
            return kernels.matvec_nf4(x, self.weight, self.quant_state, bias, backend="triton")  # (..., out)
        return _NF4Linear.apply(x, self.weight, self.quant_state, bias)                  # (..., out)

    def dequantize(self, dtype=None):
        """The dense (out, in) weight, in `dtype` (default: the dtype it was quantized from). Used by LoRA merge."""
        return dequantize_nf4(self.weight, self.quant_state, dtype)

    def _apply(self, fn, recurse=True):
        # .to()/.cuda()/.half() reach buffers and parameters only. The packed bytes are uint8, so a dtype cast
        # leaves them alone; the quant state follows their device and keeps its own dtypes.
        super()._apply(fn, recurse)
        self.quant_state = self.quant_state.to(self.weight.device)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight, bias
        for key, t in _state_to_bnb(self.quant_state).items():
            destination[prefix + "weight." + key] = t

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        tensors = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix + "weight")}
        rest = {k: v for k, v in state_dict.items() if not k.startswith(prefix + "weight.")}
        if "weight" in tensors:
            try:
                packed, state = _state_from_bnb(tensors)
                if tuple(state.shape) != (self.out_features, self.in_features):
                    raise ValueError(f"checkpoint weight is {tuple(state.shape)}, this layer is "
                                     f"{(self.out_features, self.in_features)}")
            except (KeyError, ValueError) as e:
                errors.append(f"{prefix}weight: {e}")
                return
            rest[prefix + "weight"] = packed
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing, unexpected, errors)
        if "weight" in tensors:
            self.quant_state = state.to(self.weight.device)

    def extra_repr(self):
        s = self.quant_state
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"compute_dtype={self.compute_dtype}, blocksize={s.blocksize}, double_quant={s.double_quant}")


# -----------------------------------------------------------------------------

def quantize_model(model, compute_dtype=torch.bfloat16, blocksize=64, double_quant=True, skip=("lm_head",)):
    """Replace every nn.Linear in `model` (except those whose name ends in `skip`) by a Linear4bit, in place.
    Layers are swapped one at a time, so each dense weight can be freed before the next one is quantized."""
    if isinstance(model, nn.Linear):
        raise TypeError("quantize_model swaps the children of a module; for a bare nn.Linear use Linear4bit.from_linear")
    names = [name for name, m in model.named_modules()
             if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] not in skip]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        linear = getattr(parent, child)
        setattr(parent, child, Linear4bit.from_linear(linear, compute_dtype, blocksize, double_quant))
        del linear  # the last reference to the dense weight, unless the caller holds one
    return model
