"""quant.py against bitsandbytes (the reference, test-only) and against itself (Triton kernel vs torch twin)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn

import kernels
import quant
from quant import NF4_TABLE, Linear4bit, dequantize_nf4, quantize_model, quantize_nf4

bnb = pytest.importorskip("bitsandbytes")
bF = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(7, 9), (33, 65), (128, 256), (1001,), (300, 257)]  # odd counts, a 1-D weight, several nested blocks
DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Largest gap between neighbouring levels of the dynamic 8-bit map: the top decade has 64 levels spread evenly
# over [0.1, 1], 0.9 / 64 = 0.0140625 apart. bitsandbytes' CPU 8-bit quantizer uses an approximate search that
# sometimes returns the neighbour of the nearest level (never further, checked below), so its reconstructed absmax
# can differ from ours by at most one such gap times the nested (per-256-block) absmax.
DYNAMIC_MAX_GAP = 0.9 / 64
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # subprocesses import quant from here


@pytest.fixture(autouse=True)
def eager_bitsandbytes():
    # bitsandbytes wraps some CPU fallbacks in torch.compile; run them eagerly (fast, no compiler needed).
    with torch.compiler.set_stance("force_eager"):
        yield


def weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


def bnb_absmax(bnb_state):
    """bitsandbytes' fp32 absmax per 64-block, rebuilt from its (possibly nested) state."""
    if bnb_state.nested:
        return bF.dequantize_blockwise(bnb_state.absmax, bnb_state.state2) + bnb_state.offset
    return bnb_state.absmax


def test_tables_match_bitsandbytes():
    assert torch.equal(NF4_TABLE, bF.get_4bit_type("nf4", device="cpu"))
    dyn = quant.dynamic_map_8bit()
    assert torch.equal(dyn, bF.create_dynamic_map())  # bit for bit
    assert dyn.shape == (256,) and dyn[-1] == 1.0 and (dyn == 0).sum() == 1
    assert (dyn[1:] - dyn[:-1]).max().item() == pytest.approx(DYNAMIC_MAX_GAP, rel=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_plain_nf4_matches_bitsandbytes(shape, dtype):
    w = weight(shape, dtype)
    packed, state = quantize_nf4(w, double_quant=False)
    ref_packed, ref_state = bF.quantize_4bit(w, quant_type="nf4", compress_statistics=False)
    n = w.numel()
    assert packed.shape == ((n + 1) // 2, 1) and packed.dtype == torch.uint8
    assert torch.equal(packed, ref_packed)
    assert torch.equal(state.absmax, ref_state.absmax)
    if n % 2:  # the last low nibble is padding: the code of 0.0
        assert packed[-1, 0].item() & 15 == 7
    out = dequantize_nf4(packed, state)
    assert out.dtype == dtype and out.shape == w.shape
    assert torch.equal(out, bF.dequantize_4bit(ref_packed, ref_state, quant_type="nf4"))


def test_a_tie_goes_to_the_lower_code():
    # one block with absmax exactly 1.0 (so scaling is exact) holding every midpoint between neighbouring levels
    midpoints = (NF4_TABLE[:-1] + NF4_TABLE[1:]) / 2                       # (15,)
    w = torch.cat([torch.tensor([1.0]), midpoints, torch.zeros(48)])       # (64,)
    packed, state = quantize_nf4(w, double_quant=False)
    codes = torch.stack([packed[:, 0] >> 4, packed[:, 0] & 15], dim=1).view(-1)
    assert codes[1:16].tolist() == list(range(15))  # midpoint i sits between levels i and i + 1: take i
    assert torch.equal(packed, bF.quantize_4bit(w, quant_type="nf4", compress_statistics=False)[0])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_double_quant_matches_bitsandbytes(shape, dtype):
    w = weight(shape, dtype, seed=1)
    packed, state = quantize_nf4(w, double_quant=True)
    ref_packed, ref_state = bF.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, ref_packed)  # the 4-bit codes are exact
    assert state.offset == ref_state.offset.item()
    assert torch.equal(state.nested_absmax, ref_state.state2.absmax)
    assert state.absmax.dtype == torch.uint8 and state.absmax.shape == ref_state.absmax.shape
    # 8-bit absmax codes: equal or a neighbouring level (see DYNAMIC_MAX_GAP), and ours is the nearest level.
    # A 256-block whose values all equal the offset has nested absmax 0: any code decodes to 0 there, skip it.
    ours, theirs = state.absmax.long(), ref_state.absmax.long()
    scale = state.nested_absmax.repeat_interleave(256)[:ours.numel()]
    live = scale > 0
    assert ((ours - theirs)[live].abs() <= 1).all()
    target = quantize_nf4(w, double_quant=False)[1].absmax - state.offset  # what the 8-bit step encodes
    err_ours = (target[live] / scale[live] - state.nested_code[ours[live]]).abs()
    err_theirs = (target[live] / scale[live] - state.nested_code[theirs[live]]).abs()
    assert (err_ours <= err_theirs + 1e-7).all()
    tol = DYNAMIC_MAX_GAP * state.nested_absmax.max().item() * (1 + 1e-5)
    assert (kernels._absmax_fp32(state) - bnb_absmax(ref_state)).abs().max() <= tol
    # weights: |NF4 level| <= 1, so they differ by at most the absmax tolerance (plus one rounding of the dtype)
    ours_w = dequantize_nf4(packed, state).float()
    ref_w = bF.dequantize_4bit(ref_packed, ref_state, quant_type="nf4").float()
    assert (ours_w - ref_w).abs().max() <= tol + torch.finfo(dtype).eps * ref_w.abs().max()
    # where the codes agree, the weights agree bit for bit
    agree = (ours == theirs).repeat_interleave(64)[:w.numel()].view(w.shape)
    assert torch.equal(ours_w[agree], ref_w[agree])


def test_nf4_error_on_standard_normal():
    # published numbers for NF4, blocksize 64, on randn(1024, 1024): mean abs error 0.0728, relative 0.2033
    w = weight((1024, 1024), seed=2)
    packed, state = quantize_nf4(w)
    err = (dequantize_nf4(packed, state) - w).abs()
    assert err.mean().item() == pytest.approx(0.0728, abs=5e-4)
    assert (err / (w.abs() + 1e-8)).mean().item() == pytest.approx(0.2033, abs=3e-3)


def test_bits_per_param():
    w = weight((1024, 1024), torch.bfloat16)
    n = w.numel()
    packed, state = quantize_nf4(w, double_quant=False)
    assert quant.bits_per_param(packed, state) == 4 + 32 / 64 == 4.5
    packed, state = quantize_nf4(w, double_quant=True)
    bpp = quant.bits_per_param(packed, state)
    assert bpp == (4 * n + 8 * (n // 64) + 32 * (n // 64 // 256) + 32) / n
    assert bpp == pytest.approx(4.127, abs=5e-4)


def test_quantizing_a_large_weight_stays_frugal():
    # a 4096 x 11008 bf16 weight is 90 MB; a dense fp32 copy alone would be 180 MB and int64 codes 360 MB
    script = textwrap.dedent("""
        import resource, torch, quant
        w = torch.empty(4096, 11008, dtype=torch.bfloat16).normal_()
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        packed, state = quant.quantize_nf4(w)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.split()[-1]) < 150  # MB of peak growth: the 22.5 MB result plus small chunks


def test_triton_kernel_interpreted_matches_torch_twin():
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch, quant
        cases = 0
        for shape in [(7, 9), (33, 65), (64, 130), (1001,), (300, 257)]:
            for double_quant in (True, False):
                w = torch.randn(shape, generator=torch.Generator().manual_seed(cases))
                packed, state = quant.quantize_nf4(w, double_quant=double_quant)
                for dtype, bits in [(torch.float32, torch.int32), (torch.bfloat16, torch.int16),
                                    (torch.float16, torch.int16)]:
                    a = quant.dequantize_nf4(packed, state, dtype, backend="triton")
                    b = quant.dequantize_nf4(packed, state, dtype, backend="torch")
                    assert a.dtype == dtype and a.shape == w.shape
                    assert torch.equal(a.view(bits), b.view(bits)), (shape, double_quant, dtype)
                    cases += 1
        print("OK", cases)
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # must be set before triton is imported
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[-2:] == ["OK", "30"]


def test_works_without_triton():
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch, quant
        packed, state = quant.quantize_nf4(torch.randn(8, 8))
        assert quant.dequantize_nf4(packed, state).shape == (8, 8)
        try:
            quant.dequantize_nf4(packed, state, backend="triton")
        except RuntimeError as e:
            print("refused:", "pip install triton" in str(e))
    """)
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "refused: True"


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_linear4bit_matches_dense_linear(compute_dtype):
    torch.manual_seed(0)
    dense = nn.Linear(96, 40)
    layer = Linear4bit.from_linear(dense, compute_dtype=compute_dtype)
    assert (layer.in_features, layer.out_features) == (96, 40)
    ref = nn.Linear(96, 40, dtype=compute_dtype)
    with torch.no_grad():
        ref.weight.copy_(layer.dequantize(compute_dtype))
        ref.bias.copy_(dense.bias)
    x = torch.randn(3, 5, 96, requires_grad=True)
    y = layer(x)
    assert y.dtype == compute_dtype
    x_ref = x.detach().to(compute_dtype).requires_grad_()
    y_ref = ref(x_ref)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert x.grad.dtype == torch.float32
    assert torch.equal(x.grad, x_ref.grad.float())
    assert layer.bias.grad is None  # frozen
    # and the 4-bit layer is close to the original dense layer
    rel = (y.float() - dense(x).float()).norm() / dense(x).float().norm()
    assert 0.01 < rel.item() < 0.15


def test_no_dense_weight_is_saved_for_backward():
    torch.manual_seed(0)
    dense = nn.Linear(64, 48)

    def saved_by(module):
        saved = []
        x = torch.randn(4, 64, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            module(x).sum().backward()
        return saved

    is_dense_weight = lambda t: t.is_floating_point() and t.shape in {(48, 64), (64, 48)}  # W or its transpose
    assert any(is_dense_weight(t) for t in saved_by(dense))  # the check can see a saved weight...
    saved = saved_by(Linear4bit.from_linear(dense))
    assert not any(is_dense_weight(t) for t in saved)  # ...and the 4-bit layer saves none
    assert [(t.dtype, tuple(t.shape)) for t in saved] == [(torch.uint8, (48 * 64 // 2, 1))]


def bnb_layer_from(dense, compress_statistics=True, compute_dtype=torch.bfloat16):
    layer = bnb.nn.Linear4bit(dense.in_features, dense.out_features, bias=dense.bias is not None,
                              compute_dtype=compute_dtype, quant_type="nf4", compress_statistics=compress_statistics)
    layer.load_state_dict(dense.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes when the parameter is moved to a device


@pytest.mark.parametrize("double_quant", [True, False])
def test_bitsandbytes_state_dict_loads_into_ours(double_quant):
    torch.manual_seed(0)
    dense = nn.Linear(130, 70)  # 9100 weights: 143 blocks, one partial
    ref = bnb_layer_from(dense, compress_statistics=double_quant)
    sd = ref.state_dict()
    ours = Linear4bit(130, 70)
    ours.load_state_dict(sd)
    assert ours.quant_state.double_quant == double_quant
    x = torch.randn(6, 130, dtype=torch.bfloat16)
    expected = ref(x)
    assert torch.equal(ours(x), expected)
    built = Linear4bit.from_bnb_state(dict(sd))
    assert torch.equal(built(x), expected)
    # our own quantization of the same weight writes the same keys, in the same order, with the same JSON
    mine = Linear4bit.from_linear(dense, double_quant=double_quant).state_dict()
    assert list(mine) == list(sd)
    key = "weight.quant_state.bitsandbytes__nf4"
    assert bytes(mine[key].tolist()) == bytes(sd[key].tolist())
    assert torch.equal(mine["weight"], sd["weight"])
    assert all(mine[k].dtype == sd[k].dtype and mine[k].shape == sd[k].shape for k in sd)


@pytest.mark.parametrize("double_quant", [True, False])
def test_our_state_dict_loads_into_bitsandbytes(double_quant):
    torch.manual_seed(0)
    ours = Linear4bit.from_linear(nn.Linear(130, 70), double_quant=double_quant)
    sd = ours.state_dict()
    # the path transformers takes for *-bnb-4bit checkpoints: Params4bit.from_prequantized
    ref = bnb.nn.Linear4bit(130, 70, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4")
    stats = {k: v for k, v in sd.items() if k.startswith("weight.")}
    ref.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=ref)
    ref.bias = nn.Parameter(sd["bias"], requires_grad=False)
    assert ref.weight.quant_state.nested == double_quant
    x = torch.randn(6, 130, dtype=torch.bfloat16)
    assert torch.equal(ref(x), ours(x))


def test_state_dict_survives_safetensors_and_a_model():
    from safetensors.torch import load, save

    torch.manual_seed(0)
    model = quantize_model(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16, bias=False)))
    blob = save(model.state_dict())  # refuses tensors sharing memory: the code tables must be separate
    fresh = nn.Sequential(Linear4bit(32, 64), nn.ReLU(), Linear4bit(64, 16, bias=False))
    fresh.load_state_dict(load(blob))
    x = torch.randn(5, 32)
    assert torch.equal(fresh(x), model(x))


def test_loading_rejects_wrong_checkpoints():
    layer = Linear4bit(32, 64)
    with pytest.raises(RuntimeError, match="from_weight"):  # a dense nn.Linear state dict
        layer.load_state_dict(nn.Linear(32, 64).state_dict())
    with pytest.raises(RuntimeError, match=r"checkpoint weight is \(64, 16\)"):
        layer.load_state_dict(Linear4bit.from_linear(nn.Linear(16, 64)).state_dict())
    fp4 = bnb.nn.Linear4bit(32, 64, quant_type="fp4")
    fp4.load_state_dict(nn.Linear(32, 64).state_dict())
    with pytest.raises(ValueError, match="FP4"):
        Linear4bit.from_bnb_state(fp4.to("cpu").state_dict())


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="blocksize"):
        quantize_nf4(torch.randn(8, 8), blocksize=48)
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        quantize_nf4(torch.ones(8, 8, dtype=torch.int64))
    packed, state = quantize_nf4(torch.randn(8, 8))
    with pytest.raises(ValueError, match="backend"):
        dequantize_nf4(packed, state, backend="cuda")
    with pytest.raises(ValueError, match="packed bytes"):
        dequantize_nf4(packed[:-1], state)
    with pytest.raises(TypeError, match="nn.Linear"):
        quantize_model(nn.Linear(4, 4))


def test_moving_a_layer_moves_its_state_and_keeps_its_dtypes():
    layer = Linear4bit.from_linear(nn.Linear(64, 64))
    layer.to(torch.float16)  # a model-wide cast must not touch the 4-bit storage or its fp32 scales
    s = layer.quant_state
    assert layer.weight.dtype == torch.uint8 and s.absmax.dtype == torch.uint8
    assert s.nested_absmax.dtype == torch.float32 and s.code.dtype == torch.float32
    layer.to("meta")
    s = layer.quant_state
    assert all(t.device.type == "meta" for t in (layer.weight, s.absmax, s.code, s.nested_absmax, s.nested_code))


def test_quantize_model_replaces_linears_but_skips_lm_head():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(16, 16)
            self.mlp = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 16))
            self.norm = nn.LayerNorm(16)

        def forward(self, x):
            return self.norm(x + self.mlp(self.q_proj(x)))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 16), Block(), Block())
    model.lm_head = nn.Linear(16, 10)
    x = torch.randint(0, 10, (2, 7))
    before = model.lm_head(model[:3](x))
    assert quantize_model(model) is model
    kinds = {name: type(m) for name, m in model.named_modules()}
    quantized = sorted(name for name, k in kinds.items() if k is Linear4bit)
    assert quantized == ["1.mlp.0", "1.mlp.2", "1.q_proj", "2.mlp.0", "2.mlp.2", "2.q_proj"]
    assert kinds["lm_head"] is nn.Linear and kinds["1.norm"] is nn.LayerNorm and kinds["0"] is nn.Embedding
    after = model.lm_head(model[:3](x).float())
    assert (after - before).norm() / before.norm() < 0.1


def check_dequant_kernel_and_layer(device, shapes):
    """The dequantization kernel bit for bit against the torch twin, and a 4-bit layer's forward and backward, on
    `device`. On a GPU the compiled kernel at 7B sizes (below, marked cuda); on the CPU the same lines, interpreted."""
    for shape in shapes:
        for double_quant in (True, False):
            w = torch.randn(shape, device=device)
            packed, state = quantize_nf4(w, double_quant=double_quant)
            for dtype, bits in [(torch.float32, torch.int32), (torch.bfloat16, torch.int16),
                                (torch.float16, torch.int16)]:
                a = dequantize_nf4(packed, state, dtype, backend="triton")
                b = dequantize_nf4(packed, state, dtype, backend="torch")
                assert torch.equal(a.view(bits), b.view(bits)), (shape, dtype)
    layer = Linear4bit.from_linear(nn.Linear(256, 128), compute_dtype=torch.float32).to(device)  # fp32: exact sums
    s = layer.quant_state
    assert all(t.device.type == torch.device(device).type
               for t in (layer.weight, s.absmax, s.code, s.nested_absmax, s.nested_code))
    x = torch.randn(4, 256, device=device, requires_grad=True)
    y = layer(x)                                                          # (4, 128)
    y.sum().backward()
    w = dequantize_nf4(layer.weight, s, torch.float32, backend="torch")   # (128, 256)
    # x.grad = ones @ W exactly up to fp32 summation order: 256 terms of size |W| ~ 0.1
    torch.testing.assert_close(x.grad, w.sum(0).expand(4, -1), rtol=0, atol=1e-4)
    torch.testing.assert_close(y, x.detach() @ w.T + layer.bias, rtol=0, atol=1e-4)


def test_dequant_kernel_and_layer_check_runs_interpreted():
    """The lines of the GPU test below, on the CPU under the Triton interpreter: a typo shows here first."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([ROOT, os.path.join(ROOT, "tests")])}
    code = "import test_quant; test_quant.check_dequant_kernel_and_layer('cpu', [(7, 9), (67, 131)]); print('OK')"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[-1] == "OK"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_triton_kernel_matches_torch_twin():
    pytest.importorskip("triton")
    # a 32000 x 4096 embedding-sized weight too: 131M values, offsets far past one program's
    check_dequant_kernel_and_layer("cuda", [(7, 9), (4096, 1024 + 3), (11008, 512), (32000, 4096)])
