"""
Text <-> token ids, and chat prompts in the model's own format.

Two tokenizer families cover the LLaMAs:
  - SentencePiece (`tokenizer.model`): Llama 2. Text is split into pieces from a learned vocabulary; spaces become
    "▁" and every sequence starts with one (the "dummy prefix").
  - Byte-level BPE (`tokenizer.json`, read by the `tokenizers` library): Llama 3, SmolLM2. Text becomes bytes,
    bytes are merged pairwise by a ranked merge list; any string can be encoded, emoji included.
A chat model was fine-tuned on conversations written in one exact format (its chat template): Llama 2 wraps a turn
in [INST] ... [/INST], Llama 3 uses header tokens, SmolLM2 uses ChatML's <|im_start|>role ... <|im_end|>.
Prompting it in another format works badly, so the template comes from the checkpoint itself.
"""

import json
import os

# Used only when a checkpoint ships no template (base models, Meta's folders): the format its vocabulary implies.
TEMPLATES = {
    "llama2": ("{% if messages[0]['role'] == 'system' %}{% set sys = '<<SYS>>\\n' + messages[0]['content'] + "
               "'\\n<</SYS>>\\n\\n' %}{% set messages = messages[1:] %}{% else %}{% set sys = '' %}{% endif %}"
               "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + (sys if loop.first "
               "else '') + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + ' ' + eos_token }}"
               "{% endif %}{% endfor %}"),
    "llama3": ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n'"
               " + m['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "chatml": ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
}
END_OF_TURN = ("<|eot_id|>", "<|im_end|>", "<|end_of_text|>", "<|endoftext|>", "</s>")


def _token_str(t):
    return t.get("content") if isinstance(t, dict) else t


class Tokenizer:
    def __init__(self, path):
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        cfg = json.load(open(cfg_path, encoding="utf-8")) if os.path.exists(cfg_path) else {}
        json_file, sp_file = os.path.join(folder, "tokenizer.json"), os.path.join(folder, "tokenizer.model")
        if path.endswith(".model"):
            json_file = ""
        if os.path.exists(json_file):
            from tokenizers import Tokenizer as HFTokenizer
            self.kind, self.tk = "bpe", HFTokenizer.from_file(json_file)
            vocab = self.tk.get_vocab(with_added_tokens=True)
        elif os.path.exists(sp_file):
            import sentencepiece
            self.kind, self.sp = "sentencepiece", sentencepiece.SentencePieceProcessor(model_file=sp_file)
            vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}
        else:
            raise FileNotFoundError(f"{folder}: no tokenizer.json or tokenizer.model")
        self.vocab_size = len(vocab)
        bos, eos = _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token"))
        if self.kind == "sentencepiece":
            bos, eos = bos or self.sp.id_to_piece(self.sp.bos_id()), eos or self.sp.id_to_piece(self.sp.eos_id())
        self.bos_token, self.eos_token = bos, eos
        self.pad_token = _token_str(cfg.get("pad_token"))  # None if unnamed; export.py records it in a GGUF
        self.bos_id, self.eos_id = vocab.get(bos), vocab.get(eos)
        # Generation ends at the end-of-sequence token or at any end-of-turn token the vocabulary has.
        self.stop_ids = {vocab[t] for t in END_OF_TURN if t in vocab} | ({self.eos_id} - {None})
        self.add_bos = cfg.get("add_bos_token", self.kind == "sentencepiece" or "<|begin_of_text|>" in vocab)
        # Specials the sentencepiece path must find in text itself (SentencePiece would spell "<s>" letter by letter).
        self._specials = {t: vocab[t] for t in (bos, eos) if t in vocab}
        self.chat_template = cfg.get("chat_template") or _read(os.path.join(folder, "chat_template.jinja"))
        if isinstance(self.chat_template, list):  # some repos store several named templates
            self.chat_template = next(t["template"] for t in self.chat_template if t.get("name") == "default")
        if not self.chat_template:
            family = ("llama3" if "<|start_header_id|>" in vocab else "chatml" if "<|im_start|>" in vocab
                      else "llama2")
            self.chat_template = TEMPLATES[family]
        self._template = None

    def encode(self, text, bos=False, eos=False):
        if self.kind == "bpe":
            ids = self.tk.encode(text, add_special_tokens=False).ids
        else:
            ids = self._encode_sp(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def _encode_sp(self, text):
        # Split on special-token strings (a chat template writes "<s>" and "</s>" into the text), encode the rest.
        for tok, tid in self._specials.items():
            if tok in text:
                parts = text.split(tok)
                out = self._encode_sp(parts[0])
                for p in parts[1:]:
                    out += [tid] + self._encode_sp(p)
                return out
        return self.sp.encode(text) if text else []

    def decode(self, ids):
        ids = [int(i) for i in ids]
        if self.kind == "bpe":
            return self.tk.decode(ids, skip_special_tokens=False)
        return self.sp.decode(ids)

    def render_chat(self, messages, add_generation_prompt=True):
        """messages: [{"role": "system"|"user"|"assistant", "content": str}] -> the prompt text the model expects."""
        if self._template is None or self._template[0] != self.chat_template:  # first use, or a new template set
            from jinja2.sandbox import ImmutableSandboxedEnvironment  # a template is data: it must not run code

            def raise_exception(msg):
                raise ValueError(f"chat template: {msg}")
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            self._template = (self.chat_template, env.from_string(self.chat_template))  # compiled once per text
        return self._template[1].render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages, add_generation_prompt=True):
        # The template writes BOS itself where the model wants it, so no extra BOS is added here.
        return self.encode(self.render_chat(messages, add_generation_prompt))


def _read(path):
    return open(path, encoding="utf-8").read() if os.path.exists(path) else None
