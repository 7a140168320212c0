"""kernels.py's fused NF4 matrix-vector kernel against its torch twin and dequantize-then-matmul, and when
Linear4bit uses it.

On CPU the kernel runs under Triton's interpreter, in a fresh process (TRITON_INTERPRET must be set before triton is
imported): run_interpreted("check_...") calls a check_* function of this file there. Small odd shapes only: the
interpreter is slow. The 7B-sized shapes run in the tests marked `cuda`. Nothing here needs bitsandbytes.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import kernels
import quant
from model import Llama, ModelArgs
from kernels import matvec_nf4
from quant import Linear4bit, dequantize_nf4, quantize_model, quantize_nf4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (out, in): out is not a multiple of the 32-feature tile, in not a multiple of the 64-value chunk nor of the NF4
# block, so blocks span rows; with in = 201 every other row also starts in the middle of a byte.
SHAPES = [(67, 200), (33, 201)]


def run_interpreted(name, *args):
    """test_kernels.name(*args) in a fresh process under TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    res = subprocess.run([sys.executable, "-c", f"import test_kernels; test_kernels.{name}(*{args!r}); print('OK')"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[-1] == "OK"


def case(shape, rows, dtype, double_quant, seed=0, device="cpu"):
    """A quantized weight, an input of `rows` rows and a bias, all as Linear4bit would pass them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(device)                        # (out, in)
    packed, state = quantize_nf4(w, double_quant=double_quant)
    x = torch.randn(rows, shape[1], generator=g).to(device, dtype)        # (rows, in)
    bias = torch.randn(shape[0], generator=g).to(device, dtype)           # (out,)
    return x, packed, state, bias


def error_bound(x, w, bias, dtype, roundings=1):
    """How far y = x @ w.T + bias may be from the exact (fp64) result when products and sums are fp32 and y is
    rounded to `dtype` `roundings` times (CPU's bf16 F.linear may round x @ w.T before adding the bias).

    n fp32 operations in a chain err by at most gamma_n = n u / (1 - n u) (u = 2^-24) times sum |x| |w| + |bias|
    (Higham, Accuracy and Stability of Numerical Algorithms, 3.1); each rounding to `dtype` adds u_dtype |y|.
    In bf16 the last term dominates: the bound is about one half ulp of each output, so a wrong nibble, absmax or
    row offset (an error of the size of a weight times x) is far outside it.
    """
    K, u = x.shape[-1], 2.0 ** -24
    gamma = (K + 2) * u / (1 - (K + 2) * u)
    magnitude = x.double().abs() @ w.double().abs().T + bias.double().abs()   # (rows, out)
    exact = x.double() @ w.double().T + bias.double()                         # (rows, out)
    u_out = torch.finfo(dtype).eps / 2
    return exact, roundings * u_out * (exact.abs() + gamma * magnitude) + gamma * magnitude


def check_fused_matches_dequantize_then_matmul():
    cases = 0
    wanted = kernels.programs_wanted
    for shape in SHAPES:
        for rows in (1, 3, 8):
            for double_quant in (True, False):
                for dtype in (torch.bfloat16, torch.float32):
                    # the grid: K in one slice, in 2 to 4 slices (the default here), in one slice per BLOCK_K
                    programs = (1, 8, 10**4)[cases % 3]
                    kernels.programs_wanted = lambda device: programs
                    x, packed, state, bias = case(shape, rows, dtype, double_quant, seed=cases)
                    w = dequantize_nf4(packed, state, dtype)                  # (out, in) what both paths multiply
                    fused = matvec_nf4(x, packed, state, bias, backend="triton")  # (rows, out)
                    twin = matvec_nf4(x, packed, state, bias, backend="torch")
                    reference = F.linear(x, w, bias)                          # dequantize, then matmul
                    assert fused.dtype == dtype and fused.shape == (rows, shape[0])
                    exact, bound = error_bound(x, w, bias, dtype)
                    _, bound_ref = error_bound(x, w, bias, dtype, roundings=2)
                    assert ((fused.double() - exact).abs() <= bound).all(), (shape, rows, double_quant, dtype)
                    assert ((twin.double() - exact).abs() <= bound).all(), (shape, rows, double_quant, dtype)
                    assert ((reference.double() - exact).abs() <= bound_ref).all()
                    cases += 1
    kernels.programs_wanted = wanted
    assert cases == 24


def test_fused_kernel_interpreted_matches_dequantize_then_matmul():
    run_interpreted("check_fused_matches_dequantize_then_matmul")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_torch_twin_matches_dequantize_then_matmul(shape, double_quant, monkeypatch):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, packed, state, bias = case(shape, 5, dtype, double_quant)
        w = dequantize_nf4(packed, state, dtype)
        exact, bound = error_bound(x, w, bias, dtype)
        y = matvec_nf4(x, packed, state, bias, backend="torch")
        assert y.dtype == dtype and ((y.double() - exact).abs() <= bound).all()
        if dtype == torch.float32:  # fp32 throughout: only the order of the sums can differ
            assert torch.allclose(y, F.linear(x, w, bias), rtol=0, atol=bound.max().item())
    # leading batch dims are kept; W rebuilt three rows at a time (the last group shorter) is still right
    x = torch.randn(2, 3, shape[1])                                       # (2, 3, in)
    assert matvec_nf4(x, packed, state).shape == (2, 3, shape[0])
    w = dequantize_nf4(packed, state, torch.float32)                      # (out, in)
    monkeypatch.setattr(kernels, "CHUNK", 3 * shape[1])  # not whole blocks: fine for the twin, which goes by rows
    y = matvec_nf4(x, packed, state, bias.float())                        # (2, 3, out)
    exact, bound = error_bound(x.view(6, -1), w, bias.float(), torch.float32)
    assert ((y.view(6, -1).double() - exact).abs() <= bound).all()


def test_matvec_rejects_bad_input():
    x, packed, state, _ = case((8, 16), 2, torch.float32, True)
    with pytest.raises(ValueError, match="does not multiply"):
        matvec_nf4(x[:, :15], packed, state)
    with pytest.raises(ValueError, match="backend"):
        matvec_nf4(x, packed, state, backend="cuda")
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        matvec_nf4(x.long(), packed, state)
    if kernels.triton is not None:
        with pytest.raises(ValueError, match="at most 8 rows"):
            matvec_nf4(torch.randn(9, 16), packed, state, backend="triton")


def test_linear4bit_uses_the_fused_kernel_only_for_decoding(monkeypatch):
    calls = []

    def fake_kernel(x, packed, state, bias):  # stands in for the GPU kernel: records the call, computes the twin
        calls.append(tuple(x.shape))
        return kernels.matvec_torch(x, packed, state, bias)

    monkeypatch.setattr(kernels, "triton", kernels.triton or "installed")
    monkeypatch.setattr(kernels, "matvec_triton", fake_kernel)
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(torch.nn.Linear(40, 24))

    def fused(x):
        calls.clear()
        layer(x)
        assert calls in ([], [(x.numel() // 40, 40)])
        return bool(calls)

    assert not fused(torch.randn(1, 1, 40))                # on CPU: never (FUSED_DEVICES is ("cuda",))
    monkeypatch.setattr(quant, "FUSED_DEVICES", ("cpu",))  # pretend the CPU is a GPU
    with torch.no_grad():
        assert fused(torch.randn(1, 1, 40))                # one token
        assert fused(torch.randn(8, 1, 40))                # a batch of 8 sequences, one token each
        assert not fused(torch.randn(3, 3, 40))            # 9 rows: a prefill, dequantize then matmul
    assert fused(torch.randn(2, 40))                       # grad mode, but nothing asks for a gradient
    x = torch.randn(2, 40, requires_grad=True)
    assert not fused(x)                                    # training: backward needs _NF4Linear
    layer(x).sum().backward()
    assert x.grad is not None
    layer.bias.requires_grad_(True)
    assert not fused(torch.randn(2, 40))                   # an unfrozen bias wants its gradient
    layer.bias.requires_grad_(False)
    monkeypatch.setattr(kernels, "triton", None)
    with torch.no_grad():
        assert not fused(torch.randn(1, 40))               # no triton: the torch path


def tiny_4bit_model(device="cpu"):
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, hidden_dim=96,
                            max_seq_len=64)).to(device)
    return quantize_model(model, compute_dtype=torch.float32).eval()


def greedy(model, prompt, n):
    return torch.cat(list(model.generate(prompt, n, temperature=0)), dim=1)  # (B, n)


def check_generation_with_fused_kernel(device="cpu", n=4):
    """Greedy tokens of a tiny 4-bit model, decoded with the fused kernel and with dequantize-then-matmul: the same.
    On the CPU the kernel runs interpreted (the CPU made a "fused device" for the test); on a GPU compiled."""
    model = tiny_4bit_model(device)
    prompt = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0)).to(device)  # (2, 5)
    fused_devices = quant.FUSED_DEVICES
    quant.FUSED_DEVICES = ()
    plain = greedy(model, prompt, n)                        # dequantize then matmul everywhere
    quant.FUSED_DEVICES = (torch.device(device).type,)      # decode steps (2 rows) now take the kernel
    calls = []
    matvec = kernels.matvec_triton
    kernels.matvec_triton = lambda *a: calls.append(1) or matvec(*a)
    try:
        assert torch.equal(greedy(model, prompt, n), plain)
    finally:
        kernels.matvec_triton, quant.FUSED_DEVICES = matvec, fused_devices
    assert len(calls) == (n - 1) * 2 * 7                    # every decode step x 2 layers x 7 linear layers


def test_generation_with_fused_kernel_interpreted():
    run_interpreted("check_generation_with_fused_kernel")


def check_compiled_kernel_matches_twin(device, shapes):
    """The fused kernel against the torch twin and the exact result, both within error_bound, on `device`. On a
    GPU the compiled kernel at Llama-7B sizes (below, marked cuda); on the CPU the same lines, interpreted."""
    # the twin's fp32 matmul in true fp32: TF32 (10-bit mantissa) would be far outside the bound
    tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False
    try:
        for shape in shapes:
            for rows in (1, 8):
                for dtype in (torch.bfloat16, torch.float32):
                    for double_quant in (True, False):
                        x, packed, state, bias = case(shape, rows, dtype, double_quant, device=device)
                        fused = matvec_nf4(x, packed, state, bias, backend="triton")   # (rows, out)
                        twin = matvec_nf4(x, packed, state, bias, backend="torch")     # (rows, out)
                        w = dequantize_nf4(packed, state, dtype)                       # (out, in)
                        exact, bound = error_bound(x, w, bias, dtype)                  # fp64, on `device`
                        assert ((fused.double() - exact).abs() <= bound).all(), (shape, rows, dtype)
                        assert ((twin.double() - exact).abs() <= bound).all(), (shape, rows, dtype)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def test_compiled_kernel_check_runs_interpreted():
    """The lines of the GPU test below, on the CPU: a typo in them shows here, not first on a GPU."""
    run_interpreted("check_compiled_kernel_matches_twin", "cpu", [(40, 130), (67, 64)])


# -----------------------------------------------------------------------------
# On a GPU: the compiled kernel at Llama-7B sizes, and a 4-bit model generating with it


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_fused_kernel_matches_twin_at_7b_size():
    pytest.importorskip("triton")
    device = f"cuda:{torch.cuda.device_count() - 1}"  # the last GPU: kernels must launch where the tensors are
    current = torch.cuda.current_device()
    # down_proj, gate/up_proj of Llama 7B, and a head-sized one (32000 x 4096: many output blocks, K in one slice)
    check_compiled_kernel_matches_twin(device, [(4096, 11008), (11008, 4096), (32000, 4096)])
    assert torch.cuda.current_device() == current  # kernels.on_device switched the device only for the launch


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_4bit_generation_on_gpu_gives_the_same_tokens():
    pytest.importorskip("triton")
    check_generation_with_fused_kernel("cuda", n=8)
