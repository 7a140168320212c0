"""The bundled SmolLM2: our conversion of its GGUF against transformers reading the same GGUF."""
import os

import pytest
import torch

from model import Llama
from test_model import assert_greedy
from tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 5 o'clock!",
    "persian": "تهران پایتخت ایران است و جمعیت آن بیش از هشت میلیون نفر است؛ کتاب‌ها را می‌خوانم.",
    "digits": "In 2024, 1234567 people paid $12.50 (3.14159%) — ۱۴۰۳/۰۵/۱۲ and x٤٥٦.",
    "code": "def add(a, b):\n    return a + b  # sum\n\tprint(f'{x!r}')\n",
    "emoji": "I love 🍕 and 🎉🎉! 👩‍💻 works 🇮🇷.",
    "specials": "<|im_start|>user\nhi<|im_end|>\n",
}
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "پایتخت ایران کجاست؟"]


@pytest.fixture(scope="module")
def hf_tokenizer(bundled_gguf):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(bundled_gguf),
                                                      gguf_file=os.path.basename(bundled_gguf))


@pytest.mark.parametrize("kind", list(TEXTS))
def test_token_ids_equal_transformers(kind, bundled_dir, hf_tokenizer):
    tok = Tokenizer(bundled_dir)
    text = TEXTS[kind]
    ids = tok.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == text


def test_digits_are_split_one_by_one_as_smollm_pretokenizer_says(bundled_dir, hf_tokenizer):
    """
    The GGUF names the "smollm" pre-tokenizer: every digit is its own piece (as llama.cpp and SmolLM2's own
    tokenizer.json do). transformers' GGUF reader does not apply that rule, which shows only where a space is
    followed by a digit whose first byte merges with the space (the Arabic-Indic digits): there we follow the model.
    """
    tok = Tokenizer(bundled_dir)
    ids = tok.encode(" ٤٥٦")
    assert ids == tok.encode(" ") + tok.encode("٤") + tok.encode("٥") + tok.encode("٦")
    assert hf_tokenizer.encode(" ٤٥٦", add_special_tokens=False) != ids  # the known difference, pinned down
    assert [tok.decode([i]) for i in tok.encode("1234")] == ["1", "2", "3", "4"]
    assert hf_tokenizer.encode("x ۱۲۳ 456", add_special_tokens=False) == tok.encode("x ۱۲۳ 456")


def test_chat_prompt_equals_transformers_template(bundled_dir, hf_tokenizer):
    tok = Tokenizer(bundled_dir)
    msgs = [{"role": "user", "content": "Hi there"}]
    ours = tok.render_chat(msgs)
    assert ours == hf_tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.endswith("<|im_start|>assistant\n")
    assert tok.eos_id == 2 and tok.decode([tok.eos_id]) == "<|im_end|>"
    tok.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"  # a user's own template
    assert tok.render_chat(msgs) == "[user] Hi there\n"                       # used from the next render on


def test_greedy_continuation_equals_transformers(bundled_dir, bundled_gguf):
    tok = Tokenizer(bundled_dir)
    ours = Llama.from_pretrained(bundled_dir)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(bundled_gguf), gguf_file=os.path.basename(bundled_gguf), dtype=torch.float32).eval()
    ref.generation_config.eos_token_id = None  # compare all 30 steps, also past an end-of-turn token
    for prompt in PROMPTS:
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
        x = torch.tensor([ids])
        got = torch.cat(list(ours.generate(x, 30, temperature=0)), dim=1)
        want = ref.generate(x, max_new_tokens=30, do_sample=False, pad_token_id=0)[:, len(ids):]
        assert got.shape == want.shape == (1, 30)
        # Every token transformers picked is ours too, up to near ties: our logits and theirs differ by ~1e-5
        # (another summation order, 30 layers), so where two tokens are within 1e-3 either pick is right.
        # Both hold for our own picks too, so the two continuations are identical up to a near tie, if any.
        assert assert_greedy(ours, ids, want[0].tolist(), tol=1e-3) >= 28, prompt
        assert assert_greedy(ours, ids, got[0].tolist(), tol=1e-3) >= 28, prompt


def test_prepare_converts_into_a_fresh_folder_and_is_idempotent(tmp_path, capsys):
    """Never rely on an existing checkpoints/: convert from the GGUF again, then check a second run is a no-op."""
    import prepare
    out = str(tmp_path / "smol")
    prepare.prepare_bundled(out)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    before = os.path.getmtime(os.path.join(out, "model.safetensors"))
    prepare.prepare_bundled(out)
    assert "already converted" in capsys.readouterr().out
    assert os.path.getmtime(os.path.join(out, "model.safetensors")) == before
    model = Llama.from_pretrained(out)
    assert (model.args.dim, model.args.n_layers, model.args.n_heads, model.args.n_kv_heads) == (576, 30, 9, 3)
    assert model.args.tie_embeddings and model.args.rope_theta == 100000.0
