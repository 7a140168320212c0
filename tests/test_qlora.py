"""QLoRA: LoRA on a frozen 4-bit base (quant.Linear4bit). The 4-bit bytes never change; merging gives a dense model."""
import math

import pytest
import torch
import torch.nn as nn

from lora import LoRALinear, apply_lora, load_adapter, merge_lora, save_adapter, trainable_report
from model import Llama, ModelArgs
from quant import Linear4bit, quantize_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_qlora_base(compute_dtype=torch.float32):
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, hidden_dim=96,
                            max_seq_len=64)).eval()
    return quantize_model(model, compute_dtype=compute_dtype)  # every linear but lm_head becomes 4-bit


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 61, (4, 16), generator=g), torch.randint(0, 61, (4, 16), generator=g)


def four_bit_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k and "_proj.weight" in k}


def test_qlora_trains_adapters_only_and_merges(tmp_path):
    model = tiny_qlora_base()
    idx, targets = batch()
    with torch.no_grad():
        base_logits = model(idx)[0]
    frozen = four_bit_state(model)
    assert any(k.endswith("q_proj.weight.absmax") for k in frozen)  # bitsandbytes keys of the packed base

    apply_lora(model, r=8, alpha=16, dropout=0.0, targets=TARGETS)
    assert isinstance(model.model.layers[0].self_attn.q_proj.base, Linear4bit)
    with torch.no_grad():
        assert torch.equal(model(idx)[0], base_logits)  # at init: exactly the quantized base model

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(10):
        _, loss = model(idx, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    after = four_bit_state(model)
    assert after.keys() == frozen.keys()
    for k, v in frozen.items():
        assert torch.equal(after[k], v), k  # packed nibbles, absmax, nested absmax, ...: bit-identical

    model.eval()
    with torch.no_grad():
        qlora_logits = model(idx)[0]
    save_adapter(model, str(tmp_path))
    # round trip: a freshly quantized base (same bytes) + the adapter gives the same model, bit for bit
    back = load_adapter(tiny_qlora_base(), str(tmp_path))
    with torch.no_grad():
        assert torch.equal(back(idx)[0], qlora_logits)

    merge_lora(model)
    assert not any(isinstance(m, (LoRALinear, Linear4bit)) for m in model.modules())
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    with torch.no_grad():
        # dequantize + delta in fp32 vs. the unmerged sum of two matmuls: equal up to fp32 rounding
        torch.testing.assert_close(model(idx)[0], qlora_logits, atol=1e-5, rtol=0)


def test_trainable_report_counts_4bit_weights_by_their_original_shape():
    dense = Llama(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, hidden_dim=96,
                            max_seq_len=64))
    quantized = tiny_qlora_base()
    for m in (dense, quantized):
        apply_lora(m, r=4, targets=["q_proj", "v_proj"])
    assert trainable_report(quantized) == trainable_report(dense)
    packed = quantized.model.layers[0].self_attn.q_proj.base.weight
    assert packed.numel() == 64 * 64 // 2  # two weights per byte, but counted as 64 * 64 parameters


def test_bf16_compute_dtype_keeps_fp32_adapters():
    model = apply_lora(tiny_qlora_base(compute_dtype=torch.bfloat16), r=4, dropout=0.0, targets=TARGETS)
    layer = model.model.layers[0].mlp.up_proj
    x = torch.randn(2, 5, 64)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    y.float().sum().backward()
    assert layer.lora_B.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.abs().sum() > 0


def test_a_4bit_base_is_not_merged_in_place():
    layer = LoRALinear(Linear4bit.from_weight(torch.randn(32, 64), compute_dtype=torch.float32), r=2, alpha=2)
    with pytest.raises(TypeError, match="merge_lora"):
        layer.merge()


def qlora_steps(device, bf16, steps=3):
    """The QLoRA recipe of config/persian_qa.py on a tiny model: a 4-bit base, LoRA r=8 on every linear layer,
    gradient checkpointing, and (bf16=True) bf16 autocast with paged AdamW; (bf16=False) fp32 and torch's AdamW.
    The base is quantized on the CPU, so both runs use the same 4-bit bytes. -> (losses, LoRA weights moved by)."""
    from optim import PagedAdamW
    import train
    model = tiny_qlora_base(torch.bfloat16 if bf16 else torch.float32)
    torch.manual_seed(1)
    apply_lora(model, r=8, alpha=16, dropout=0.0, targets=TARGETS)
    model.to(device).train()
    model.gradient_checkpointing = True
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().float().cpu().clone() for p in params]
    opt = (PagedAdamW if bf16 else torch.optim.AdamW)(params, lr=1e-2, weight_decay=0.0)
    losses = []
    for step in range(steps):
        idx, targets = batch(seed=step)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(idx.to(device), targets.to(device))
        loss.backward()
        assert train.optimizer_step(opt, params, grad_clip=1.0)
        losses.append(loss.item())
    moved = torch.cat([(p.detach().float().cpu() - s).flatten() for p, s in zip(params, start)])
    return losses, moved


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_qlora_bf16_checkpointed_paged_steps_follow_the_fp32_run(device):
    """The GPU path of config/persian_qa.py (4-bit base, bf16 autocast, checkpointing, paged AdamW) against the same
    steps in fp32 on the CPU: finite losses within bf16 tolerance, and the adapters move the same way."""
    ref_losses, ref_moved = qlora_steps("cpu", bf16=False)
    losses, moved = qlora_steps(device, bf16=True)
    assert all(math.isfinite(l) for l in losses)
    assert losses == pytest.approx(ref_losses, rel=4e-3)   # bf16 rounding; measured 6e-5 on a CPU
    assert torch.nn.functional.cosine_similarity(moved, ref_moved, dim=0) > 0.95   # measured 0.998 on a CPU
