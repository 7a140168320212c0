"""
Rebuilding NF4 weights on each kind of hardware: every Triton kernel here sits beside its pure-torch twin.

1. Dequantization, for training. `_nf4_dequant_kernel` rebuilds the 16-bit weight in one pass: read each packed byte
   once, write each weight once. QLoRA training runs it per linear layer per micro-batch twice (forward, backward),
   three times with gradient checkpointing (forward, the forward recomputed during backward, backward); the matmul
   that follows is cuBLAS's. Its twin `dequantize_torch` does the same in chunks of whole blocks.
2. The matrix-vector product, for decoding. `_nf4_matvec_kernel` computes y = x @ W.T for a few rows of x (one token
   per sequence) WITHOUT writing W: each program reads the packed nibbles and scales of a tile of W, rebuilds the
   weights in registers, multiplies by x and accumulates in fp32. Decoding is memory-bound, and W in 16 bits is 4x
   the bytes of W in 4 bits: writing it out and reading it back costs 2 x 4 = 8x more traffic than the 4-bit weight
   itself. Its twin `matvec_torch` rebuilds a few rows of W at a time.

A kernel and its twin compute the same bits in the same order and are tested against each other; on CPU the kernels
run under TRITON_INTERPRET=1 (tests, lessons). Triton is optional: without it (kernels.triton is None) the twins do
all the work. The functions to call check their input and pick the kernel or the twin: `matvec_nf4` at the end of
this file, and `quant.py: dequantize_nf4`, next to the NF4 format it reverses.
"""

import contextlib

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

# The fused kernel keeps every row of x in registers: a decoding batch, not a prefill. Up to this many rows
# Linear4bit takes it (quant.py: _use_fused); above, dequantize-then-matmul. 8 is an estimate of where the two
# cross on a GPU (lesson 09), to be set from bench/dequant.py --decode_sweep=True once it runs on one.
MATVEC_MAX_ROWS = 8
CHUNK = 2**18  # weights quantized (quant.py) or rebuilt by a twin at a time: whole blocks for every blocksize
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what a weight is rebuilt in and x multiplied in


def on_device(t):
    """Launch context for a kernel reading `t`: Triton launches on the CURRENT CUDA device, which is cuda:0
    unless set, so a tensor on cuda:1 must make cuda:1 current first. A no-op for CPU (interpreter) tensors."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def pick_backend(t, backend):
    """None -> "triton" for a CUDA tensor when triton is installed, else "torch"; a named backend is checked."""
    if backend is None:
        return "triton" if t.is_cuda and triton is not None else "torch"
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton', 'torch' or None, got {backend!r}")
    if backend == "triton" and triton is None:
        raise RuntimeError("backend='triton' needs the triton package (pip install triton); or use backend='torch'")
    return backend


if triton is not None:
    @triton.jit
    def _round(w, OUT_BF16: tl.constexpr, out_dtype):
        """fp32 -> the output dtype, rounding to nearest even."""
        if OUT_BF16:
            # Round to nearest even by hand. A GPU does this for .to(tl.bfloat16) too, but Triton's CPU
            # interpreter truncates, and the tests compare kernels and torch twins bit for bit.
            bits = w.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return w.to(out_dtype)


# -----------------------------------------------------------------------------
# 1. Dequantization. The kernel and its twin take the steps written out in quant.py (absmax from its 8-bit code,
# then NF4[nibble] * absmax) in fp32 and in the same order, and round once to the output dtype: the same bits.

if triton is not None:
    @triton.jit
    def _nf4_dequant_kernel(packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, out_ptr, n,
                            BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
                            OUT_BF16: tl.constexpr, BYTES: tl.constexpr):
        # One program turns BYTES packed bytes into 2 * BYTES weights. Offsets in int64: in int32 the index of
        # the output would wrap past 2^31 weights (a 32000 x 65536 matrix) and write somewhere else, silently.
        pid = tl.program_id(0).to(tl.int64)
        byte = pid * BYTES + tl.arange(0, BYTES)                               # (BYTES,) int64
        valid = byte < (n + 1) // 2
        packed = tl.load(packed_ptr + byte, mask=valid, other=0).to(tl.int32)  # (BYTES,)
        block = (2 * byte) // BLOCKSIZE            # both nibbles of a byte are in one block (blocksize is even)
        if NESTED:
            q = tl.load(absmax_ptr + block, mask=valid, other=0).to(tl.int32)
            absmax2 = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=valid, other=0.0)
            absmax = tl.load(code2_ptr + q) * absmax2 + offset                 # (BYTES,) fp32
        else:
            absmax = tl.load(absmax_ptr + block, mask=valid, other=0.0)
        first = tl.load(code_ptr + (packed >> 4)) * absmax                     # (BYTES,) fp32, high nibbles
        second = tl.load(code_ptr + (packed & 15)) * absmax                    # (BYTES,) fp32, low nibbles
        w = tl.interleave(first, second)                                       # (2 * BYTES,) in memory order
        w = _round(w, OUT_BF16, out_ptr.dtype.element_ty)
        idx = pid * 2 * BYTES + tl.arange(0, 2 * BYTES)                        # (2 * BYTES,) int64
        tl.store(out_ptr + idx, w, mask=idx < n)


def _nested_args(state):
    # without double quant the nested pointers are unused: pass any tensor
    if state.double_quant:
        return state.nested_absmax, state.nested_code
    return state.absmax, state.code


def dequantize_triton(packed, state, dtype):
    """The whole weight (state.shape) in `dtype`, by `_nf4_dequant_kernel`."""
    n, bytes_per_program = state.shape.numel(), 1024
    out = torch.empty(state.shape, dtype=dtype, device=packed.device)
    with on_device(packed):
        _nf4_dequant_kernel[(triton.cdiv((n + 1) // 2, bytes_per_program),)](
            packed, state.absmax, state.code, *_nested_args(state), state.offset, out, n,
            BLOCKSIZE=state.blocksize, BLOCKSIZE2=state.nested_blocksize, NESTED=state.double_quant,
            OUT_BF16=dtype == torch.bfloat16, BYTES=bytes_per_program,
            enable_fp_fusion=False)  # no fused multiply-add: round after the multiply, exactly like torch
    return out


def _absmax_fp32(state):
    """The fp32 absmax of every block: stored as is, or rebuilt from its 8-bit codes (double quantization)."""
    if not state.double_quant:
        return state.absmax
    scale = state.nested_absmax.repeat_interleave(state.nested_blocksize)[:state.absmax.numel()]  # (n_blocks,)
    return state.nested_code[state.absmax.long()] * scale + state.offset                          # (n_blocks,)


def _byte_pairs(code):
    """Each of the 256 byte values stands for two weights (high nibble first). Stored as one 8-byte word per byte
    value, the pair is unpacked by a single gather: no shifts, no masks, no interleaving pass."""
    byte_values = torch.arange(256, device=code.device)
    pairs = torch.stack([code[byte_values >> 4], code[byte_values & 15]], dim=1)  # (256, 2) fp32
    return pairs.view(torch.int64).view(-1)                                # (256,) the same bytes, one word each


def dequantize_torch(packed, state, dtype):
    """The twin of dequantize_triton: the whole weight in `dtype`, CHUNK values at a time."""
    n, bs = state.shape.numel(), state.blocksize
    absmax = _absmax_fp32(state)                                           # (n_blocks,)
    pairs = _byte_pairs(state.code)                                        # (256,)
    flat = packed.view(-1)                                                 # ((n + 1) // 2,)
    out = torch.empty(n, dtype=dtype, device=packed.device)
    for start in range(0, n, CHUNK):
        stop = min(start + CHUNK, n)
        byte = flat[start // 2:(stop + 1) // 2]                            # (L / 2,)
        w = pairs.index_select(0, byte.long()).view(torch.float32)        # (L,), one extra value if L is odd
        full = (stop - start) // bs * bs                                   # values in whole blocks
        # product in fp32, rounded once as it is stored into `out` (whatever its dtype)
        torch.mul(w[:full].view(-1, bs), absmax[start // bs:(start + full) // bs, None],
                  out=out[start:start + full].view(-1, bs))                # (full / bs, bs)
        if full < stop - start:                                            # a last, partial block
            out[start + full:stop] = w[full:stop - start] * absmax[(start + full) // bs]
    return out.view(state.shape)


# -----------------------------------------------------------------------------
# 2. The 4-bit matrix-vector product for decoding: y = x @ W.T (+ b) for a few rows of x, never building all of W.
# The kernel rebuilds a tile of W in registers; its twin rebuilds a few rows at a time. Both round each weight to
# x's dtype exactly as dequantization does, multiply and sum in fp32, and round y once.

if triton is not None:
    @triton.jit
    def _nf4_matvec_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset, partial_ptr,
                           M, N, K, K_PER_SPLIT, BLOCKSIZE: tl.constexpr, BLOCKSIZE2: tl.constexpr,
                           NESTED: tl.constexpr, W_BF16: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Program (i, j) makes BLOCK_N outputs (features n) for all M rows of x (M <= BLOCK_M), summed over the
        # j-th slice of K only: partial[j, m, n] = sum over k in slice j of x[m, k] * W[n, k], in fp32. The
        # caller adds the slices. W is (N, K) flattened row by row into nibbles: W[n, k] is value f = n * K + k, in
        # byte f // 2 (high nibble when f is even) and in absmax block f // BLOCKSIZE. K need not be even nor a
        # multiple of the block size, so a row can start in the middle of a byte and a block can span two rows.
        rows = tl.arange(0, BLOCK_M)                                           # (BLOCK_M,)
        feats = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)             # (BLOCK_N,)
        k_start = tl.program_id(1) * K_PER_SPLIT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)                   # (BLOCK_M, BLOCK_N)
        for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)                                    # (BLOCK_K,)
            valid = (feats[:, None] < N) & (ks[None, :] < K)                   # (BLOCK_N, BLOCK_K)
            f = feats[:, None].to(tl.int64) * K + ks[None, :]                  # (BLOCK_N, BLOCK_K) flat index
            byte = tl.load(packed_ptr + f // 2, mask=valid, other=0).to(tl.int32)
            nibble = (byte >> (4 - 4 * (f % 2).to(tl.int32))) & 15            # high nibble for even f
            block = f // BLOCKSIZE
            if NESTED:  # absmax = code2[q] * absmax2 + offset, the same fp32 steps as dequantization
                q = tl.load(absmax_ptr + block, mask=valid, other=0).to(tl.int32)
                absmax2 = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=valid, other=0.0)
                absmax = tl.load(code2_ptr + q) * absmax2 + offset             # (BLOCK_N, BLOCK_K) fp32
            else:
                absmax = tl.load(absmax_ptr + block, mask=valid, other=0.0)
            w = tl.load(code_ptr + nibble) * absmax                            # (BLOCK_N, BLOCK_K) fp32
            # the weight the dequantize-then-matmul path would see: rounded once to x's dtype, then back to fp32
            w = _round(w, W_BF16, x_ptr.dtype.element_ty).to(tl.float32)
            w = tl.where(valid, w, 0.0)
            # One row of x at a time against the decoded tile: (BLOCK_N, BLOCK_K) products live at once, not
            # (BLOCK_M, BLOCK_N, BLOCK_K) (16K fp32 values at 8 rows: more than a program's registers hold).
            # Rows past M (BLOCK_M is a power of 2) read row M - 1 again: in bounds, and their sums are never stored.
            for m in tl.static_range(BLOCK_M):
                x = tl.load(x_ptr + tl.minimum(m, M - 1) * K + ks, mask=ks < K, other=0.0).to(tl.float32)  # (BLOCK_K,)
                part = tl.sum(w * x[None, :], axis=1)                          # (BLOCK_N,) fp32 sums
                acc = tl.where(rows[:, None] == m, acc + part[None, :], acc)   # into row m of acc
        out = partial_ptr + tl.program_id(1) * M * N + rows[:, None] * N + feats[None, :]
        tl.store(out, acc, mask=(rows[:, None] < M) & (feats[None, :] < N))


def programs_wanted(device):
    """How many programs a launch should have: a few per streaming multiprocessor, so that every SM has work and
    can switch to another program while one waits for memory. In the interpreter (CPU) a small number, so that
    the tests cut K into slices as a GPU does."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def matvec_triton(x, packed, state, bias=None):
    """y = x @ W.T (+ bias) for x of shape (M, K) with M <= MATVEC_MAX_ROWS, by `_nf4_matvec_kernel`.

    The grid has two axes: N / 32 blocks of outputs, and slices of K. The output blocks alone are too few to fill a
    GPU (128 for a 4096-wide output; an H100 has 132 SMs), and each would walk all of K alone; slices of K give
    every SM several programs, each a shorter walk. Each slice writes fp32 partial sums, added here in a fixed
    order (a deterministic result, unlike atomic adds): the extra traffic is splits x M x N x 4 bytes, small
    next to the N x K / 2 bytes of the weight. The sum, the bias and the cast are three small launches more, a few
    microseconds each; bench/dequant.py --decode_sweep=True times matvec_nf4 whole, so its crossover includes them.
    """
    (M, K), N = x.shape, state.shape[0]
    x = x.contiguous()                                                         # (M, K)
    block_n, block_k = 32, 64
    n_blocks, k_blocks = triton.cdiv(N, block_n), triton.cdiv(K, block_k)
    splits = max(1, min(k_blocks, triton.cdiv(programs_wanted(x.device), n_blocks)))
    k_per_split = triton.cdiv(k_blocks, splits) * block_k                      # whole BLOCK_K steps per slice
    splits = triton.cdiv(K, k_per_split)                                       # no empty slice
    partial = torch.empty(splits, M, N, dtype=torch.float32, device=x.device)  # (splits, M, N)
    with on_device(x):
        _nf4_matvec_kernel[(n_blocks, splits)](
            x, packed, state.absmax, state.code, *_nested_args(state), state.offset, partial, M, N, K, k_per_split,
            BLOCKSIZE=state.blocksize, BLOCKSIZE2=state.nested_blocksize, NESTED=state.double_quant,
            W_BF16=x.dtype == torch.bfloat16, BLOCK_M=max(1, triton.next_power_of_2(M)), BLOCK_N=block_n,
            BLOCK_K=block_k, enable_fp_fusion=False)  # absmax and weights bit for bit as in dequantization
    y = partial.sum(0)                                                         # (M, N) fp32
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)                                                       # one rounding per output


def matvec_torch(x, packed, state, bias=None):
    """The twin of matvec_triton: y = x @ W.T (+ bias) for x of shape (M, K), W rebuilt a few rows at a time."""
    (M, K), N, bs = x.shape, state.shape[0], state.blocksize
    absmax = _absmax_fp32(state)                                           # (n_blocks,)
    pairs, flat = _byte_pairs(state.code), packed.view(-1)                 # (256,), ((n + 1) // 2,)
    xf = x.float()                                                         # (M, K)
    y = torch.empty(M, N, dtype=torch.float32, device=x.device)            # (M, N)
    rows = max(1, CHUNK // K)                                              # rows of W rebuilt at a time
    for r0 in range(0, N, rows):
        r1 = min(r0 + rows, N)
        # Rows r0..r1 are values start..stop of the flat weight. start can be odd (K odd: the row starts in a byte's
        # low nibble) and need not start a block (K not a multiple of bs: blocks span rows), hence the offsets.
        start, stop = r0 * K, r1 * K
        n = stop - start                                                   # values in these rows
        w = pairs.index_select(0, flat[start // 2:(stop + 1) // 2].long()).view(torch.float32)[start % 2:start % 2 + n]
        scale = absmax[start // bs:(stop - 1) // bs + 1].repeat_interleave(bs)[start % bs:start % bs + n]  # (n,)
        w = (w * scale).to(x.dtype).float().view(r1 - r0, K)               # (rows, K) as dequantize_nf4 rounds it
        y[:, r0:r1] = xf @ w.T                                             # (M, K) @ (K, rows) in fp32
    if bias is not None:
        y += bias.float()                                                  # (M, N)
    return y.to(x.dtype)


def matvec_nf4(x, packed, state, bias=None, backend=None):
    """x @ W.T (+ bias) for x of shape (..., in_features), W = the NF4 weight, without writing W out in 16 bits.

    Made for decoding (a few rows of x). Weights are rounded to x.dtype as dequantize_nf4 would, products and
    sums are fp32, and y (in x.dtype) is rounded once. backend: "triton" (the fused kernel, at most
    MATVEC_MAX_ROWS rows), "torch" (the twin), or None for triton on CUDA and torch otherwise.
    """
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be float32/bfloat16/float16, got {x.dtype}")
    if len(state.shape) != 2 or x.shape[-1] != state.shape[1]:
        raise ValueError(f"x of shape {tuple(x.shape)} does not multiply a weight of shape {tuple(state.shape)}")
    x2 = x.reshape(-1, x.shape[-1])                                        # (M, K)
    if pick_backend(x, backend) == "torch":
        y = matvec_torch(x2, packed, state, bias)
    elif x2.shape[0] > MATVEC_MAX_ROWS:
        raise ValueError(f"the fused kernel takes at most {MATVEC_MAX_ROWS} rows, got {x2.shape[0]}")
    else:
        y = matvec_triton(x2, packed, state, bias)
    return y.view(*x.shape[:-1], state.shape[0])                           # (..., out_features)
