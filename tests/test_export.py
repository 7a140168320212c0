"""export.py: GGUF files that read back to the same weights (our reader, convert.py), load in transformers' GGUF
loader with the same logits and the same tokens, keep each tensor in its right type, and refuse bad input in one line.
"""
import os
import shutil

import gguf
import pytest
import torch

import export
import lora
from convert import args_from_gguf, half_to_interleaved, interleaved_to_half, load_state_one_by_one, read_gguf
from model import Llama, ModelArgs, rope_frequencies
from test_bad_input import error_line, make_adapter
from tokenizer import Tokenizer

SMALL_VOCAB = 320  # rows of the tiny models' embedding: small_tok's 300 tokens, then unused rows


def tiny(tie=True, hidden_dim=128, rope_scaling=None, vocab_size=SMALL_VOCAB, std=0.5, seed=0):
    """Widths are multiples of 32 so q8_0 / q4_0 apply to every matrix (hidden_dim=80 makes one that cannot)."""
    torch.manual_seed(seed)
    m = Llama(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size, hidden_dim=hidden_dim,
                        max_seq_len=256, tie_embeddings=tie, rope_scaling=rope_scaling))
    with torch.no_grad():  # random norms, and weights of a real spread: a swapped or skipped tensor cannot hide
        for name, p in m.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, std)
    return m


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    """A byte-level BPE of 300 tokens trained here in a blink: GGUF files with SmolLM2's 49,152 tokens and merges
    take seconds to parse back, and the weights tests do not need them (the transformers test uses SmolLM2's)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(["The capital of Iran is Tehran.", "پایتخت ایران تهران است."] * 20, trainer)
    out = tmp_path_factory.mktemp("tok")
    tk.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text('{"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}')
    return str(out)


def folder_of(model, tok_dir, path):
    model.save_pretrained(str(path))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, f), path / f)
    return str(path)


def read_back(path):
    """Our GGUF reader (the one that converts the bundled SmolLM2): dequantized fp32, q/k rows un-permuted."""
    reader = gguf.GGUFReader(str(path))
    args = args_from_gguf(reader)
    return load_state_one_by_one(args, read_gguf(reader, args), torch.float32, "cpu", where=str(path))


@pytest.fixture(scope="module")
def untied(small_tok, tmp_path_factory):
    m = tiny(tie=False)
    return m, folder_of(m, small_tok, tmp_path_factory.mktemp("untied"))


@pytest.mark.parametrize("kind", ["f32", "f16", "bf16"])
def test_float_types_read_back_bit_exact(untied, kind, tmp_path):
    model, folder = untied
    export.write_gguf(model, folder, tmp_path / "m.gguf", kind, progress=False)
    back = read_back(tmp_path / "m.gguf").state_dict()
    rounding = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[kind]
    for key, w in model.state_dict().items():
        want = w if w.dim() == 1 else w.to(rounding).float()  # norms stay f32 in every type
        assert torch.equal(back[key], want), key


@pytest.mark.parametrize("kind,bound", [("q8_0", 0.008), ("q4_0", 0.12)])
def test_block_types_read_back_within_their_rounding(untied, kind, bound, tmp_path):
    """Each matrix reads back as gguf's own dequantization of the same blocks (q/k in llama.cpp's row order), and
    its relative error is what the format costs. Measured on these N(0, 0.5) matrices: q8_0 0.0051-0.0056, q4_0
    0.083-0.088 (a step is 1/8 of the block's largest value in q4_0, 1/127 in q8_0); a block written to the wrong
    place would be off by about the weights' own size (relative error ~1.4)."""
    model, folder = untied
    export.write_gguf(model, folder, tmp_path / "m.gguf", kind, progress=False)
    back = read_back(tmp_path / "m.gguf").state_dict()
    qtype = export.TYPES[kind][0]
    args = model.args
    for key, w in model.state_dict().items():
        if w.dim() == 1:
            assert torch.equal(back[key], w), key
            continue
        heads = args.n_heads if "q_proj" in key else args.n_kv_heads if "k_proj" in key else None
        stored = half_to_interleaved(w, heads) if heads else w
        blocks = gguf.quants.dequantize(gguf.quants.quantize(stored.numpy(), qtype), qtype)
        want = torch.from_numpy(blocks.copy())
        want = interleaved_to_half(want, heads) if heads else want
        assert torch.equal(back[key], want), key
        rel = ((back[key] - w).norm() / w.norm()).item()
        assert rel < bound, (key, rel)


def test_tensor_names_types_and_metadata(small_tok, tmp_path):
    # hidden_dim=80: ffn_down's rows are 80 long, not a multiple of q4_0's 32-value blocks -> it falls back to f16
    model = tiny(tie=True, hidden_dim=80)
    folder = folder_of(model, small_tok, tmp_path / "m")
    export.write_gguf(model, folder, tmp_path / "m.gguf", "q4_0", progress=False)
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    types = {t.name: t.tensor_type for t in r.tensors}
    G = gguf.GGMLQuantizationType
    assert "output.weight" not in types  # tied: llama.cpp uses token_embd for the head
    assert types["token_embd.weight"] == G.Q4_0 and types["blk.1.attn_k.weight"] == G.Q4_0
    assert types["blk.0.ffn_down.weight"] == G.F16 and types["blk.0.ffn_up.weight"] == G.Q4_0
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == G.F32
    value = lambda k: r.fields[k].contents()  # noqa: E731
    assert value("general.architecture") == "llama" and value("llama.block_count") == 2
    assert value("llama.attention.head_count_kv") == 2 and value("llama.rope.dimension_count") == 16
    assert value("general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt2"
    tok = Tokenizer(folder)
    assert value("tokenizer.ggml.eos_token_id") == tok.eos_id and value("tokenizer.chat_template") == tok.chat_template
    assert value("tokenizer.ggml.padding_token_id") == 0 and value("tokenizer.ggml.tokens")[-1] == "[PAD319]"
    assert value("tokenizer.ggml.token_type")[2] == export.CONTROL and value("tokenizer.ggml.token_type")[-1] == 5
    assert read_back(tmp_path / "m.gguf").args.hidden_dim == 80


def test_llama3_rope_scaling_is_written_as_llama_cpp_frequency_factors(small_tok, tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    model = tiny(rope_scaling=scaling)
    export.write_gguf(model, folder_of(model, small_tok, tmp_path / "m"), tmp_path / "m.gguf", "f32", progress=False)
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    factors = torch.from_numpy(next(t for t in r.tensors if t.name == "rope_freqs.weight").data.copy())
    # llama.cpp divides each frequency by its factor: that must give model.py's scaled frequencies
    plain = rope_frequencies(16, model.args.rope_theta)
    torch.testing.assert_close(plain / factors, rope_frequencies(16, model.args.rope_theta, scaling))
    assert factors[0] == 1 and factors[-1] == 8  # the fastest pair untouched, the slowest slowed by `factor`


def test_transformers_loads_our_export_with_same_logits_and_tokens(tiny_dir, tmp_path):
    """The merged adapter, the q/k order, the tied head and the tokenizer as an independent GGUF reader sees them.
    transformers reads the tiny model in well under a second; most of this test is importing transformers."""
    transformers = pytest.importorskip("transformers")
    # SmolLM2's vocabulary and tokenizer; weights of a trained model's spread (logits of a few units)
    base = folder_of(tiny(tie=True, vocab_size=49152, std=0.05), tiny_dir, tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter")
    ours = lora.load_adapter(Llama.from_pretrained(base), adapter)
    with torch.no_grad():  # make_adapter leaves B at zero (a no-op adapter): give it a real update
        for _, layer in lora.lora_layers(ours):
            layer.lora_B.weight.normal_(0, 0.05)
    lora.save_adapter(ours, adapter, base_model_name_or_path=base)
    export.main([f"--adapter={adapter}", f"--out={tmp_path / 'm.gguf'}", "--type=f32"])
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    idx = torch.randint(0, 49152, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ours(idx)[0], ref(idx).logits
    # fp32 both sides: rounding only (measured 1.4e-6 on logits up to 2.6; the adapter itself moves them by 1.4)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    tk = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    tok = Tokenizer(base)
    for text in ("پایتخت ایران کجاست؟ تهران، با ۹ میلیون نفر.", "Fine-tuning in 3 steps: 1, 2, 3.",
                 "emoji 🤗🚀 and ZWNJ: می‌خواهم", "<|im_start|>user\nسلام<|im_end|>\n"):
        assert tk.encode(text, add_special_tokens=False) == tok.encode(text), text


def test_bad_input(small_tok, tmp_path, capsys):
    base = folder_of(tiny(), small_tok, tmp_path / "base")
    assert error_line(export.main, [f"--init_from={base}", f"--out={tmp_path}/m.gguf", "--type=nf4"], capsys) == (
        "error: type must be one of f32, f16, bf16, q8_0, q4_0 for a GGUF file, got 'nf4'")
    assert error_line(export.main, [f"--init_from={base}", f"--out={tmp_path}/m", "--type=q8_0"], capsys) == (
        "error: type must be one of f32, f16, bf16 for a folder, got 'q8_0'")
    assert error_line(export.main, [f"--init_from={base}"], capsys) == (
        "error: pass --out=NAME.gguf (one GGUF file) or --out=DIR (a merged Hugging Face folder)")
    assert error_line(export.main, [f"--init_from={base}", f"--out={base}"], capsys) == (
        f"error: {base} exists and is not an empty folder; pass a new --out folder")
    (tmp_path / "there.gguf").write_bytes(b"keep me")
    assert error_line(export.main, [f"--init_from={base}", f"--out={tmp_path}/there.gguf"], capsys) == (
        f"error: {tmp_path}/there.gguf exists; pass a new --out file (nothing is overwritten)")
    assert (tmp_path / "there.gguf").read_bytes() == b"keep me"
    assert error_line(export.main, [f"--adapter={tmp_path}/none", f"--out={tmp_path}/a.gguf"], capsys).startswith(
        f"error: {tmp_path}/none/adapter_config.json not found")
    assert error_line(export.main, [f"--init_from={base}", f"--out={tmp_path}/a.gguf", "--quantize=nf4"],
                      capsys).startswith("error: unknown config key 'quantize'")
    # a 4-bit checkpoint: GGUF has no NF4, so the weights would have to be dequantized; only when asked
    Llama.from_pretrained(base, quantize="nf4").save_pretrained(str(tmp_path / "q4"))
    shutil.copy(os.path.join(base, "tokenizer.json"), tmp_path / "q4")
    assert error_line(export.main, [f"--init_from={tmp_path}/q4", f"--out={tmp_path}/q.gguf"], capsys).startswith(
        f"error: {tmp_path}/q4 is a 4-bit (NF4) checkpoint and GGUF has no NF4 type; pass --dequantize=True")
    assert sorted(os.listdir(tmp_path)) == ["base", "q4", "there.gguf"]  # nothing half-written
    export.main([f"--init_from={tmp_path}/q4", f"--out={tmp_path}/q.gguf", "--dequantize=True", "--type=f32"])
    assert read_back(tmp_path / "q.gguf").args.n_layers == 2


def test_sentencepiece_tokenizer_exports_as_llama_cpp_llama_model(tmp_path):
    """Llama 2's tokenizer.model: pieces, scores and types, read back by transformers' GGUF tokenizer."""
    transformers = pytest.importorskip("transformers")
    import sentencepiece
    text = ["The capital of Iran is Tehran.", "پایتخت ایران تهران است.", "Fine-tuning a model in 3 steps."] * 30
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(tmp_path / "tokenizer"),
                                             vocab_size=360, model_type="bpe", byte_fallback=True,
                                             character_coverage=1.0, minloglevel=2)
    model = tiny(vocab_size=384)
    model.save_pretrained(str(tmp_path))
    (tmp_path / "g").mkdir()  # a folder of its own: next to tokenizer.model, transformers would read that instead
    export.write_gguf(model, str(tmp_path), tmp_path / "g" / "m.gguf", "f16", progress=False)
    r = gguf.GGUFReader(str(tmp_path / "g" / "m.gguf"))
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    assert r.fields["tokenizer.ggml.token_type"].contents()[3] == export.BYTE  # <0x00>, after <unk> <s> </s>
    tk = transformers.AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="m.gguf")
    tok = Tokenizer(str(tmp_path))
    for s in ("The capital of Iran", "پایتخت ایران", "emoji 🤗 falls back to bytes"):
        assert tk.encode(s, add_special_tokens=False) == tok.encode(s), s
