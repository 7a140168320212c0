"""export.py: GGUF files that read back to the same weights (our reader, convert.py), load in transformers' GGUF
loader with the same logits and the same tokens, keep each tensor in its right type, and refuse bad input in one line.
The streamed export (stream.py: the base read one tensor at a time) writes the bytes of the whole-model path; the
Modelfile renders conversations as the model's chat template does; a Llama 3.1 GGUF reads back with its scaling.
"""
import json
import os
import re
import shutil

import gguf
import pytest
import torch

import checkpoint
import export
import lora
import modelfile
import sample
import stream
from convert import args_from_gguf, half_to_interleaved, interleaved_to_half, load_state_one_by_one, read_gguf
from model import Llama, ModelArgs, rope_frequencies
from test_bad_input import error_line, make_adapter
from tokenizer import TEMPLATES, Tokenizer

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
    copy_tokenizer(tok_dir, path)
    return str(path)


def copy_tokenizer(tok_dir, path):
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, f), os.path.join(path, f))


def write_gguf(folder, path, kind):
    """The GGUF writer on a checkpoint folder, streamed (what export.py does without an adapter)."""
    return export.write_gguf(stream.merged_weights(folder), folder, str(path), kind, progress=False)


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
    write_gguf(folder, tmp_path / "m.gguf", kind)
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
    write_gguf(folder, tmp_path / "m.gguf", kind)
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
    write_gguf(folder, tmp_path / "m.gguf", "q4_0")
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
    write_gguf(folder_of(model, small_tok, tmp_path / "m"), tmp_path / "m.gguf", "f32")
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
    assert error_line(export.main, [f"--init_from={tmp_path}/q4", f"--out={tmp_path}/q.gguf"], capsys) == (
        f"error: {tmp_path}/q4 is a 4-bit (NF4) checkpoint and GGUF has no NF4 type; pass --init_from=<the 16-bit "
        f"checkpoint it was made from> (the better weights), or --dequantize=True to write its dequantized weights")
    assert sorted(os.listdir(tmp_path)) == ["base", "q4", "there.gguf"]  # nothing half-written
    (tmp_path / "taken.Modelfile").write_text("FROM mine")
    assert error_line(export.main, [f"--init_from={base}", f"--out={tmp_path}/taken.gguf"], capsys) == (
        f"error: {tmp_path}/taken.Modelfile exists; pass a new --out file (nothing is overwritten)")
    os.remove(tmp_path / "taken.Modelfile")
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
    write_gguf(str(tmp_path), tmp_path / "g" / "m.gguf", "f16")
    r = gguf.GGUFReader(str(tmp_path / "g" / "m.gguf"))
    assert r.fields["tokenizer.ggml.model"].contents() == "llama"
    assert r.fields["tokenizer.ggml.token_type"].contents()[3] == export.BYTE  # <0x00>, after <unk> <s> </s>
    tk = transformers.AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file="m.gguf")
    tok = Tokenizer(str(tmp_path))
    for s in ("The capital of Iran", "پایتخت ایران", "emoji 🤗 falls back to bytes"):
        assert tk.encode(s, add_special_tokens=False) == tok.encode(s), s


# ----------------------------------------------------------------------------------------------------------------
# Streaming: the base read one tensor at a time gives the bytes of loading it whole and merging in memory.

def save_sharded(model, path):
    """A bf16 checkpoint in two shards with model.safetensors.index.json, as big Hub checkpoints come."""
    from safetensors.torch import save_file
    model.to(torch.bfloat16).save_pretrained(str(path))
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}  # untied: every tensor is stored
    os.remove(path / "model.safetensors")
    keys = sorted(sd)
    shards = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: sd[k] for k in part}, str(path / name), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


@pytest.fixture(scope="module", params=["tied", "untied"])
def base_and_adapter(request, small_tok, tmp_path_factory):
    """A bf16 base (sharded when untied) and an all-linear adapter with a real update and a module saved whole
    (the tied embedding, or the untied head)."""
    tie = request.param == "tied"
    out = tmp_path_factory.mktemp(request.param)
    if tie:
        tiny(tie=True, std=0.05).to(torch.bfloat16).save_pretrained(str(out / "base"))
    else:
        save_sharded(tiny(tie=False, std=0.05), out / "base")
    copy_tokenizer(small_tok, out / "base")
    model = lora.apply_lora(Llama.from_pretrained(str(out / "base")), r=4, alpha=8, targets="all-linear",
                            modules_to_save=("embed_tokens",) if tie else ("lm_head",))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    lora.save_adapter(model, str(out / "adapter"), base_model_name_or_path=str(out / "base"))
    return str(out / "base"), str(out / "adapter")


def whole_model(base, adapter, dtype):
    """What export.py did before it streamed (and still does for Meta's layout and 4-bit checkpoints): load the
    base and the adapter, merge in memory."""
    model, _ = checkpoint.load_model(base, adapter, dtype=dtype)
    return lora.merge_lora(model)


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0"])
def test_streamed_gguf_is_the_whole_model_gguf(base_and_adapter, kind, tmp_path, capsys):
    base, adapter = base_and_adapter
    export.main([f"--adapter={adapter}", f"--out={tmp_path}/streamed.gguf", f"--type={kind}"])
    assert f"weights: {base} (bf16), read one tensor at a time" in capsys.readouterr().out
    reference = stream.model_weights(whole_model(base, adapter, torch.float32))
    export.write_gguf(reference, base, str(tmp_path / "whole.gguf"), kind, progress=False)
    assert (tmp_path / "streamed.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()


@pytest.mark.parametrize("kind", ["", "f32", "f16"])  # "": the base's own bf16
def test_streamed_folder_is_save_pretrained_of_the_merged_model(base_and_adapter, kind, tmp_path):
    """Our safetensors writer against safetensors' own save_file (through save_pretrained), byte for byte."""
    base, adapter = base_and_adapter
    export.main([f"--adapter={adapter}", f"--out={tmp_path}/streamed", f"--type={kind}"])
    dtype = export.FOLDER_TYPES[kind or "bf16"]
    whole_model(base, adapter, dtype).save_pretrained(str(tmp_path / "whole"))
    for f in ("model.safetensors", "config.json"):
        assert (tmp_path / "streamed" / f).read_bytes() == (tmp_path / "whole" / f).read_bytes(), f


def test_adapter_trained_in_4_bits_merges_into_the_16_bit_base(base_and_adapter, tmp_path, capsys):
    """train.py's config.json beside the adapter says quantize="nf4": the 16-bit base it names is still what is
    merged, and the command says so. A 4-bit checkpoint as the adapter's base: --init_from points at the original."""
    base, adapter = base_and_adapter
    qlora = shutil.copytree(adapter, tmp_path / "qlora")
    (qlora / "config.json").write_text(json.dumps({"quantize": "nf4", "init_from": base}))
    export.main([f"--adapter={qlora}", f"--out={tmp_path}/a.gguf"])
    said = capsys.readouterr().out
    assert (f"weights: {base} (bf16), read one tensor at a time; {qlora} was trained on their 4-bit NF4 rounding "
            f"(its config.json: quantize='nf4'), and is merged here into these bf16 originals") in said
    export.main([f"--adapter={adapter}", f"--out={tmp_path}/b.gguf"])
    assert (tmp_path / "a.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()
    Llama.from_pretrained(base, quantize="nf4").save_pretrained(str(tmp_path / "q4"))  # a *-bnb-4bit checkpoint
    copy_tokenizer(base, tmp_path / "q4")
    cfg = json.loads((qlora / "adapter_config.json").read_text())
    (qlora / "adapter_config.json").write_text(json.dumps(dict(cfg, base_model_name_or_path=str(tmp_path / "q4"))))
    assert "--init_from=<the 16-bit checkpoint it was made from>" in error_line(
        export.main, [f"--adapter={qlora}", f"--out={tmp_path}/c.gguf"], capsys)
    export.main([f"--adapter={qlora}", f"--init_from={base}", f"--out={tmp_path}/c.gguf"])
    assert (tmp_path / "c.gguf").read_bytes() == (tmp_path / "b.gguf").read_bytes()


def test_llama3_gguf_reads_back_with_its_scaling_and_logits(small_tok, tmp_path):
    """Llama 3.1's scaling goes out as rope_freqs.weight (no metadata key holds it) and comes back as the same
    rope_scaling, so the model read back computes the same logits, bit for bit in f32."""
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
    model = tiny(tie=False, rope_scaling=scaling)
    export.main([f"--init_from={folder_of(model, small_tok, tmp_path / 'm')}", f"--out={tmp_path}/m.gguf",
                 "--type=f32"])
    back = read_back(tmp_path / "m.gguf")
    assert back.args.rope_scaling == scaling
    idx = torch.randint(0, SMALL_VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))  # past old_len 32
    with torch.no_grad():
        assert torch.equal(back(idx)[0], model(idx)[0])


# ----------------------------------------------------------------------------------------------------------------
# The Modelfile, read back as Ollama reads it, and its template run by a small Go-template renderer.

def parse_modelfile(text):
    """{"FROM": ..., "TEMPLATE": ..., "SYSTEM": ..., "PARAMETER": [(name, value)]}: one instruction per line, a
    value in triple quotes may span lines."""
    out = {"PARAMETER": []}
    for m in re.finditer(r'^([A-Z]+) (?:"""(.*?)"""|([^\n]*))$', text, re.M | re.S):
        word, value = m[1], m[2] if m[2] is not None else m[3]
        if word == "PARAMETER":
            name, _, v = value.partition(" ")
            out["PARAMETER"].append((name, json.loads(v) if v.startswith('"') else float(v)))
        else:
            out[word] = value
    return out


def render_go(template, system, messages):
    """Go's text/template, the part the Modelfile uses: text, {{ .Field }}, {{ $var }}, {{ $var := x }},
    {{ $var = x }}, {{ if x }} / {{ else if x }} / {{ else }} / {{ end }}, {{ range .Messages }}, {{ eq a b }},
    "strings". Ollama's data: .System (the system messages) and .Messages (every turn, system ones included)."""
    parts = re.split(r"({{.*?}})", template, flags=re.S)

    def parse(i):  # -> (nodes, next index, the action that ended the block)
        nodes = []
        while i < len(parts):
            part, i = parts[i], i + 1
            action = part[2:-2].strip() if part.startswith("{{") else None
            if action is None:
                nodes.append(("text", part))
            elif action in ("end", "else") or action.startswith("else if "):
                return nodes, i, action
            elif action.startswith("if "):
                branches, cond = [], action[3:]
                while True:
                    body, i, ended = parse(i)
                    branches.append((cond, body))
                    if ended == "end":
                        break
                    cond = ended[len("else if "):] if ended.startswith("else if ") else '"else"'
                nodes.append(("if", branches))
            elif action.startswith("range "):
                body, i, _ = parse(i)
                nodes.append(("range", action[len("range "):], body))
            else:
                nodes.append(("action", action))
        return nodes, i, None

    def value(expr, dot, var):
        words = re.findall(r'"[^"]*"|\S+', expr)
        if words[0] == "eq":
            return value(words[1], dot, var) == value(words[2], dot, var)
        if expr.startswith('"'):
            return json.loads(expr)
        return var[expr] if expr.startswith("$") else dot[expr[1:]]

    def run(nodes, dot, var, out):
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "if":
                body = next((b for cond, b in node[1] if value(cond, dot, var)), [])
                run(body, dot, var, out)
            elif node[0] == "range":
                for item in value(node[1], dot, var):
                    run(node[2], item, var, out)
            elif m := re.fullmatch(r"(\$\w+) :?= (.+)", node[1]):
                var[m[1]] = value(m[2], dot, var)
            else:
                out.append(value(node[1], dot, var))
        return out

    nodes, _, _ = parse(0)
    data = {"System": system, "Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]}
    return "".join(run(nodes, data, {}, []))


@pytest.fixture(params=["smollm2", "chatml", "llama3", "llama2"])
def chat_folder(request, bundled_dir, small_tok, tmp_path):
    """SmolLM2's own tokenizer and template (a default system message), and tokenizer.py's three templates."""
    if request.param == "smollm2":
        return bundled_dir
    copy_tokenizer(small_tok, tmp_path)
    bos, eos = {"chatml": ("<|im_start|>", "<|im_end|>"), "llama3": ("<|begin_of_text|>", "<|eot_id|>"),
                "llama2": ("<s>", "</s>")}[request.param]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "add_bos_token": request.param != "chatml",
         "chat_template": TEMPLATES[request.param]}))
    return str(tmp_path)


def test_modelfile_renders_a_conversation_as_the_chat_template_does(chat_folder, bundled_dir, tmp_path):
    path, family = modelfile.write_modelfile(str(tmp_path / "m.gguf"), chat_folder)
    parsed = parse_modelfile(open(path, encoding="utf-8").read())
    assert parsed["FROM"] == "./m.gguf" and family is not None
    tok = Tokenizer(chat_folder)
    assert {v for k, v in parsed["PARAMETER"] if k == "stop"} == {tok.decode([i]) for i in tok.stop_ids}
    assert ("temperature", 0.8) in parsed["PARAMETER"] and sample.settings["temperature"] == modelfile.TEMPERATURE
    turns = [{"role": "user", "content": "پایتخت ایران کجاست؟"}, {"role": "assistant", "content": "تهران."},
             {"role": "user", "content": "And of France?"}]
    bos = tok.bos_token if tok.add_bos else ""  # llama.cpp adds BOS itself, before the template's text
    for system in ("Answer in one word.", None):
        messages = ([{"role": "system", "content": system}] if system else []) + turns
        ollama_system = system or parsed.get("SYSTEM", "")  # the Modelfile's SYSTEM when the chat has none
        assert bos + render_go(parsed["TEMPLATE"], ollama_system, messages) == tok.render_chat(messages), system
    if chat_folder == bundled_dir:
        assert parsed["SYSTEM"] == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
