"""
NF4 dequantization throughput: the step QLoRA runs for every linear layer twice per micro-batch (forward and
backward), three times with gradient checkpointing (forward, recomputed forward, backward).

    python bench/dequant.py                   # an 11008 x 4096 weight (a Llama-7B MLP projection)
    python bench/dequant.py --rows=32000      # 32000 x 4096: the size of Llama 2's embedding and head
    python bench/dequant.py --smoke           # a small weight, to check that it runs
    python bench/dequant.py --decode          # 4-bit decoding: fused kernel vs dequantize-then-matmul, 7B layers
    python bench/dequant.py --decode-sweep    # the same per layer shape at 1, 2, 4, 8 rows: where each path wins

On a GPU each call is timed with CUDA events and the L2 cache emptied before it (triton.testing.do_bench): at 7B
sizes a call moves 50-300 MB, far more than Python's 15-30 us to launch it, and never finds its input in L2.

One weight is quantized once by quant.quantize_nf4 (NF4, blocks of 64, double quantization). The reference is
given those very bytes as a bitsandbytes QuantState, so both sides turn identical input into (bit for bit, the
script checks) identical output.
  CPU:  our pure-torch twin vs bitsandbytes' dequantize_4bit (its C++ CPU kernel);
        our torch twin vs a copy that moves as many bytes (the memory-bandwidth bound).
  CUDA: our Triton kernel vs a device-to-device copy that moves as many bytes (the bandwidth bound),
        our pure-torch twin vs that copy, our Triton kernel vs the torch twin, our Triton kernel vs bitsandbytes.
Two units:
  "GB/s out"     bytes of dequantized weight written per second (what the matmul that follows consumes);
  "GB/s moved"   bytes read (packed nibbles + 8-bit absmax codes + fp32 nested absmax) plus bytes written, per
                 second. The copy reads and writes half that total each, into a new tensor as dequantization
                 does, so "ratio" in a *_vs_copy line is the fraction of the copy's bandwidth the
                 dequantization reaches.

--decode times what one decoding step does with a 4-bit model: every linear layer of a stack of Llama-7B-shaped
layers (q, k, v, o: dim x dim; gate, up: hidden x dim; down: dim x hidden) multiplies one token per sequence.
  CUDA: kernels.matvec_nf4 (the fused Triton kernel: W never written in 16 bits) vs dequantize_nf4 + F.linear;
  CPU:  the fused kernel's torch twin vs dequantize_nf4 + F.linear (at --smoke size in the tests).
It prints ms per token for the whole stack and the GB/s each side must move at least (4-bit weights; plus W in
16 bits written and read back by dequantize-then-matmul), and ends in one "decode_*" summary line in tokens/s
(ours: the fused path). On CPU the twin rebuilds W in cache-sized chunks, so its "GB moved" is only a floor.
"""

import argparse
import sys

import torch
import torch.nn.functional as F

from common import add_common_args, kernel_seconds, machine_note, pick_device, set_threads, summary, timing_note


def bnb_state(state, dtype):
    """Our QuantState as a bitsandbytes one (same tensors, no copies)."""
    import bitsandbytes.functional as bF
    nested = bF.QuantState(absmax=state.nested_absmax, code=state.nested_code, blocksize=state.nested_blocksize,
                           dtype=torch.float32)
    return bF.QuantState(absmax=state.absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                         quant_type="nf4", dtype=dtype, offset=torch.tensor(state.offset, device=state.absmax.device),
                         state2=nested)


def bytes_moved(packed, state, dtype):
    read = packed.numel() + state.absmax.numel() * state.absmax.element_size() + state.nested_absmax.numel() * 4
    written = state.shape.numel() * torch.finfo(dtype).bits // 8
    return read + written


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=11008)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--blocksize", type=int, default=64)
    add_common_args(p, "output dtype; auto: float32 on CPU (the CPU compute dtype), bfloat16 on CUDA")
    p.add_argument("--reps", type=int, default=5, help="timed rounds, each system once per round, interleaved")
    p.add_argument("--iters", type=int, default=0, help="calls per timing (0: 3 on CPU, 50 on CUDA)")
    p.add_argument("--decode", action="store_true", help="4-bit decoding through a stack of Llama-7B-shaped layers")
    p.add_argument("--dim", type=int, default=4096, help="--decode: model width")
    p.add_argument("--hidden", type=int, default=11008, help="--decode: MLP width")
    p.add_argument("--layers", type=int, default=32, help="--decode: layers in the stack")
    p.add_argument("--batch", type=int, default=1, help="--decode: sequences decoded together (rows of x)")
    p.add_argument("--decode-sweep", action="store_true",
                   help="fused vs dequantize-then-matmul per layer shape at 1, 2, 4, 8 rows, and the crossover")
    a = p.parse_args(argv)
    if a.smoke:
        a.rows, a.cols, a.reps, a.iters = 256, 256, 1, 1
        a.dim, a.hidden, a.layers = 64, 96, 2
    if a.decode_sweep:
        return decode_sweep(a)
    if a.decode:
        return decode(a)
    if min(a.rows, a.cols, a.reps) < 1 or a.iters < 0:
        p.error("--rows, --cols and --reps must be at least 1, --iters at least 0")
    set_threads(a.threads)
    device = pick_device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
    iters = a.iters or (50 if device == "cuda" else 3)

    import bitsandbytes.functional as bF
    from quant import dequantize_nf4, quantize_nf4

    g = torch.Generator().manual_seed(a.seed)
    weight = torch.randn(a.rows, a.cols, generator=g).to(device)                   # (rows, cols) fp32
    packed, state = quantize_nf4(weight, a.blocksize, double_quant=True)           # ((n + 1) // 2, 1) uint8
    ref_state = bnb_state(state, dtype)
    n, moved = state.shape.numel(), bytes_moved(packed, state, dtype)
    copy_src = torch.empty(moved // 2, dtype=torch.uint8, device=device)           # read moved/2, write moved/2

    # The copy makes a NEW tensor, as dequantization does: on CPU, fresh pages cost page faults, on both sides.
    systems = {"torch": lambda: dequantize_nf4(packed, state, dtype, backend="torch"),
               "bnb": lambda: bF.dequantize_4bit(packed, ref_state),
               "copy": lambda: copy_src.clone()}
    if device == "cuda":
        systems = {"triton": lambda: dequantize_nf4(packed, state, dtype, backend="triton"), **systems}

    expected, agree = systems["torch"](), "identical"
    for name in systems:
        if name != "copy":
            out = systems[name]()
            if not torch.equal(out, expected):
                diff = (out.float() - expected.float()).abs().max().item()
                print(f"warning: {name} output differs from the torch twin (max abs difference {diff:g})")
                agree = "NOT identical"
    print(f"dequant: {a.rows} x {a.cols} NF4 weight ({n / 1e6:.1f}M values), blocksize {a.blocksize}, double quant, "
          f"-> {dtype} on {device}; {iters} calls per timing, {a.reps} interleaved rounds, "
          f"outputs {agree}; {timing_note(device)}; {machine_note()}")

    t = kernel_seconds(systems, device, iters, a.reps)  # per call
    out_bytes = n * torch.finfo(dtype).bits // 8
    out_gbs = {name: out_bytes / s / 1e9 for name, s in t.items()}
    moved_gbs = {name: moved / s / 1e9 for name, s in t.items()}
    for name in systems:
        rate = f"{moved_gbs[name]:.2f} GB/s moved" if name == "copy" else f"{n / t[name] / 1e9:.3f} G weights/s"
        print(f"  {name:7s} {t[name] * 1e3:8.3f} ms per call, {rate}")

    if device == "cuda":
        summary("dequant_triton_vs_copy", moved_gbs["triton"], moved_gbs["copy"], "GB/s moved")
        summary("dequant_torch_vs_copy", moved_gbs["torch"], moved_gbs["copy"], "GB/s moved")
        summary("dequant_triton_vs_torch", out_gbs["triton"], out_gbs["torch"], "GB/s out", digits=2)
        summary("dequant_triton_vs_bnb", out_gbs["triton"], out_gbs["bnb"], "GB/s out", digits=2)
    else:
        summary("dequant_torch_vs_bnb", out_gbs["torch"], out_gbs["bnb"], "GB/s out", digits=3)
        summary("dequant_torch_vs_copy", moved_gbs["torch"], moved_gbs["copy"], "GB/s moved", digits=3)


def decode(a):
    """Fused 4-bit matrix-vector products vs dequantize-then-matmul over a stack of layers (see the docstring)."""
    from kernels import MATVEC_MAX_ROWS, matvec_nf4
    from quant import dequantize_nf4, quantize_nf4
    if min(a.dim, a.hidden, a.layers, a.reps) < 1 or not 1 <= a.batch <= MATVEC_MAX_ROWS:
        sys.exit(f"error: --dim, --hidden, --layers, --reps must be at least 1, --batch 1..{MATVEC_MAX_ROWS}")
    set_threads(a.threads)
    device = pick_device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
    iters = a.iters or (20 if device == "cuda" else 3)
    g = torch.Generator().manual_seed(a.seed)
    shapes = [(a.dim, a.dim)] * 4 + [(a.hidden, a.dim)] * 2 + [(a.dim, a.hidden)]  # q k v o, gate up, down
    weights = []                                                                 # [(packed, state)] per linear
    for _ in range(a.layers):
        for shape in shapes:
            w = (torch.randn(shape, generator=g) * 0.02).to(device)                  # (out, in), one at a time
            weights.append(quantize_nf4(w, a.blocksize, double_quant=True))
    inputs = {n: torch.randn(a.batch, n, generator=g).to(device, dtype) for n in {a.dim, a.hidden}}  # (batch, in)

    def fused():
        for packed, state in weights:
            matvec_nf4(inputs[state.shape[1]], packed, state)                       # (batch, out)

    def dequant_matmul():
        for packed, state in weights:
            F.linear(inputs[state.shape[1]], dequantize_nf4(packed, state, dtype))  # (batch, out)

    packed, state = weights[-1]                                                  # the two sides agree?
    y_fused = matvec_nf4(inputs[state.shape[1]], packed, state).float()
    y_ref = F.linear(inputs[state.shape[1]], dequantize_nf4(packed, state, dtype)).float()
    rel = ((y_fused - y_ref).abs().max() / y_ref.abs().max()).item()
    fused_name = "fused kernel" if device == "cuda" else "torch twin of the fused kernel"
    n = sum(s.shape.numel() for _, s in weights)
    four_bit = sum(p.numel() + s.absmax.numel() * s.absmax.element_size() + s.nested_absmax.numel() * 4
                   for p, s in weights)                                          # bytes read by the fused path
    w16 = n * torch.finfo(dtype).bits // 8                                       # W written, then read by the matmul
    moved = {"fused": four_bit, "dequant_matmul": four_bit + 2 * w16}
    print(f"decode: {a.layers} layers of {a.dim}/{a.hidden} ({n / 1e9:.2f}B 4-bit weights), batch {a.batch}, {dtype} "
          f"on {device}; {fused_name} vs dequantize-then-matmul, largest difference {rel:.1e} of max |y|; "
          f"{iters} tokens per timing, {a.reps} interleaved rounds; {timing_note(device)}; {machine_note()}")

    systems = {"fused": fused, "dequant_matmul": dequant_matmul}
    t = kernel_seconds(systems, device, iters, a.reps)  # per token
    for name in systems:
        print(f"  {name:15s} {t[name] * 1e3:9.3f} ms per token, {moved[name] / 1e9:.3f} GB moved, "
              f"{moved[name] / t[name] / 1e9:.1f} GB/s")
    name = "decode_fused_vs_dequant_matmul" if device == "cuda" else "decode_twin_vs_dequant_matmul"
    summary(name, a.batch / t["fused"], a.batch / t["dequant_matmul"], "tok/s", digits=2)


def decode_sweep(a):
    """One 4-bit layer of each Llama-7B shape, x of 1, 2, 4, 8 rows: the fused product against dequantize-then-matmul,
    and the largest row count at which the fused one is faster on every shape (what quant.py: _use_fused should
    use; kernels.MATVEC_MAX_ROWS is an estimate until this runs on a GPU)."""
    from kernels import MATVEC_MAX_ROWS, matvec_nf4
    from quant import dequantize_nf4, quantize_nf4
    set_threads(a.threads)
    device = pick_device(a.device)
    dtype = getattr(torch, a.dtype) if a.dtype != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
    iters = a.iters or (20 if device == "cuda" else 3)
    g = torch.Generator().manual_seed(a.seed)
    shapes = [(a.hidden, a.dim), (a.dim, a.hidden), (a.dim, a.dim)]             # gate/up, down, q/k/v/o: (out, in)
    fused_name = "fused kernel" if device == "cuda" else "torch twin of the fused kernel"
    print(f"decode sweep: {fused_name} vs dequantize-then-matmul, one layer per shape, {dtype} on {device}; "
          f"{timing_note(device)}; {machine_note()}")
    print(f"  {'out x in':>13s} {'rows':>4s} {'fused us':>9s} {'dequant+mm us':>13s} {'fused speedup':>13s}")
    faster_up_to = MATVEC_MAX_ROWS
    for out_f, in_f in shapes:
        packed, state = quantize_nf4((torch.randn(out_f, in_f, generator=g) * 0.02).to(device), double_quant=True)
        for rows in (1, 2, 4, 8):
            x = torch.randn(rows, in_f, generator=g).to(device, dtype)                # (rows, in)
            systems = {"fused": lambda: matvec_nf4(x, packed, state),                 # (rows, out)
                       "dequant_matmul": lambda: F.linear(x, dequantize_nf4(packed, state, dtype))}
            t = kernel_seconds(systems, device, iters, a.reps)
            speedup = t["dequant_matmul"] / t["fused"]
            if speedup < 1:
                faster_up_to = min(faster_up_to, rows // 2)
            print(f"  {out_f:>6d} x {in_f:<6d}{rows:>4d} {t['fused'] * 1e6:9.1f} {t['dequant_matmul'] * 1e6:13.1f} "
                  f"{speedup:12.2f}x")
    print(f"crossover: fused faster on every shape up to {faster_up_to} rows "
          f"(quant.py uses it up to kernels.MATVEC_MAX_ROWS = {MATVEC_MAX_ROWS})")


if __name__ == "__main__":
    main()
