"""Checkpoint folders: 4-bit (bitsandbytes) checkpoints both ways, and a clear line for every kind of bad input."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import Llama
from quant import Linear4bit
from test_model import CONFIGS, hf_model, tokens

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


# Shapes for the interop tests. On CPUs with AVX-512-BF16, bitsandbytes (0.50: bitsandbytes/nn/modules.py,
# Linear4bit.forward) repacks a 4-bit weight for a bf16 CPU kernel the first time it runs in inference (module in
# eval mode, input without grad): functional._convert_weight_packed_for_cpu asserts out_features % 32 == 0 and
# reshapes the scales per row (in_features % 64 == 0). Real models have such widths; these tiny ones do too. On
# AVX2-only CPUs (has_avx512bf16() is False) and in train mode everywhere, it dequantizes and multiplies in fp32.
ALIGNED = {
    "llama3": dict(CONFIGS["llama3"], num_attention_heads=4),                  # q 64, k/v 32, mlp 192
    "smollm2": dict(CONFIGS["smollm2"], hidden_size=64, intermediate_size=128, num_attention_heads=4),  # tied
}


def assert_same_logits_on_both_bnb_paths(ref, ours, idx):
    """Compare logits on both of bitsandbytes' CPU paths, whichever CPU runs the test:
    train mode (LLaMA has no dropout) always takes dequantize + fp32 matmul: equal to ours up to fp32 rounding;
    eval mode takes this CPU's inference kernel: the same fp32 path on AVX2, bf16 on AVX-512-BF16. bf16 keeps 8
    significant bits; measured on these models, the bf16 path lands 0.3-0.4% of the largest logit away from ours,
    while swapping the two nibbles of every byte of ONE layer's weight moves logits by 15-28% of it. 2% bounds the
    rounding with room and still fails for a weight read wrongly."""
    with torch.no_grad():
        want = ours(idx)[0]
        ref.train()
        torch.testing.assert_close(ref(idx).logits, want, atol=1e-5, rtol=0)
        ref.eval()
        torch.testing.assert_close(ref(idx).logits, want, atol=0.02 * want.abs().max().item(), rtol=0)


def write_dense(name, path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**ALIGNED[name]))
    with torch.no_grad():  # random norms too, as in test_model.hf_model
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(path)


def test_model_we_quantize_loads_in_transformers_bitsandbytes(tmp_path):
    write_dense("llama3", tmp_path / "dense")
    ours = Llama.from_pretrained(str(tmp_path / "dense"), quantize="nf4")  # quantized tensor by tensor
    assert isinstance(ours.model.layers[0].self_attn.q_proj, Linear4bit)
    assert not isinstance(ours.lm_head, Linear4bit)
    ours.save_pretrained(str(tmp_path / "q4"))
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "q4", dtype=torch.float32)
    assert type(back.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    assert_same_logits_on_both_bnb_paths(back, ours, tokens(131))


def test_bnb_4bit_checkpoint_made_by_transformers_loads_directly(tmp_path):
    """The shape of the Hub's *-bnb-4bit checkpoints: packed weights + absmax + nested stats + quant_state JSON."""
    write_dense("smollm2", tmp_path / "dense")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=cfg,
                                                        dtype=torch.float32)
    ref.save_pretrained(tmp_path / "bnb")
    keys = load_file(str(tmp_path / "bnb" / "model.safetensors")).keys()
    assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in keys
    ours = Llama.from_pretrained(str(tmp_path / "bnb"))
    assert isinstance(ours.model.layers[0].mlp.up_proj, Linear4bit)
    assert_same_logits_on_both_bnb_paths(ref, ours, tokens(97))


def test_odd_shaped_4bit_checkpoint_round_trips_through_our_code(tmp_path):
    """Widths no bitsandbytes CPU kernel takes on every machine (k/v 16 wide, dim 48): our writer and our
    reader are the only parties, and they agree bit for bit."""
    hf_model("smollm2").save_pretrained(tmp_path / "dense")
    ours = Llama.from_pretrained(str(tmp_path / "dense"), quantize="nf4")
    assert ours.model.layers[0].self_attn.k_proj.out_features == 16
    ours.save_pretrained(str(tmp_path / "q4"))
    saved = load_file(str(tmp_path / "q4" / "model.safetensors"))
    assert "model.layers.0.self_attn.k_proj.weight.quant_state.bitsandbytes__nf4" in saved
    back = Llama.from_pretrained(str(tmp_path / "q4"))
    again = back.state_dict()
    assert all(torch.equal(t, again[k]) for k, t in ours.state_dict().items())
    idx = tokens(97)
    with torch.no_grad():
        assert torch.equal(back(idx)[0], ours(idx)[0])


# -- bad input: each case one clear line ---------------------------------------------------------------------------

@pytest.fixture
def good(tmp_path):
    hf_model("llama2").save_pretrained(tmp_path / "m")
    return tmp_path / "m"


def error_of(path):
    with pytest.raises((FileNotFoundError, ValueError)) as e:
        Llama.from_pretrained(str(path))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_folder(tmp_path):
    msg = error_of(tmp_path / "nope")
    assert "does not exist" in msg and "prepare.py" in msg


def test_no_weight_files(good):
    os.remove(good / "model.safetensors")
    assert "no weight files" in error_of(good)


def test_missing_and_unexpected_keys_are_listed(good):
    sd = load_file(str(good / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(sd, str(good / "model.safetensors"))
    msg = error_of(good)
    assert "missing keys: model.layers.1.mlp.up_proj.weight" in msg
    assert "unexpected keys: model.layers.1.mlp.extra.weight" in msg


def test_shape_mismatch_names_key_expected_found(good):
    sd = load_file(str(good / "model.safetensors"))
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    save_file(sd, str(good / "model.safetensors"))
    assert error_of(good).endswith("shape mismatch for model.layers.0.self_attn.k_proj.weight: "
                                   "expected (64, 64), found (32, 64)")


def test_unsupported_architecture(good):
    cfg = json.loads((good / "config.json").read_text())
    cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
    (good / "config.json").write_text(json.dumps(cfg))
    msg = error_of(good)
    assert "unsupported architecture ['Qwen2ForCausalLM']" in msg and "LLaMA" in msg


def test_neither_layout(tmp_path):
    (tmp_path / "x").mkdir()
    assert "neither config.json" in error_of(tmp_path / "x")


def test_pickled_weights_are_refused_with_a_hint(good):
    os.remove(good / "model.safetensors")
    (good / "pytorch_model.bin").write_bytes(b"")
    assert "pickles" in error_of(good)
