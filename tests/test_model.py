"""Our LLaMA against transformers' LlamaForCausalLM: same weights -> same logits, in every file layout."""
import json
import os

import pytest
import torch

from convert import half_to_interleaved
from model import Llama, ModelArgs, left_pad

transformers = pytest.importorskip("transformers")

# Three shapes of the family: Llama 2 (MHA, untied), Llama 3.1 (GQA, llama3 rope scaling), SmolLM2 (GQA, tied).
CONFIGS = {
    "llama2": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4, vocab_size=101, rms_norm_eps=1e-5, rope_theta=10000.0,
                   max_position_embeddings=128, tie_word_embeddings=False),
    "llama3": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=2, vocab_size=131, rms_norm_eps=1e-5, rope_theta=500000.0,
                   max_position_embeddings=256, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "smollm2": dict(hidden_size=48, intermediate_size=128, num_hidden_layers=3, num_attention_heads=6,
                    num_key_value_heads=2, vocab_size=97, rms_norm_eps=1e-5, rope_theta=100000.0,
                    max_position_embeddings=128, tie_word_embeddings=True),
}


def hf_model(name, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**CONFIGS[name])
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # random norms too, so a wrong norm weight cannot hide behind all-ones
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


def tokens(vocab, B=2, T=37, seed=1):
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("sharded", [False, True])
def test_logits_match_transformers(name, sharded, tmp_path):
    ref = hf_model(name)
    ref.save_pretrained(tmp_path, max_shard_size="20KB" if sharded else "10GB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json") == sharded
    ours = Llama.from_pretrained(str(tmp_path))
    idx = tokens(ref.config.vocab_size)
    with torch.no_grad():
        expected = ref(idx).logits
        got, _ = ours(idx)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def write_meta_layout(ref, cfg, out):
    """The same weights as Meta ships them: params.json + consolidated.00.pth, q/k rows interleaved."""
    c = ref.config
    names = {"model.embed_tokens.weight": "tok_embeddings.weight", "model.norm.weight": "norm.weight",
             "lm_head.weight": "output.weight"}
    per_layer = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                 "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
                 "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
                 "mlp.down_proj": "feed_forward.w2", "input_layernorm": "attention_norm",
                 "post_attention_layernorm": "ffn_norm"}
    sd = {}
    for k, v in ref.state_dict().items():
        if k in names:
            sd[names[k]] = v.clone()
            continue
        i, rest = k.split(".", 3)[2], k.split(".", 3)[3].rsplit(".", 1)[0]
        if "q_proj" in rest:
            v = half_to_interleaved(v, c.num_attention_heads)
        if "k_proj" in rest:
            v = half_to_interleaved(v, c.num_key_value_heads)
        sd[f"layers.{i}.{per_layer[rest]}.weight"] = v.clone()
    sd["rope.freqs"] = torch.zeros(4)  # Llama 2 files carry this; it must be ignored
    os.makedirs(out, exist_ok=True)
    torch.save(sd, os.path.join(out, "consolidated.00.pth"))
    params = {"dim": c.hidden_size, "n_layers": c.num_hidden_layers, "n_heads": c.num_attention_heads,
              "n_kv_heads": c.num_key_value_heads, "vocab_size": -1, "multiple_of": 32, "norm_eps": c.rms_norm_eps,
              "rope_theta": cfg["rope_theta"]}
    if cfg.get("rope_scaling"):
        params["use_scaled_rope"] = True
    with open(os.path.join(out, "params.json"), "w") as f:
        json.dump(params, f)


@pytest.mark.parametrize("name", ["llama2", "llama3"])
def test_meta_layout_gives_same_logits(name, tmp_path):
    cfg = dict(CONFIGS[name])
    if name == "llama3":  # Meta's use_scaled_rope means exactly these numbers
        cfg["rope_scaling"] = dict(cfg["rope_scaling"], original_max_position_embeddings=8192)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    write_meta_layout(ref, cfg, tmp_path)
    ours = Llama.from_pretrained(str(tmp_path))
    assert ours.args.hidden_dim == ref.config.intermediate_size  # derived from multiple_of
    idx = tokens(ref.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], ref(idx).logits, atol=1e-4, rtol=0)


def test_llama3_scaling_changes_long_wavelengths_only():
    from model import rope_frequencies
    plain = rope_frequencies(64, 500000.0)
    scaling = dict(CONFIGS["llama3"]["rope_scaling"], original_max_position_embeddings=8192)  # Llama 3.1's
    scaled = rope_frequencies(64, 500000.0, scaling)
    assert torch.equal(scaled[:4], plain[:4])            # fast-turning dims: as trained
    torch.testing.assert_close(scaled[-1], plain[-1] / 8)  # slowest dims: stretched by the factor


@pytest.mark.parametrize("name", list(CONFIGS))
def test_kv_cache_decoding_equals_full_forward(name):
    torch.manual_seed(0)
    c = CONFIGS[name]
    args = ModelArgs(dim=c["hidden_size"], n_layers=c["num_hidden_layers"], n_heads=c["num_attention_heads"],
                     n_kv_heads=c["num_key_value_heads"], vocab_size=c["vocab_size"], hidden_dim=c["intermediate_size"],
                     rope_scaling=c.get("rope_scaling"), max_seq_len=64, tie_embeddings=c["tie_word_embeddings"])
    model = Llama(args).eval()
    idx = tokens(args.vocab_size, B=2, T=20)
    with torch.no_grad():
        full, _ = model(idx)
        model.setup_cache(2, 20)
        steps = [model(idx[:, :7], start_pos=0)[0]]           # a prefix of several tokens
        steps.append(model(idx[:, 7:10], start_pos=7)[0])     # several new tokens after the cache
        steps += [model(idx[:, t:t + 1], start_pos=t)[0] for t in range(10, 20)]  # then one at a time
        model.clear_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def assert_greedy(model, prompt, new_ids, tol):
    """Each token of `new_ids` is what greedy decoding of `model` picks after `prompt` + the tokens before it, or
    within `tol` of it: where two tokens nearly tie, which one wins depends on summation order (CPU kernels, thread
    count, batch shape), and either is a correct greedy answer. Returns how many picks were exact."""
    seq = torch.tensor([list(prompt) + list(new_ids)])
    with torch.no_grad():
        logits = model(seq)[0][0, len(prompt) - 1:-1].float()  # (len(new_ids), vocab): the logits each pick saw
    chosen = logits.gather(-1, torch.tensor(list(new_ids))[:, None])[:, 0]
    gap = logits.max(-1).values - chosen                         # 0 where the pick is the argmax
    assert (gap <= tol).all(), f"token {int(gap.argmax())} is {gap.max():.2e} below the best logit"
    return int((gap == 0).sum())


def test_generate_greedy_matches_argmax_loop():
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=64,
                            max_seq_len=64)).eval()
    idx = tokens(50, B=1, T=5)
    got = torch.cat(list(model.generate(idx, 12, temperature=0)), dim=1)
    # the slow way: a full forward over prompt + picks; the cached steps multiply other shapes, so a near tie
    # (two logits within rounding) may go either way: every pick must be the argmax within 1e-5
    assert assert_greedy(model, idx[0].tolist(), got[0].tolist(), tol=1e-5) >= 11


def test_left_padded_batch_decodes_like_each_prompt_alone():
    """Prompts of different lengths in one batch (left padding hidden from attention) give each row's own logits."""
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=64,
                            max_seq_len=64)).eval()
    prompts = [tokens(50, B=1, T=n)[0].tolist() for n in (3, 9, 6)]
    idx, n_pad = left_pad(prompts, pad_id=0)
    assert idx.shape == (3, 9) and n_pad.tolist() == [6, 0, 3] and idx[0, 6:].tolist() == prompts[0]
    new = tokens(50, B=3, T=4)                                # the same continuation tokens fed to every row
    with torch.no_grad():
        model.setup_cache(3, 13, n_pad=n_pad)
        batched = [model(idx, start_pos=0)[0][:, -1]] + [model(new[:, t:t + 1], start_pos=9 + t)[0][:, -1]
                                                         for t in range(4)]
        model.clear_cache()
        for b, p in enumerate(prompts):                       # each prompt alone, no padding
            alone = model(torch.cat([torch.tensor([p]), new[b:b + 1]], dim=1))[0][0, len(p) - 1:]  # (5, vocab)
            torch.testing.assert_close(torch.stack([s[b] for s in batched]), alone, atol=1e-5, rtol=0)
        got = torch.cat(list(model.generate(idx, 8, temperature=0, n_pad=n_pad)), dim=1)       # (3, 8)
    for b, p in enumerate(prompts):  # each row's tokens are that prompt's own greedy picks (up to rounding ties)
        assert assert_greedy(model, p, got[b].tolist(), tol=1e-5) >= 7


def test_loss_only_on_target_positions_equals_full_cross_entropy():
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, hidden_dim=64,
                            max_seq_len=64))
    idx = tokens(50, B=2, T=16)
    targets = tokens(50, B=2, T=16, seed=3)
    targets[:, :10] = -100  # the "prompt" carries no loss
    logits_sel, loss = model(idx, targets)
    full, _ = model(idx)
    ref = torch.nn.functional.cross_entropy(full.view(-1, 50), targets.view(-1), ignore_index=-100)
    assert logits_sel.shape == (12, 50)
    torch.testing.assert_close(loss, ref)
    g_sel = torch.autograd.grad(loss, model.model.layers[0].mlp.up_proj.weight)[0]
    g_ref = torch.autograd.grad(ref, model.model.layers[0].mlp.up_proj.weight)[0]
    torch.testing.assert_close(g_sel, g_ref)


def test_save_pretrained_roundtrip_loads_in_transformers(tmp_path):
    ref = hf_model("smollm2")
    ref.save_pretrained(tmp_path / "a")
    ours = Llama.from_pretrained(str(tmp_path / "a"))
    ours.save_pretrained(str(tmp_path / "b"))
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "b").eval()
    idx = tokens(97)
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, ref(idx).logits, atol=1e-5, rtol=0)
