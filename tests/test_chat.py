"""sample.py's conversation: the commands, Ctrl-C and Ctrl-D, and the KV cache kept across turns giving exactly the
tokens a from-scratch run of the whole history gives."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import save_with_tokenizer

import sample
from model import Llama, ModelArgs
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(sample.settings, max_new_tokens=8, temperature=0, device="cpu")


@pytest.fixture(scope="module")
def chat_dir(bundled_dir, tmp_path_factory):
    """A tiny random model with SmolLM2's tokenizer and ChatML template. Weights of spread 0.3 (not 0.02) make the
    greedy choices clear-cut, so that fp32 rounding (a cached prefix adds its terms in another order) cannot flip
    one; with tied near-equal logits, "same tokens" would test luck, not the cache."""
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=128,
                            max_seq_len=512, tie_embeddings=True))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.5, 1.5) if "norm" in name else p.normal_(0, 0.3)
    return save_with_tokenizer(model, bundled_dir, tmp_path_factory.mktemp("chat"))


def scripted(lines):
    """A stand-in for input(): returns the lines one by one, then raises EOFError as Ctrl-D does."""
    it = iter(lines)

    def read(prompt):
        line = next(it, None)
        if line is None:
            raise EOFError
        if isinstance(line, BaseException):
            raise line
        return line
    return read


def test_cached_turns_equal_runs_from_scratch(chat_dir, capsys):
    model, tok = Llama.from_pretrained(chat_dir), Tokenizer(chat_dir)
    lines = ["Hello!", "پایتخت ایران کجاست؟", "/system Answer in one word.", "And of France? 🇫🇷", "/reset",
             "Again from the start", "/exit", "never read"]
    turns = sample.conversation(model, tok, CFG, read=scripted(lines))
    shown = capsys.readouterr().out
    assert "(system message set)" in shown and "(history cleared)" in shown
    assert len(turns) == 4
    # Replay the same conversation without any cache: render the whole history, generate from scratch.
    system, history, expected = "", [], []
    for line in lines[:6]:
        if line == "/reset":
            history = []
        elif line.startswith("/system"):
            system = line[len("/system "):]
        else:
            msgs = ([{"role": "system", "content": system}] if system else []) + history + \
                   [{"role": "user", "content": line}]
            answer, _ = sample.stream(model, tok, tok.encode_chat(msgs), CFG)
            history += [{"role": "user", "content": line}, {"role": "assistant", "content": answer}]
            expected.append(answer)
    assert [t["answer"] for t in turns] == expected
    assert all(t["answer"] for t in turns)  # the test means something only if answers were generated
    # Turn 2 reuses turn 1 up to where the template re-spells the answer; /system changes the prompt's start.
    first, second, third, fourth = turns
    assert first["reused"] == 0 and second["reused"] > first["tokens"] - 2
    assert third["reused"] < 5 <= fourth["reused"]
    assert model.model.layers[0].self_attn.cache_k is None  # the chat frees its cache when it ends


def test_ctrl_c_stops_an_answer_and_keeps_the_conversation(chat_dir, capsys, monkeypatch):
    model, tok = Llama.from_pretrained(chat_dir), Tokenizer(chat_dir)
    real_stream, calls = sample.stream, []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_stream(*args, **kwargs)
    monkeypatch.setattr(sample, "stream", interrupted_once)
    turns = sample.conversation(model, tok, CFG, read=scripted(["first", KeyboardInterrupt(), "second"]))  # then Ctrl-D
    assert "(stopped)" in capsys.readouterr().out
    assert [t["answer"] for t in turns][0] == "" and turns[1]["answer"]
    assert turns[1]["reused"] <= turns[0]["reused"]  # nothing written during the stopped answer is trusted


def test_chat_command_reads_stdin(chat_dir):
    script = "Hello\n/system Be brief.\nHi again\n/reset\n/exit\nnot read\n"
    proc = subprocess.run([sys.executable, "sample.py", f"--init_from={chat_dir}", "--chat=True", "--interactive=True",
                           "--max_new_tokens=4", "--temperature=0", "--device=cpu", "--dtype=float32"],
                          input=script, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert out.count("> ") == 5 and "(system message set)" in out and "(history cleared)" in out
    proc = subprocess.run([sys.executable, "sample.py", f"--init_from={chat_dir}", "--interactive=True"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.strip() == (
        "error: interactive=True is a conversation: pass --chat=True too")


def test_the_cache_grows_with_the_conversation(chat_dir, monkeypatch):
    """A chat's KV cache starts small and grows as the conversation does (doubling, copying what it holds); a long
    conversation gives the tokens of one whose cache was allocated for the whole context from the start."""
    model, tok = Llama.from_pretrained(chat_dir), Tokenizer(chat_dir)
    lines = ["Hello!", "پایتخت ایران کجاست؟", "And of France? 🇫🇷", "Tell me more.", "Why?", "Thanks, bye."]
    sizes = []

    def read_and_measure(prompt):
        sizes.append(model.model.layers[0].self_attn.cache_k.shape[2])  # positions the cache has room for
        return next(it, "/exit")

    monkeypatch.setattr(sample, "CHAT_CACHE", 16)
    it = iter(lines)
    grown = sample.conversation(model, tok, CFG, read=read_and_measure)
    assert sizes[0] == 16 and sizes == sorted(sizes) and len(set(sizes)) >= 3  # grew several times
    needed = [t["tokens"] + CFG["max_new_tokens"] for t in grown]                # prompt + the longest answer
    assert all(room >= need for room, need in zip(sizes[1:], needed))
    assert sizes[1] < 2 * needed[0] and sizes[-1] < 2 * needed[-1] < model.args.max_seq_len  # never the context
    monkeypatch.setattr(sample, "CHAT_CACHE", model.args.max_seq_len)  # the whole context before the first word
    it = iter(lines)
    full = sample.conversation(model, tok, CFG, read=read_and_measure)
    assert [t["answer"] for t in grown] == [t["answer"] for t in full] and all(t["answer"] for t in full)
