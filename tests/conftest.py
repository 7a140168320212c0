import os
import sys

# Tests import the course files (model.py, lora.py, ...) from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Never touch the network in tests: any hub access fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def bundled_dir():
    """The bundled SmolLM2 converted to Hugging Face layout (once; later runs reuse checkpoints/)."""
    import prepare
    return prepare.prepare_bundled(os.path.join(ROOT, prepare.BUNDLED_DIR))


@pytest.fixture(scope="session")
def bundled_gguf():
    import prepare
    return prepare.bundled_gguf_path()
