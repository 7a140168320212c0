"""
Taking a fine-tune home: merge the adapter into its base and write either a Hugging Face folder (any LLaMA tool
loads it as a normal model) or one file that llama.cpp, Ollama and LM Studio run: GGUF, with an Ollama Modelfile.

    python export.py --adapter=out/quickstart --out=checkpoints/smollm2-persian      # a merged HF folder
    python export.py --adapter=out/quickstart --out=smollm2-persian.gguf            # GGUF, f16, + .Modelfile
    python export.py --adapter=out/quickstart --out=smollm2-persian-q8.gguf --type=q8_0
    python export.py --init_from=checkpoints/SmolLM2-135M-Instruct --out=smollm2.gguf --type=q4_0

A GGUF file is a header of key/value metadata (the architecture's sizes, the tokenizer, the chat template), a
table of tensors (name, shape, type, offset), then the tensor bytes. Everything llama.cpp needs is in that one
file; nothing is read from config.json or tokenizer.json at run time.

The model is never loaded: stream.py reads the base one tensor at a time and merges the adapter into it, so a 7B
export fits a laptop (Meta's layout and 4-bit checkpoints are the exception: they are loaded whole and merged in
memory); it also writes the folder: the merged tensors into one safetensors file, config.json and the tokenizer
files. This file writes the GGUF, top to bottom: rename each tensor to llama.cpp's name and put q/k rows back in
llama.cpp's interleaved RoPE order (the inverse of what convert.py does when it reads a GGUF), choose each tensor's
type, write the metadata and the tokenizer, then the tensors; then the Modelfile (modelfile.py) that tells Ollama
the chat template.
"""

import json
import math
import os
import sys

import numpy as np
import torch

# -- settings (defaults; override with --key=value or a config file, see configurator.py) -------------------------
init_from = ""               # checkpoint folder; "" -> the adapter's base model, else the bundled SmolLM2
adapter = ""                 # a LoRA adapter folder to merge in (PEFT format, e.g. a train.py out_dir)
out = ""                     # NAME.gguf: one GGUF file; anything else: a merged Hugging Face folder (must be new)
type = ""                    # the written weights' type. GGUF: f32 | f16 | bf16 | q8_0 | q4_0 for the 2-D matrices,
                             # "" -> f16. Folder: f32 | f16 | bf16, "" -> the base's own (its config.json dtype)
dequantize = False           # a 4-bit (NF4) checkpoint: write its dequantized weights (GGUF has no NF4 type)
# -------------------------------------------------------------------------------------------------------------------
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}

import gguf  # noqa: E402

import stream  # noqa: E402
from configurator import configure  # noqa: E402
from convert import GGUF_KEYS, atomic_write, half_to_interleaved, permute_qk  # noqa: E402
from checkpoint import find_base  # noqa: E402
from model import rope_frequencies  # noqa: E402
from modelfile import write_modelfile  # noqa: E402
from tokenizer import Tokenizer  # noqa: E402

G = gguf.GGMLQuantizationType
TYPES = {  # --type of a GGUF file -> (the matrices' GGML type, the file_type llama.cpp reports)
    "f32": (G.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (G.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (G.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (G.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (G.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
FOLDER_TYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}  # --type of a folder -> dtype
HF_TO_GGUF = {ours: theirs for theirs, ours in GGUF_KEYS.items()}  # our (HF) name -> llama.cpp's, {i}-patterns


# ----------------------------------------------------------------------------------------------------------------
# Tensors: llama.cpp's names, llama.cpp's q/k order, and a type per tensor.

def gguf_name(key):
    """model.layers.3.self_attn.q_proj.weight -> blk.3.attn_q.weight (the table is convert.py's, read backwards)."""
    parts = key.split(".")
    if len(parts) > 3 and parts[1] == "layers":
        pattern = ".".join(parts[:2] + ["{i}"] + parts[3:])
        return HF_TO_GGUF[pattern].format(i=parts[2])
    return HF_TO_GGUF[key]


def gguf_tensors(args, shapes):
    """(llama.cpp name, shape, our name) of every tensor the file holds, in the model's order; our name is None for
    rope_freqs. A tied output head is not in `shapes`: llama.cpp uses token_embd for the output when output.weight
    is absent, as our model does."""
    plan = [(gguf_name(key), shape, key) for key, shape in shapes.items()]
    if args.rope_scaling and args.rope_scaling.get("rope_type", args.rope_scaling.get("type")) == "llama3":
        plan.append(("rope_freqs.weight", (args.head_dim // 2,), None))
    return plan


def llama_cpp_tensor(weights, key):
    """One tensor in fp32, as llama.cpp reads it."""
    args = weights.args
    if key is None:
        # llama.cpp reads Llama 3.1's frequency scaling as one divisor per frequency (rope_freqs.weight),
        # the same numbers model.py's rope_frequencies applies: plain frequency / scaled frequency.
        plain = rope_frequencies(args.head_dim, args.rope_theta)                          # (head_dim/2,)
        return plain / rope_frequencies(args.head_dim, args.rope_theta, args.rope_scaling)
    # llama.cpp's RoPE rotates interleaved pairs (x0, x1), (x2, x3), ... as Meta's code did; Hugging Face
    # checkpoints (and we) rotate halves. Permuting q/k rows back makes llama.cpp compute the same thing.
    return permute_qk(key, weights.get(key).float(), args, half_to_interleaved)


def tensor_type(shape, wanted):
    """1-D tensors (the RMSNorm gains, rope_freqs) stay f32, as llama.cpp keeps them: they are tiny and its norm
    kernels read f32. q8_0 and q4_0 cut each row into blocks of 32 values, so a matrix whose rows are not a multiple
    of 32 long cannot use them: it falls back to f16 (llama.cpp's converter does the same)."""
    if len(shape) == 1:
        return G.F32
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[1] % block == 0 else G.F16


def encode_tensor(w, qtype):
    """fp32 torch tensor -> the numpy array GGUF stores (uint8 blocks for the quantized types)."""
    values = w.contiguous().numpy()                                    # (out, in) float32
    if qtype == G.F32:
        return values
    if qtype == G.F16:
        return values.astype(np.float16)                               # round to nearest, as torch's .half()
    return gguf.quants.quantize(values, qtype)                         # (out, in_bytes) uint8: bf16, q8_0, q4_0


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer, as llama.cpp wants it: every token by id, its type, and the rules to split text.

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's token types


def bpe_pre_tokenizer(pre):
    """Name the splitting rule of a byte-level BPE tokenizer.json the way llama.cpp does (tokenizer.ggml.pre):
    llama.cpp has each rule built in and only needs its name."""
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"                        # every digit on its own, then GPT-2's splitting (SmolLM2)
    pattern = steps[0].get("pattern", {}).get("Regex", "") if kinds and kinds[0] == "Split" else ""
    if kinds == ["Split", "ByteLevel"] and r"\p{N}{1,3}" in pattern:
        return "llama-bpe"                     # Llama 3's regex: numbers in groups of up to three digits
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt2"
    raise ValueError(f"tokenizer.json: unknown pre-tokenizer {kinds}; llama.cpp needs its name "
                     f"(this exporter knows SmolLM2's, Llama 3's and GPT-2's)")


def bpe_vocab(folder):
    with open(os.path.join(folder, "tokenizer.json"), encoding="utf-8") as f:
        tj = json.load(f)
    if tj["model"].get("type") != "BPE":
        raise ValueError(f"{folder}/tokenizer.json: a {tj['model'].get('type')} model; only byte-level BPE exports")
    tokens = {i: t for t, i in tj["model"]["vocab"].items()}
    types = {i: NORMAL for i in tokens}
    for added in tj.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = CONTROL if added.get("special") else USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]  # "a b", rank order
    return tokens, types, None, merges, bpe_pre_tokenizer(tj.get("pre_tokenizer"))


def sentencepiece_vocab(sp):
    tokens, types, scores = {}, {}, {}
    for i in range(sp.get_piece_size()):
        tokens[i], scores[i] = sp.id_to_piece(i), sp.get_score(i)
        types[i] = (CONTROL if sp.is_control(i) else UNKNOWN if sp.is_unknown(i) else BYTE if sp.is_byte(i)
                    else UNUSED if sp.is_unused(i) else NORMAL)
    return tokens, types, scores, None, None


def add_tokenizer(w, folder, vocab_size):
    tok = Tokenizer(folder)
    if tok.kind == "bpe":
        tokens, types, scores, merges, pre = bpe_vocab(folder)
        w.add_tokenizer_model("gpt2")          # llama.cpp's name for byte-level BPE
        w.add_tokenizer_pre(pre)
    else:
        tokens, types, scores, merges, pre = sentencepiece_vocab(tok.sp)
        w.add_tokenizer_model("llama")         # llama.cpp's name for SentencePiece
    if max(tokens) >= vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {max(tokens) + 1} tokens, the model only {vocab_size} rows")
    # llama.cpp wants one entry per embedding row: rows the tokenizer never produces get placeholder names.
    names = [tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    w.add_token_list(names)
    w.add_token_types([types.get(i, UNUSED) for i in range(vocab_size)])
    if scores is not None:
        w.add_token_scores([scores.get(i, 0.0) for i in range(vocab_size)])
    if merges is not None:
        w.add_token_merges(merges)
    for tid, add in ((tok.bos_id, w.add_bos_token_id), (tok.eos_id, w.add_eos_token_id),
                     (names.index(tok.pad_token) if tok.pad_token in names else None, w.add_pad_token_id)):
        if tid is not None:
            add(tid)
    w.add_add_bos_token(bool(tok.add_bos))
    w.add_chat_template(tok.chat_template)     # the template sample.py uses: llama.cpp renders chats with it


# ----------------------------------------------------------------------------------------------------------------
# The file: the metadata (the architecture, then the tokenizer), the table of tensors, then their bytes.

def add_metadata(w, args, folder, ftype):
    # model.py caps max_seq_len at 8192; config.json states what the model was trained for
    ctx = stream.read_config(folder).get("max_position_embeddings", args.max_seq_len)
    w.add_name(os.path.basename(os.path.normpath(folder)))
    w.add_context_length(ctx)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    if args.head_dim != args.dim // args.n_heads:  # llama.cpp assumes dim / n_heads unless told
        w.add_key_length(args.head_dim)
        w.add_value_length(args.head_dim)
    w.add_rope_freq_base(args.rope_theta)
    w.add_rope_dimension_count(args.head_dim)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_vocab_size(args.vocab_size)
    w.add_file_type(ftype)
    if ftype not in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16, gguf.LlamaFileType.MOSTLY_BF16):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def write_gguf(weights, folder, path, type_name="f16", progress=True):
    """Write `weights` (stream.Weights: merged, dense) and the tokenizer of checkpoint `folder` as a GGUF file."""
    from tqdm import tqdm
    qtype, ftype = TYPES[type_name]
    w = gguf.GGUFWriter(None, "llama")
    add_metadata(w, weights.args, folder, ftype)
    add_tokenizer(w, folder, weights.args.vocab_size)
    # The table of tensors comes before their bytes, so every shape and type is declared first (the shapes are
    # known without reading a tensor); the bytes are then read, merged and converted one tensor at a time.
    plan = gguf_tensors(weights.args, weights.shapes)
    plan = [(name, shape, key, tensor_type(shape, qtype)) for name, shape, key in plan]
    for name, shape, key, tt in plan:
        block, size = gguf.GGML_QUANT_SIZES[tt]
        w.add_tensor_info(name, shape, np.float32, math.prod(shape) // block * size, raw_dtype=tt)

    def write(tmp):
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for name, shape, key, tt in tqdm(plan, desc=f"writing {type_name}", unit="tensor", disable=not progress):
            w.write_tensor_data(encode_tensor(llama_cpp_tensor(weights, key), tt))
        w.close()
    atomic_write(path, write)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The command: check --out and --type, choose the weights (stream.py), write the GGUF file or the folder.

def check_out(cfg, to_gguf):
    """Exit with one line on a bad --type or --out; nothing is ever overwritten."""
    out, types = cfg["out"], TYPES if to_gguf else FOLDER_TYPES
    if not out:
        sys.exit("error: pass --out=NAME.gguf (one GGUF file) or --out=DIR (a merged Hugging Face folder)")
    if cfg["type"] and cfg["type"] not in types:
        sys.exit(f"error: type must be one of {', '.join(types)} for a {'GGUF file' if to_gguf else 'folder'}, "
                 f"got {cfg['type']!r}")
    for path in ((out, out[:-len(".gguf")] + ".Modelfile") if to_gguf else ()):
        if os.path.exists(path):
            sys.exit(f"error: {path} exists; pass a new --out file (nothing is overwritten)")
    if not to_gguf and os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        sys.exit(f"error: {out} exists and is not an empty folder; pass a new --out folder")


def main(argv=None):
    cfg = configure(settings, argv)
    to_gguf = cfg["out"].endswith(".gguf")
    check_out(cfg, to_gguf)
    try:
        base = find_base(cfg["init_from"], cfg["adapter"])
        if to_gguf and stream.read_config(base).get("quantization_config") and not cfg["dequantize"]:
            # a 4-bit (NF4) checkpoint only has its rounded weights: a GGUF takes them dequantized, only when asked
            raise ValueError(f"{base} is a 4-bit (NF4) checkpoint and GGUF has no NF4 type; pass --init_from=<the "
                             f"16-bit checkpoint it was made from> (the better weights), or --dequantize=True to "
                             f"write its dequantized weights")
        type_name = cfg["type"] or ("f16" if to_gguf else stream.base_type(base))
        # GGUF: merge in fp32 and round once when writing. Folder: read in the dtype it writes; each merged weight
        # is still summed in fp32 and rounded once (lora.py: merge_weight), so a 16-bit base merges to the same
        # bytes as in fp32.
        dtype = torch.float32 if to_gguf else FOLDER_TYPES[type_name]
        weights, which = stream.open_weights(base, cfg["adapter"], dtype)
        print(f"weights: {which}")
        made = base + (f" + {cfg['adapter']}" if cfg["adapter"] else "")
        if to_gguf:
            write_gguf(weights, base, cfg["out"], type_name)
            modelfile, family = write_modelfile(cfg["out"], base)
            print(f"wrote {cfg['out']} ({type_name}, {os.path.getsize(cfg['out']) / 2**20:.1f} MiB) from {made}")
            name = os.path.basename(cfg["out"])[:-len(".gguf")]
            print(f"wrote {modelfile} ({family or 'no'} chat template): ollama create {name} -f {modelfile}; "
                  f"ollama run {name}")
        else:
            copied = stream.write_folder(weights, base, cfg["out"], dtype)
            print(f"wrote {cfg['out']}/ ({type_name}, merged; copied {', '.join(copied) or 'no tokenizer files'}) "
                  f"from {made}")
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
