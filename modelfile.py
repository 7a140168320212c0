"""
Running an export in Ollama: NAME.Modelfile, written by export.py beside NAME.gguf.

    ollama create smollm2-persian -f smollm2-persian.Modelfile     # imports the GGUF named in FROM
    ollama run smollm2-persian

A Modelfile is a few lines: FROM (the GGUF file, relative to the Modelfile), TEMPLATE (how a conversation becomes
the prompt text), SYSTEM (the default system message), PARAMETER (stop words, temperature, ...). The GGUF already
carries the model's Jinja chat template, but Ollama writes prompts with Go templates: {{ .System }},
{{ range .Messages }} ... {{ end }}, {{ if eq .Role "user" }} ... {{ else if ... }} ... {{ end }}. Below are
tokenizer.py's three chat formats in that syntax. Ollama gives a template the system message as .System and the
turns as .Messages (a system turn in them matches neither branch), and llama.cpp adds BOS itself when the GGUF
says add_bos_token, so a template starts after it. tests/test_export.py renders a conversation with these
templates and checks that the text is the one the model's own chat template writes.
"""

import os

from convert import write_text
from tokenizer import Tokenizer

TEMPERATURE = 0.8  # sample.py's default (a test keeps the two equal): Ollama then samples as our chat does

OLLAMA = {  # family: (its mark in a Jinja chat template, the text around a system message there, the Go template)
    "chatml": ("<|im_start|>", ("<|im_start|>system\n", "<|im_end|>"),
               '{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}{{ range .Messages }}'
               '{{ if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n<|im_start|>assistant\n'
               '{{ else if eq .Role "assistant" }}{{ .Content }}<|im_end|>\n{{ end }}{{ end }}'),
    "llama3": ("<|start_header_id|>", ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>"),
               '{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
               '{{ range .Messages }}{{ if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n'
               '{{ .Content }}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n'
               '{{ else if eq .Role "assistant" }}{{ .Content }}<|eot_id|>{{ end }}{{ end }}'),
    # Llama 2 writes the system message inside the first [INST]: $system is emptied once it is written.
    "llama2": ("[INST]", ("<<SYS>>\n", "\n<</SYS>>"),
               '{{ $system := .System }}{{ range .Messages }}{{ if eq .Role "user" }}[INST] {{ if $system }}'
               '<<SYS>>\n{{ $system }}\n<</SYS>>\n\n{{ $system = "" }}{{ end }}{{ .Content }} [/INST]'
               '{{ else if eq .Role "assistant" }} {{ .Content }} </s><s>{{ end }}{{ end }}'),
}


def default_system(tok, family):
    """The system message the model's own template writes when a conversation has none ("" if none): SmolLM2's
    names itself. The Modelfile sets it as Ollama's SYSTEM, which a conversation's own system message replaces."""
    head, tail = OLLAMA[family][1]
    text = tok.render_chat([{"role": "user", "content": "?"}])
    start = text.find(head)
    return text[start + len(head):text.index(tail, start)] if start >= 0 else ""


def write_modelfile(gguf_path, folder):
    """NAME.Modelfile beside NAME.gguf: the file, the chat template, the stop words and the temperature.
    Returns (its path, the family of template written; None for a template not in OLLAMA: Ollama then goes by the
    GGUF's own tokenizer.chat_template, which it recognises for the common formats)."""
    tok = Tokenizer(folder)
    family = next((name for name, (mark, _, _) in OLLAMA.items() if mark in tok.chat_template), None)
    lines = [f"FROM ./{os.path.basename(gguf_path)}"]
    if family:
        lines.append(f'TEMPLATE """{OLLAMA[family][2]}"""')
        system = default_system(tok, family)
        if system:
            lines.append(f'SYSTEM """{system}"""')
    text_of = tok.tk.id_to_token if tok.kind == "bpe" else tok.sp.id_to_piece  # Ollama stops on text
    lines += [f'PARAMETER stop "{text_of(i)}"' for i in sorted(tok.stop_ids)]
    lines.append(f"PARAMETER temperature {TEMPERATURE}")
    path = gguf_path[:-len(".gguf")] + ".Modelfile"
    write_text(path, "\n".join(lines) + "\n")
    return path, family
