"""Checkpoint folders: 4-bit (bitsandbytes) checkpoints both ways, and a clear line for every kind of bad input."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from model import Llama
from quant import Linear4bit
from test_model import hf_model, tokens

transformers = pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")


def test_model_we_quantize_loads_in_transformers_bitsandbytes(tmp_path):
    hf_model("llama3").save_pretrained(tmp_path / "dense")
    ours = Llama.from_pretrained(str(tmp_path / "dense"), quantize="nf4")  # quantized tensor by tensor
    assert isinstance(ours.model.layers[0].self_attn.q_proj, Linear4bit)
    assert not isinstance(ours.lm_head, Linear4bit)
    ours.save_pretrained(str(tmp_path / "q4"))
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "q4", dtype=torch.float32).eval()
    assert type(back.model.layers[0].self_attn.q_proj).__module__.startswith("bitsandbytes")
    idx = tokens(131)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], back(idx).logits, atol=1e-5, rtol=0)


def test_bnb_4bit_checkpoint_made_by_transformers_loads_directly(tmp_path):
    """The shape of the Hub's *-bnb-4bit checkpoints: packed weights + absmax + nested stats + quant_state JSON."""
    hf_model("smollm2").save_pretrained(tmp_path / "dense")
    cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    ref = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=cfg,
                                                        dtype=torch.float32).eval()
    ref.save_pretrained(tmp_path / "bnb")
    keys = load_file(str(tmp_path / "bnb" / "model.safetensors")).keys()
    assert "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4" in keys
    ours = Llama.from_pretrained(str(tmp_path / "bnb"))
    idx = tokens(97)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], ref(idx).logits, atol=1e-5, rtol=0)


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
