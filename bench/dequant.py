"""
NF4 dequantization throughput: the step QLoRA runs for every linear layer twice per micro-batch (forward and
backward), three times with gradient checkpointing (forward, recomputed forward, backward).

    python bench/dequant.py                       # an 11008 x 4096 weight (a Llama-7B MLP projection)
    python bench/dequant.py --rows=32000          # 32000 x 4096: the size of Llama 2's embedding and head
    python bench/dequant.py --smoke=True          # a small weight, to check that it runs
    python bench/dequant.py --decode=True         # 4-bit decoding: fused kernel vs dequantize-then-matmul, 7B layers
    python bench/dequant.py --decode_sweep=True   # the same per layer shape at 1, 2, 4, 8 rows: where each path wins

The settings, each with what it means, are the block at the top of the code (and bench/common.py: SHARED_SETTINGS).

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

decode=True times what one decoding step does with a 4-bit model: every linear layer of a stack of Llama-7B-shaped
layers (q, k, v, o: dim x dim; gate, up: hidden x dim; down: dim x hidden) multiplies one token per sequence.
  CUDA: kernels.matvec_nf4 (the fused Triton kernel: W never written in 16 bits) vs dequantize_nf4 + F.linear;
  CPU:  the fused kernel's torch twin vs dequantize_nf4 + F.linear (at smoke size in the tests).
It prints ms per token for the whole stack and the GB/s each side must move at least (4-bit weights; plus W in
16 bits written and read back by dequantize-then-matmul), and ends in one "decode_*" summary line in tokens/s
(ours: the fused path). On CPU the twin rebuilds W in cache-sized chunks, so its "GB moved" is only a floor.
"""

import sys

import torch
import torch.nn.functional as F

import common

# -- settings (defaults; override with --key=value or a config file, see configurator.py) -------------------------
rows = 11008                 # the weight's height (11008 x 4096: a Llama-7B MLP projection)
cols = 4096                  # the weight's width (the layer's input features)
blocksize = 64               # values per NF4 block (one absmax each)
reps = 5                     # timed rounds, each system once per round, interleaved
iters = 0                    # calls per timing (0: 3 on a CPU, 50 on CUDA; 20 tokens on CUDA with decode)
decode = False               # 4-bit decoding through a stack of Llama-7B-shaped layers, instead of one weight
decode_sweep = False         # fused vs dequantize-then-matmul per layer shape at 1, 2, 4, 8 rows, and the crossover
dim = 4096                   # decode and decode_sweep: the model's width
hidden = 11008               # decode and decode_sweep: the MLP's width
layers = 32                  # decode: layers in the stack
batch_size = 1               # decode: sequences decoded together (rows of x)
# -------------------------------------------------------------------------------------------------------------------
settings = {**common.SHARED_SETTINGS,  # device, dtype (of the output), threads, seed, smoke: bench/common.py
            **{k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}}

from common import (kernel_seconds, machine_note, pick_device, pick_dtype, set_threads, summary,  # noqa: E402
                    timing_note)
from configurator import configure  # noqa: E402


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
    cfg = configure(settings, argv)
    if cfg["smoke"]:
        cfg.update(rows=256, cols=256, reps=1, iters=1, dim=64, hidden=96, layers=2)
    if cfg["decode_sweep"]:
        return time_decode_sweep(cfg)
    if cfg["decode"]:
        return time_decode(cfg)
    rows, cols, reps = cfg["rows"], cfg["cols"], cfg["reps"]
    if min(rows, cols, reps) < 1 or cfg["iters"] < 0:
        sys.exit("error: rows, cols and reps must be at least 1, iters at least 0")
    set_threads(cfg["threads"])
    device = pick_device(cfg["device"])
    dtype = pick_dtype(cfg["dtype"], device)
    iters = cfg["iters"] or (50 if device == "cuda" else 3)

    import bitsandbytes.functional as bF
    from quant import dequantize_nf4, quantize_nf4

    g = torch.Generator().manual_seed(cfg["seed"])
    weight = torch.randn(rows, cols, generator=g).to(device)                       # (rows, cols) fp32
    packed, state = quantize_nf4(weight, cfg["blocksize"], double_quant=True)      # ((n + 1) // 2, 1) uint8
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
    print(f"dequant: {rows} x {cols} NF4 weight ({n / 1e6:.1f}M values), blocksize {cfg['blocksize']}, double quant, "
          f"-> {dtype} on {device}; {iters} calls per timing, {reps} interleaved rounds, "
          f"outputs {agree}; {timing_note(device)}; {machine_note()}")

    t = kernel_seconds(systems, device, iters, reps)  # per call
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


def time_decode(cfg):
    """Fused 4-bit matrix-vector products vs dequantize-then-matmul over a stack of layers (see the docstring)."""
    from kernels import MATVEC_MAX_ROWS, matvec_nf4
    from quant import dequantize_nf4, quantize_nf4
    dim, hidden, layers, batch, reps = cfg["dim"], cfg["hidden"], cfg["layers"], cfg["batch_size"], cfg["reps"]
    if min(dim, hidden, layers, reps) < 1 or not 1 <= batch <= MATVEC_MAX_ROWS:
        sys.exit(f"error: dim, hidden, layers, reps must be at least 1, batch_size 1..{MATVEC_MAX_ROWS}")
    set_threads(cfg["threads"])
    device = pick_device(cfg["device"])
    dtype = pick_dtype(cfg["dtype"], device)
    iters = cfg["iters"] or (20 if device == "cuda" else 3)
    g = torch.Generator().manual_seed(cfg["seed"])
    shapes = [(dim, dim)] * 4 + [(hidden, dim)] * 2 + [(dim, hidden)]            # q k v o, gate up, down
    weights = []                                                                 # [(packed, state)] per linear
    for _ in range(layers):
        for shape in shapes:
            w = (torch.randn(shape, generator=g) * 0.02).to(device)                  # (out, in), one at a time
            weights.append(quantize_nf4(w, cfg["blocksize"], double_quant=True))
    inputs = {n: torch.randn(batch, n, generator=g).to(device, dtype) for n in {dim, hidden}}  # (batch, in)

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
    print(f"decode: {layers} layers of {dim}/{hidden} ({n / 1e9:.2f}B 4-bit weights), batch {batch}, {dtype} "
          f"on {device}; {fused_name} vs dequantize-then-matmul, largest difference {rel:.1e} of max |y|; "
          f"{iters} tokens per timing, {reps} interleaved rounds; {timing_note(device)}; {machine_note()}")

    systems = {"fused": fused, "dequant_matmul": dequant_matmul}
    t = kernel_seconds(systems, device, iters, reps)  # per token
    for name in systems:
        print(f"  {name:15s} {t[name] * 1e3:9.3f} ms per token, {moved[name] / 1e9:.3f} GB moved, "
              f"{moved[name] / t[name] / 1e9:.1f} GB/s")
    name = "decode_fused_vs_dequant_matmul" if device == "cuda" else "decode_twin_vs_dequant_matmul"
    summary(name, batch / t["fused"], batch / t["dequant_matmul"], "tok/s", digits=2)


def time_decode_sweep(cfg):
    """One 4-bit layer of each Llama-7B shape, x of 1, 2, 4, 8 rows: the fused product against dequantize-then-matmul,
    and the largest row count at which the fused one is faster on every shape (what quant.py: _use_fused should
    use; kernels.MATVEC_MAX_ROWS is an estimate until this runs on a GPU)."""
    from kernels import MATVEC_MAX_ROWS, matvec_nf4
    from quant import dequantize_nf4, quantize_nf4
    set_threads(cfg["threads"])
    device = pick_device(cfg["device"])
    dtype = pick_dtype(cfg["dtype"], device)
    iters = cfg["iters"] or (20 if device == "cuda" else 3)
    g = torch.Generator().manual_seed(cfg["seed"])
    dim, hidden = cfg["dim"], cfg["hidden"]
    shapes = [(hidden, dim), (dim, hidden), (dim, dim)]                         # gate/up, down, q/k/v/o: (out, in)
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
            t = kernel_seconds(systems, device, iters, cfg["reps"])
            speedup = t["dequant_matmul"] / t["fused"]
            if speedup < 1:
                faster_up_to = min(faster_up_to, rows // 2)
            print(f"  {out_f:>6d} x {in_f:<6d}{rows:>4d} {t['fused'] * 1e6:9.1f} {t['dequant_matmul'] * 1e6:13.1f} "
                  f"{speedup:12.2f}x")
    print(f"crossover: fused faster on every shape up to {faster_up_to} rows "
          f"(quant.py uses it up to kernels.MATVEC_MAX_ROWS = {MATVEC_MAX_ROWS})")


if __name__ == "__main__":
    main()
