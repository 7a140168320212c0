import os
import sys

# Tests import the course files (model.py, lora.py, ...) from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Never touch the network in tests: any hub access fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


def save_with_tokenizer(model, tok_dir, path):
    """A checkpoint folder as the commands expect one: the model's weights and config, and the tokenizer files of
    tok_dir. Tests import it with `from conftest import save_with_tokenizer`. Returns the folder as a string."""
    import shutil
    model.save_pretrained(str(path))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, f), os.path.join(path, f))
    return str(path)


@pytest.fixture(scope="session")
def bundled_dir():
    """The bundled SmolLM2 converted to Hugging Face layout (once; later runs reuse checkpoints/)."""
    import prepare
    return prepare.prepare_bundled(os.path.join(ROOT, prepare.BUNDLED_DIR))


@pytest.fixture(scope="session")
def bundled_gguf():
    import prepare
    return prepare.bundled_gguf_path()


@pytest.fixture(scope="session")
def tiny_dir(bundled_dir, tmp_path_factory):
    """A tiny random LLaMA with the bundled tokenizer: train.py end to end in seconds."""
    import torch

    from model import Llama, ModelArgs
    out = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=128,
                            max_seq_len=1024, tie_embeddings=True))
    return save_with_tokenizer(model, bundled_dir, out)
