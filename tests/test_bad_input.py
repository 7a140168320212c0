"""Bad input at the command line: each case ends in ONE line that says what is wrong and what to do, a non-zero
exit code, and nothing written half-way. The commands run in-process (train.main, sample.main, export.main)."""
import json
import os
import shutil

import pytest
import torch
from conftest import save_with_tokenizer

import export
import lora
import prepare
import sample
import checkpoint
import train
from model import Llama, ModelArgs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def error_line(main, argv, capsys):
    """Run a command that must fail; return its one error line (from SystemExit or from stderr)."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    code = e.value.code
    msg = code if isinstance(code, str) else capsys.readouterr().err.strip()
    assert code not in (0, None), "the command should have failed"
    assert msg.startswith("error: ") and "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.fixture
def base(tiny_dir, tmp_path):
    """A private copy of the tiny model (tests below break its files)."""
    return shutil.copytree(tiny_dir, tmp_path / "base")


def train_argv(base, out, *extra):
    return ["config/quickstart.py", f"--init_from={base}", f"--out_dir={out}", "--batch_size=2", "--max_seq_len=320",
            "--train_data=data/persian_qa_sample.jsonl",
            "--eval_generate=0", "--max_iters=2", "--eval_interval=2", "--val_data=", "--test_data=", *extra]


def make_adapter(base, out, r=4):
    model = lora.apply_lora(Llama.from_pretrained(str(base)), r=r, alpha=8, targets="all-linear")
    lora.save_adapter(model, str(out), base_model_name_or_path=str(base))
    return str(out)


def other_base(tmp_path, tiny_dir):
    """Another model with the same vocabulary but other widths: an adapter of `base` does not fit it."""
    torch.manual_seed(1)
    model = Llama(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=96,
                            max_seq_len=512, tie_embeddings=True))
    return save_with_tokenizer(model, tiny_dir, tmp_path / "other")


# -- weight files -----------------------------------------------------------------------------------------------

def test_truncated_safetensors(base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])  # a download cut off half-way
    expected = (f"error: {weights} is truncated or not a safetensors file (Error while deserializing header: "
                f"incomplete metadata, file not fully covered): download or convert it again")
    assert error_line(sample.main, [f"--init_from={base}", "--max_new_tokens=1"], capsys) == expected
    assert error_line(train.main, train_argv(base, tmp_path / "run"), capsys) == expected
    assert not os.path.exists(tmp_path / "run")


def test_checkpoint_missing_a_tensor(base, tmp_path, monkeypatch, capsys):
    from safetensors.torch import load_file, save_file
    monkeypatch.chdir(ROOT)
    sd = load_file(str(base / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(base / "model.safetensors"))
    assert error_line(train.main, train_argv(base, tmp_path / "run"), capsys) == (
        f"error: {base}: checkpoint does not match the model: missing keys: model.layers.1.mlp.up_proj.weight")
    assert not os.path.exists(tmp_path / "run")


# -- adapters ---------------------------------------------------------------------------------------------------

def test_adapter_of_another_base(base, tiny_dir, tmp_path, capsys):
    adapter, other = make_adapter(base, tmp_path / "adapter"), other_base(tmp_path, tiny_dir)
    expected = (f"error: {adapter} was trained on another base model: model.layers.0.mlp.down_proj.lora_A.weight "
                f"expected (4, 96), found (4, 128); load it into the model it was trained on (its "
                f"base_model_name_or_path: '{base}')")
    assert error_line(sample.main, [f"--init_from={other}", f"--adapter={adapter}", "--max_new_tokens=1"],
                      capsys) == expected
    out = tmp_path / "merged"
    assert error_line(export.main, [f"--init_from={other}", f"--adapter={adapter}", f"--out={out}"], capsys) == expected
    assert not [f for f in os.listdir(tmp_path) if f.startswith("merged")]  # no half-written folder either


def test_adapter_folder_without_weights(base, tmp_path, capsys):
    adapter = make_adapter(base, tmp_path / "adapter")
    os.remove(os.path.join(adapter, "adapter_model.safetensors"))
    expected = (f"error: {adapter}/adapter_model.safetensors not found (nor adapter_model.bin): this folder has an "
                f"adapter_config.json but no adapter weights; copy adapter_model.safetensors next to it")
    assert error_line(sample.main, [f"--adapter={adapter}", "--max_new_tokens=1"], capsys) == expected
    assert error_line(export.main, [f"--adapter={adapter}", f"--out={tmp_path / 'merged'}"], capsys) == expected
    assert not [f for f in os.listdir(tmp_path) if f.startswith("merged")]


def test_adapter_whose_base_is_missing(base, tmp_path, capsys):
    adapter = make_adapter(base, tmp_path / "adapter")
    shutil.rmtree(base)
    assert error_line(sample.main, [f"--adapter={adapter}", "--max_new_tokens=1"], capsys) == (
        f"error: the adapter's base model '{base}' (base_model_name_or_path in {adapter}/adapter_config.json) "
        f"is not a folder here; pass --init_from=<the base checkpoint folder>")
    assert error_line(export.main, [f"--adapter={adapter}", f"--out={tmp_path / 'merged'}"], capsys) == (
        f"error: the adapter's base model '{base}' (base_model_name_or_path in {adapter}/adapter_config.json) "
        f"is not a folder here; pass --init_from=<the base checkpoint folder>")
    assert not [f for f in os.listdir(tmp_path) if f.startswith("merged")]


def test_merge_refuses_a_folder_that_is_not_empty(base, tmp_path, capsys):
    adapter = make_adapter(base, tmp_path / "adapter")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "notes.txt").write_text("mine")
    assert error_line(export.main, [f"--adapter={adapter}", f"--out={tmp_path / 'merged'}"], capsys) == (
        f"error: {tmp_path / 'merged'} exists and is not an empty folder; pass a new --out folder")
    assert os.listdir(tmp_path / "merged") == ["notes.txt"]


# -- data files -------------------------------------------------------------------------------------------------

EXPECTED_SHAPE = ('expected JSONL or a JSON list of rows like {"id", "title", "context", "question", "answers": '
                  '{"text": [...], "answer_start": [...]}}, or SQuAD v2 JSON {"data": [{"title", "paragraphs": '
                  '[{"context", "qas": [...]}]}]}')


@pytest.mark.parametrize("content", ["", "this is not json\n", '{"id": "1", "title": "t", "answers": []}\n'],
                         ids=["empty", "not-json", "no-question-or-context"])
def test_unusable_data_file(base, tmp_path, monkeypatch, capsys, content):
    monkeypatch.chdir(ROOT)
    data_file = tmp_path / "rows.jsonl"
    data_file.write_text(content)
    assert error_line(train.main, train_argv(base, tmp_path / "run", f"--train_data={data_file}"), capsys) == (
        f"error: {data_file}: no usable QA rows; {EXPECTED_SHAPE}")
    assert not os.path.exists(tmp_path / "run")


def test_no_training_example_fits(base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert error_line(train.main, train_argv(base, tmp_path / "run", "--max_seq_len=96"), capsys) == (
        "error: no training examples fit max_seq_len=96: the shortest needs 134 tokens (chat template, question, "
        "answer and at least 32 tokens of passage); raise max_seq_len to at least 134")
    assert not os.path.exists(tmp_path / "run")


def test_empty_validation_set(base, tmp_path, monkeypatch, capsys):
    """A validation file whose every question is far longer than max_seq_len: no validation example is left."""
    monkeypatch.chdir(ROOT)
    val = tmp_path / "val.jsonl"
    row = {"id": "v1", "title": "t", "context": "تهران پایتخت ایران است.", "question": "پایتخت ایران کجاست؟ " * 60,
           "answers": {"text": ["تهران"], "answer_start": [0]}}
    val.write_text(json.dumps(row, ensure_ascii=False) + "\n")
    msg = error_line(train.main, train_argv(base, tmp_path / "run", f"--val_data={val}"), capsys)
    assert msg.startswith("error: no validation examples fit max_seq_len=320: the shortest needs ")
    assert not os.path.exists(tmp_path / "run")


# -- settings ---------------------------------------------------------------------------------------------------

def test_config_file_with_a_syntax_error(base, tmp_path, capsys):
    cfg = tmp_path / "my_config.py"
    cfg.write_text("batch_size = 4\nlearning_rate = 1e-3)\n")
    assert error_line(train.main, [str(cfg)], capsys) == (
        f"error: config file '{cfg}' line 2: unmatched ')' (a config file is Python: key = value, one per line)")


def test_every_command_takes_key_value_and_names_a_typo(base, tmp_path, capsys):
    """One convention for all commands (configurator.py): --key=value, and a misspelt key names the right one."""
    for main in (train.main, sample.main, export.main):
        assert error_line(main, ["--init_fro=x"], capsys).startswith(
            "error: unknown config key 'init_fro' in the command line; did you mean init_from")
    assert error_line(prepare.main, ["--hub=meta-llama/Llama-2-7b-chat-hf"], capsys) == (
        "error: unknown config key 'hub' in the command line; did you mean hub_id?")
    assert error_line(prepare.main, ["--data=squad"], capsys) == (
        "error: data must be 'persian_qa' (the one data set prepare.py downloads), got 'squad'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_asked_for_without_cuda(base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    expected = ("error: device='cuda' but this PyTorch sees no CUDA GPU (a CPU-only build, or no driver); "
                "use --device=cpu")
    assert error_line(train.main, train_argv(base, tmp_path / "run", "--device=cuda"), capsys) == expected
    assert error_line(sample.main, [f"--init_from={base}", "--device=cuda"], capsys) == expected
    assert error_line(sample.main, [f"--init_from={base}", "--device=gpu"], capsys) == (
        "error: device must be 'cpu', 'cuda' or 'cuda:N', got 'gpu'")
    assert not os.path.exists(tmp_path / "run")


def test_resume_with_another_lora_rank(base, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    train.main(train_argv(base, out))
    before = {f: os.path.getmtime(out / f) for f in os.listdir(out)}
    capsys.readouterr()
    assert error_line(train.main, [f"--out_dir={out}", "--init_from=resume", "--lora_r=8", "--max_iters=4"],
                      capsys) == (f"error: cannot resume with lora_r=8: the run in {out} was trained with lora_r=16; "
                                  f"drop --lora_r, or start a new run in another out_dir")
    assert {f: os.path.getmtime(out / f) for f in os.listdir(out)} == before  # the run is untouched


def test_resume_loads_with_weights_only(base, tmp_path, monkeypatch):
    """train_state.pt holds tensors and plain containers only: torch.load(weights_only=True) reads it, so a
    downloaded run folder can never execute code when resumed."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    train.main(train_argv(base, out))
    state = torch.load(out / checkpoint.STATE_FILE, weights_only=True)
    assert state["pos"]["iter"] == 2 and isinstance(state["rng"]["torch"], torch.Tensor)
