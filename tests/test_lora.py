"""lora.py against PEFT: adapters cross-load both ways with equal logits; merge, training and dropout behave."""
import json
import math
import os

import pytest
import torch
import torch.nn as nn

import export
from lora import (LoRALinear, apply_lora, load_adapter, mark_only_lora_as_trainable, merge_lora,
                  save_adapter, trainable_report)
from model import Llama, ModelArgs

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

UNTIED = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=101, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=64,
              tie_word_embeddings=False, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
TIED = dict(UNTIED, hidden_size=48, num_attention_heads=6, vocab_size=97, rope_theta=100000.0, rope_scaling=None,
            tie_word_embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def hf_model(cfg, seed=0):
    torch.manual_seed(seed)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """A tiny random checkpoint of each shape, written once by transformers."""
    dirs = {}
    for name, cfg in (("untied", UNTIED), ("tied", TIED)):
        d = tmp_path_factory.mktemp(name)
        hf_model(cfg).save_pretrained(d)
        dirs[name] = str(d)
    return dirs


def tokens(vocab, B=2, T=11, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, idx):
    with torch.no_grad():
        return model(idx).logits


def our_logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def randomize_lora(model, seed=0):
    """Non-zero B (and new A), so an adapter actually changes the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.weight.copy_(torch.randn(m.lora_A.weight.shape, generator=g) * 0.3)
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)


# ----------------------------------------------------------------------------------------------------------------
# PEFT <-> ours

@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_peft_adapter_loads_into_our_model(base_dirs, tmp_path, use_rslora, modules_to_save):
    ref = transformers.LlamaForCausalLM.from_pretrained(base_dirs["untied"]).eval()
    idx = tokens(101)
    base_logits = hf_logits(ref, idx)
    cfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=TARGETS, init_lora_weights=False, use_rslora=use_rslora,
                          modules_to_save=modules_to_save, lora_dropout=0.1, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(ref, cfg).eval()
    if modules_to_save:
        with torch.no_grad():
            pm.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.1)
    pm.save_pretrained(tmp_path)
    expected = hf_logits(pm, idx)

    ours = load_adapter(Llama.from_pretrained(base_dirs["untied"]), str(tmp_path))
    got = our_logits(ours, idx)
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    scale = 6 / (math.sqrt(4) if use_rslora else 4)
    assert ours.model.layers[0].self_attn.q_proj.scaling == scale
    assert ours.model.layers[1].mlp.down_proj.lora_A.weight.requires_grad  # ready to train on
    assert ours.lm_head.weight.requires_grad == bool(modules_to_save)


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("modules_to_save", [(), ("lm_head",)])
def test_our_adapter_loads_in_peft(base_dirs, tmp_path, use_rslora, modules_to_save):
    ours = apply_lora(Llama.from_pretrained(base_dirs["untied"]), r=4, alpha=6, dropout=0.1, targets=TARGETS,
                      use_rslora=use_rslora, modules_to_save=modules_to_save)
    randomize_lora(ours)
    if modules_to_save:
        with torch.no_grad():
            ours.lm_head.weight.add_(0.1)
    save_adapter(ours, str(tmp_path), base_model_name_or_path=base_dirs["untied"])
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 6 and cfg["use_rslora"] == use_rslora

    ref = transformers.LlamaForCausalLM.from_pretrained(base_dirs["untied"]).eval()
    pm = peft.PeftModel.from_pretrained(ref, str(tmp_path)).eval()
    idx = tokens(101)
    torch.testing.assert_close(hf_logits(pm, idx), our_logits(ours.eval(), idx), atol=1e-5, rtol=0)
    # and back into a fresh model of ours
    back = load_adapter(Llama.from_pretrained(base_dirs["untied"]), str(tmp_path))
    assert torch.equal(our_logits(back, idx), our_logits(ours, idx))


def test_peft_regex_targets_and_rank_alpha_patterns(base_dirs, tmp_path):
    ref = transformers.LlamaForCausalLM.from_pretrained(base_dirs["untied"]).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=r".*\.(q_proj|up_proj|down_proj)", init_lora_weights=False,
                          rank_pattern={"down_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})
    pm = peft.get_peft_model(ref, cfg).eval()
    pm.save_pretrained(tmp_path)
    ours = load_adapter(Llama.from_pretrained(base_dirs["untied"]), str(tmp_path))
    assert ours.model.layers[0].mlp.down_proj.r == 2 and ours.model.layers[0].self_attn.q_proj.r == 4
    assert ours.model.layers[1].self_attn.q_proj.scaling == 3 / 4
    assert not isinstance(ours.model.layers[0].self_attn.v_proj, LoRALinear)
    idx = tokens(101)
    torch.testing.assert_close(our_logits(ours, idx), hf_logits(pm, idx), atol=1e-5, rtol=0)


def test_tied_embeddings_are_trained_as_one_matrix_both_ways(base_dirs, tmp_path):
    # PEFT with ensure_weight_tying=True keeps lm_head and embed_tokens one matrix; so do we.
    ref = transformers.LlamaForCausalLM.from_pretrained(base_dirs["tied"]).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          modules_to_save=["embed_tokens"], ensure_weight_tying=True)
    pm = peft.get_peft_model(ref, cfg).eval()
    with torch.no_grad():
        pm.base_model.model.model.embed_tokens.modules_to_save["default"].weight.mul_(1.5)
    pm.save_pretrained(tmp_path / "peft")
    idx = tokens(97)
    ours = load_adapter(Llama.from_pretrained(base_dirs["tied"]), str(tmp_path / "peft"))
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    torch.testing.assert_close(our_logits(ours, idx), hf_logits(pm, idx), atol=1e-5, rtol=0)

    ours = apply_lora(Llama.from_pretrained(base_dirs["tied"]), r=4, alpha=8, targets=["q_proj"],
                      modules_to_save=("lm_head",))
    randomize_lora(ours)
    with torch.no_grad():
        ours.lm_head.weight.mul_(1.5)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight and ours.lm_head.weight.requires_grad
    save_adapter(ours, str(tmp_path / "ours"))
    pm = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(base_dirs["tied"]),
                                        str(tmp_path / "ours")).eval()
    torch.testing.assert_close(hf_logits(pm, idx), our_logits(ours.eval(), idx), atol=1e-5, rtol=0)


def test_untied_training_of_a_tied_head_is_refused(base_dirs, tmp_path):
    ref = transformers.LlamaForCausalLM.from_pretrained(base_dirs["tied"])
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    pm.save_pretrained(tmp_path)  # PEFT's default: lm_head trained apart from the embedding it was tied to
    with pytest.raises(ValueError, match="ensure_weight_tying"):
        load_adapter(Llama.from_pretrained(base_dirs["tied"]), str(tmp_path))


def test_trainable_report_counts_by_hand_and_matches_peft():
    cfg = dict(UNTIED, hidden_size=32, intermediate_size=64, vocab_size=50, num_attention_heads=4,
               num_key_value_heads=2)
    args = ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=64, max_seq_len=64)
    ours = apply_lora(Llama(args), r=4, alpha=8, targets=["q_proj", "v_proj"])
    # per layer: q 32x32, k 16x32, v 16x32, o 32x32, gate/up/down 3 x 64x32, two norms of 32
    per_layer = 32 * 32 + 2 * 16 * 32 + 32 * 32 + 3 * 64 * 32 + 2 * 32
    base = 2 * 50 * 32 + 2 * per_layer + 32                           # + embeddings, lm_head, final norm
    lora = 2 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))                 # q: A 4x32, B 32x4; v: A 4x32, B 16x4
    assert (base, lora) == (21792, 896)
    assert trainable_report(ours) == (f"trainable params: 896 || all params: 22,688 || "
                                      f"trainable%: {100 * 896 / 22688:.4f}")
    pm = peft.get_peft_model(transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)),
                             peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert pm.get_nb_trainable_parameters() == (896, 22688)


# ----------------------------------------------------------------------------------------------------------------
# The layer: keys, init, training, dropout, merging

def tiny(tie=False, seed=0):
    torch.manual_seed(seed)
    return Llama(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=64,
                           max_seq_len=64, tie_embeddings=tie)).eval()


def test_state_dict_keeps_original_keys_and_adds_lora_keys():
    model = tiny()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=4, targets="all-linear")
    sd = model.state_dict()
    assert set(sd) - set(base_sd) == {f"model.layers.{i}.{blk}.{p}_proj.lora_{ab}.weight" for i in range(2)
                                      for blk, ps in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                                      for p in ps for ab in "AB"}
    assert set(base_sd) <= set(sd) and "lm_head.lora_A.weight" not in sd  # all-linear leaves lm_head alone
    assert sd["model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert sd["model.layers.0.self_attn.k_proj.lora_B.weight"].shape == (16, 4)
    # a plain checkpoint loads into the LoRA model; only the LoRA keys are missing
    res = model.load_state_dict(base_sd, strict=False)
    assert not res.unexpected_keys and all(".lora_" in k for k in res.missing_keys) and len(res.missing_keys) == 28
    randomize_lora(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = apply_lora(tiny(seed=5), r=4, targets="all-linear")
    fresh.load_state_dict(sd)  # strict: every key has its place
    idx = tokens(50)
    assert torch.equal(our_logits(fresh, idx), our_logits(model, idx))


def test_init_equals_base_and_a_step_changes_only_lora():
    model = tiny()
    idx, targets = tokens(50, T=12), tokens(50, T=12, seed=2)
    base_logits = our_logits(model, idx)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=4, alpha=8, dropout=0.0, targets=["q_proj", "v_proj", "down_proj"])
    assert torch.equal(our_logits(model, idx), base_logits)  # B = 0: exactly the base model
    A = model.model.layers[0].self_attn.q_proj.lora_A.weight
    bound = 1 / math.sqrt(32)  # kaiming_uniform(a=sqrt(5)) on fan_in 32: U(-1/sqrt(32), 1/sqrt(32))
    assert A.abs().max() <= bound and A.abs().max() > 0.8 * bound
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    _, loss = model(idx, targets)
    loss.backward()
    opt.step()
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k  # base weights bit-identical
    changed = [k for k in after if k not in before and not torch.equal(after[k], torch.zeros_like(after[k]))]
    assert len(changed) == 12  # all 6 A and all 6 B moved (B away from zero)
    assert not torch.equal(our_logits(model.eval(), idx), base_logits)


def test_dropout_is_on_the_lora_path_only():
    model = apply_lora(tiny(), r=4, dropout=0.5, targets=["q_proj", "v_proj"])
    idx = tokens(50)
    base = our_logits(model, idx)
    model.train()
    assert torch.equal(our_logits(model, idx), base)  # B = 0: if the base path were dropped, this would differ
    randomize_lora(model)
    a, b = our_logits(model, idx), our_logits(model, idx)
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(our_logits(model, idx), our_logits(model, idx))


def test_merge_unmerge():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 48), r=4, alpha=8)
    randomize_lora(layer)
    x = torch.randn(3, 7, 32)
    w0 = layer.base.weight.detach().clone()
    with torch.no_grad():
        unmerged = layer(x)
        layer.merge()
        merged_w = layer.base.weight.detach().clone()
        torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=0)
        layer.merge()  # twice = once
        assert torch.equal(layer.base.weight, merged_w)
        assert torch.equal(layer.state_dict()["weight"], w0)  # a checkpoint holds the base weight, merged or not
        # Subtracting the same delta does not give W back bit for bit; unmerge must do better.
        assert not torch.equal(merged_w - layer.delta_weight(), w0)
        layer.unmerge()
    assert torch.equal(layer.base.weight, w0) and not layer.merged
    layer.unmerge()
    assert torch.equal(layer.base.weight, w0)

    layer.merge()
    layer.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        layer(x)
    layer.eval()
    layer(x)  # inference while merged is fine


def test_bf16_base_with_fp32_lora_path():
    torch.manual_seed(0)
    base = nn.Linear(32, 16).to(torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=4)
    randomize_lora(layer)
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.lora_A.weight.dtype == torch.float32
    lora = (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * layer.scaling   # (2, 5, 16)
    assert torch.equal(y, base(x) + lora.to(torch.bfloat16))
    y.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and base.weight.grad is None


def saved_bytes_for_backward(fn, not_counted):
    """Run fn and add up the storages autograd keeps for backward, each once, leaving out the given tensors'."""
    skip, seen = {t.untyped_storage().data_ptr() for t in not_counted}, {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_autocast_runs_the_lora_path_in_16_bits_without_an_fp32_copy():
    """Under autocast A and B compute in bf16 (as in PEFT); gradients stay within bf16 rounding of an fp64
    reference and no full-size copy of the input is kept. Without autocast an fp32 copy is kept: memory_estimate's
    lora_inputs counts it."""
    torch.manual_seed(0)
    base = nn.Linear(256, 128, bias=False).to(torch.bfloat16).requires_grad_(False)
    layer = LoRALinear(base, r=8, alpha=16)
    randomize_lora(layer)
    x = torch.randn(4, 64, 256, dtype=torch.bfloat16)                       # (B, T, in)
    g = torch.randn(4, 64, 128)                                              # d loss / d y
    A, B = (w.detach().double().requires_grad_() for w in (layer.lora_A.weight, layer.lora_B.weight))
    y_ref = x.double() @ base.weight.double().T + (x.double() @ A.T @ B.T) * layer.scaling
    (y_ref * g.double()).sum().backward()
    unit = 2.0 ** -8                                                         # bf16's unit roundoff
    for autocast in (True, False):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y, saved = saved_bytes_for_backward(lambda: layer(x), list(layer.parameters()) + [x])
        (y.float() * g).sum().backward()
        for w, ref in ((layer.lora_A.weight, A.grad), (layer.lora_B.weight, B.grad)):
            assert w.grad.dtype == torch.float32
            assert (w.grad.double() - ref).norm() / ref.norm() < 2 * unit   # measured 3.3e-3 autocast, 1.7e-3 not
        if autocast:
            assert saved < x.numel() * 2 / 8       # only the (B, T, r) activations and bf16 casts of A and B
        else:
            assert saved >= x.numel() * 4          # the fp32 copy of x that A needs


def test_merge_lora_gives_plain_linears_with_the_same_logits():
    model = apply_lora(tiny(tie=True), r=4, targets="all-linear", modules_to_save=("embed_tokens",))
    randomize_lora(model)
    idx = tokens(50)
    expected = our_logits(model, idx)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules()) and not hasattr(model, "lora_config")
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert model.lm_head.weight is model.model.embed_tokens.weight
    torch.testing.assert_close(our_logits(model, idx), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", ["untied", "tied"])
def test_export_to_a_folder_writes_what_transformers_loads(base_dirs, tmp_path, shape):
    base = base_dirs[shape]
    for f in ("tokenizer_config.json", "chat_template.jinja"):  # stand-ins: the command copies them along
        with open(os.path.join(base, f), "w") as fh:
            fh.write('{"model_max_length": 64}' if f.endswith(".json") else "{{ messages }}")
    save = ("lm_head",) if shape == "untied" else ("embed_tokens",)
    ours = apply_lora(Llama.from_pretrained(base), r=4, alpha=8, targets="all-linear", modules_to_save=save)
    randomize_lora(ours)
    with torch.no_grad():
        ours.lm_head.weight.mul_(1.25)
    save_adapter(ours, str(tmp_path / "adapter"), base_model_name_or_path=base)
    export.main([f"--adapter={tmp_path / 'adapter'}", f"--out={tmp_path / 'merged'}"])  # the adapter's base
    assert open(tmp_path / "merged" / "chat_template.jinja").read() == "{{ messages }}"
    merged = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    idx = tokens(merged.config.vocab_size)
    torch.testing.assert_close(hf_logits(merged, idx), our_logits(ours.eval(), idx), atol=1e-5, rtol=0)


def test_merge_of_a_bf16_base_in_bf16_gives_the_bytes_of_an_fp32_merge(base_dirs, tmp_path):
    """export.py --out=DIR loads a 16-bit base in 16 bits (half the memory of fp32): every merged weight is still
    summed in fp32 and rounded once, so the written bytes equal those of merging in fp32 and rounding at the end."""
    base = str(tmp_path / "bf16_base")
    hf_model(UNTIED).to(torch.bfloat16).save_pretrained(base)
    ours = apply_lora(Llama.from_pretrained(base), r=4, alpha=8, targets="all-linear", modules_to_save=("lm_head",))
    randomize_lora(ours)
    save_adapter(ours, str(tmp_path / "adapter"), base_model_name_or_path=base)
    export.main([f"--adapter={tmp_path / 'adapter'}", f"--out={tmp_path / 'merged'}"])  # type "": the base's bf16
    reference = merge_lora(ours).to(torch.bfloat16).state_dict()                         # merged in fp32
    written = Llama.from_pretrained(str(tmp_path / "merged"), dtype=torch.bfloat16).state_dict()
    assert written.keys() == reference.keys()
    for k in reference:
        assert torch.equal(written[k], reference[k]), k


# ----------------------------------------------------------------------------------------------------------------
# Clear errors

def test_bad_inputs_have_clear_errors(base_dirs, tmp_path):
    with pytest.raises(ValueError, match="no module matches"):
        apply_lora(tiny(), targets=["query"])
    with pytest.raises(ValueError, match="regular expression"):
        apply_lora(tiny(), targets="q_proj")  # a string is a regex for the FULL name, as in PEFT
    with pytest.raises(ValueError, match="linear layers only"):
        apply_lora(tiny(), targets=["embed_tokens"])
    with pytest.raises(ValueError, match="shares its weight"):
        apply_lora(tiny(tie=True), targets=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(tiny(), modules_to_save=("score",))
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(apply_lora(tiny()))
    with pytest.raises(ValueError, match="apply_lora"):
        save_adapter(tiny(), str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny(), str(tmp_path / "nothing"))

    model = apply_lora(Llama.from_pretrained(base_dirs["untied"]), r=4, targets=["q_proj"])
    save_adapter(model, str(tmp_path / "a"))
    os.remove(tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match="no adapter weights"):
        load_adapter(Llama.from_pretrained(base_dirs["untied"]), str(tmp_path / "a"))

    save_adapter(model, str(tmp_path / "b"))  # made for a 64-wide model, loaded into a 32-wide one
    with pytest.raises(ValueError, match=r"q_proj.lora_A.weight expected \(4, 32\), found \(4, 64\)"):
        load_adapter(tiny(), str(tmp_path / "b"))
    with pytest.raises(ValueError, match="scaling"):  # same shapes, other alpha
        load_adapter(apply_lora(Llama.from_pretrained(base_dirs["untied"]), r=4, alpha=3, targets=["q_proj"]),
                     str(tmp_path / "b"))
    with pytest.raises(ValueError, match="missing"):  # the model has LoRA where the adapter has none
        load_adapter(apply_lora(Llama.from_pretrained(base_dirs["untied"]), r=4, targets=["q_proj", "v_proj"]),
                     str(tmp_path / "b"))

    cfg = json.load(open(tmp_path / "b" / "adapter_config.json"))
    json.dump(dict(cfg, use_dora=True), open(tmp_path / "b" / "adapter_config.json", "w"))
    with pytest.raises(ValueError, match="use_dora"):
        load_adapter(Llama.from_pretrained(base_dirs["untied"]), str(tmp_path / "b"))


def test_mark_only_lora_as_trainable_refreezes():
    model = apply_lora(tiny(), r=2, modules_to_save=("lm_head",))
    for p in model.parameters():
        p.requires_grad_(True)
    mark_only_lora_as_trainable(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"lm_head.weight"} | {
        f"model.layers.{i}.self_attn.{p}_proj.lora_{ab}.weight" for i in range(2) for p in "qv" for ab in "AB"}
