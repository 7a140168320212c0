"""train.py under torchrun on CPU (gloo, tiny random models): every process trains on a share of every batch over
whole epochs, and a loss that turns NaN on one process stops every process, keeping the last good checkpoint."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import save_with_tokenizer

import data
import checkpoint
from model import Llama, ModelArgs
from tokenizer import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED, BATCH, MAX_LEN = 1337, 2, 320
COMMON = ["config/quickstart.py", f"--max_seq_len={MAX_LEN}", f"--batch_size={BATCH}", "--eval_generate=0",
          "--test_data=", "--val_limit=0", "--dtype=float32", "--warmup_iters=1", "--lora_dropout=0.0",
          f"--seed={SEED}"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_rows(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return str(path)


def sample_files(tmp_path, n_train):
    """n_train questions of the bundled sample to train on, 2 more to validate on: one question per passage (the
    sample asks 3 about each), so examples differ in their words."""
    rows = data.load_qa_rows(os.path.join(ROOT, "data", "persian_qa_sample.jsonl"))[0][::3]
    train_rows, val_rows = rows[:n_train], rows[n_train:n_train + 2]
    return write_rows(tmp_path / "train.jsonl", train_rows), write_rows(tmp_path / "val.jsonl", val_rows), train_rows, val_rows


@pytest.mark.parametrize("world", [2, 3])
def test_torchrun_trains_whole_epochs_over_a_ragged_data_set(tiny_dir, tmp_path, world):
    train_file, val_file, rows, _ = sample_files(tmp_path, 13)
    examples = data.encode_rows(Tokenizer(tiny_dir), rows, MAX_LEN, SEED)
    global_bs, epochs = BATCH * world, 3
    n_full = len(examples) // global_bs
    assert len(examples) == 13 and 0 < 13 % global_bs <= BATCH * (world - 1)  # the short batch starves a process
    # Without drop_last the short batch is among the first n_full batches of some epoch: a run that counted
    # n_full batches but walked the undropped list would hand some process an empty slice there.
    assert any(len(b) < global_bs
               for e in range(epochs) for b in data.make_batches(examples, global_bs, SEED, e)[:n_full])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}",
                           f"--master_port={free_port()}", "train.py", *COMMON, f"--init_from={tiny_dir}",
                           f"--train_data={train_file}", f"--val_data={val_file}", f"--epochs={epochs}", "--max_iters=0",
                           "--eval_interval=1000", f"--out_dir={out}"],
                          cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(out / checkpoint.STATE_FILE, weights_only=True)
    assert state["pos"] == {"iter": epochs * n_full, "epoch": epochs - 1, "batch": n_full}  # every whole batch, once
    losses = [l for _, l in state["history"]["train"]]
    assert len(losses) == epochs * n_full and all(0 < l < 20 for l in losses)


def test_nan_loss_on_one_process_stops_every_process(tiny_dir, tmp_path):
    """One token's embedding is NaN in the base model, and the first example holding that token goes to process 1
    at some step after the first: the loss turns NaN there on process 1, not on process 0. Both processes must stop
    with the error (not wait for the other in an all_reduce), and the checkpoint must be the one before that step."""
    train_file, val_file, rows, val_rows = sample_files(tmp_path, 13)
    tok = Tokenizer(tiny_dir)
    examples = data.encode_rows(tok, rows, MAX_LEN, SEED)
    batches = data.make_batches(examples, 2 * BATCH, SEED, 0, drop_last=True)    # what the two processes walk
    # The first step after the first (which leaves a checkpoint) where process 1 reads a prompt token that no
    # example before it, no example of process 0 at that step and no validation example holds.
    seen = {t for p, a in data.encode_rows(tok, val_rows, MAX_LEN, SEED) for t in p + a}
    for step, batch in enumerate(batches):
        seen |= {t for i in batch[:BATCH] for t in examples[i][0] + examples[i][1]}
        own = [t for i in batch[BATCH:] for t in examples[i][0] if t not in seen]
        if step >= 1 and own:
            token = own[0]
            break
        seen |= {t for i in batch[BATCH:] for t in examples[i][0] + examples[i][1]}
    else:
        pytest.fail("no step gives process 1 a token of its own")
    # an untied copy of the tiny model (a NaN in a tied embedding would reach every logit through the head)
    torch.manual_seed(0)
    model = Llama(ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=49152, hidden_dim=128,
                            max_seq_len=1024, tie_embeddings=False))
    with torch.no_grad():
        model.model.embed_tokens.weight[token] = float("nan")
    base = save_with_tokenizer(model, tiny_dir, tmp_path / "poisoned")
    out, port = tmp_path / "out", free_port()
    procs = [subprocess.Popen([sys.executable, "train.py", *COMMON, f"--init_from={base}", f"--train_data={train_file}",
                               f"--val_data={val_file}", "--eval_interval=1", "--max_iters=3", f"--out_dir={out}"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1", RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    try:
        ended = [p.communicate(timeout=240) for p in procs]   # a process left waiting would time out here
    finally:
        for p in procs:
            p.kill()
    for r, (p, (_, err)) in enumerate(zip(procs, ended)):
        assert p.returncode == 1 and f"error: loss is nan at step {step}." in err, (r, err[-2000:])
    state = torch.load(out / checkpoint.STATE_FILE, weights_only=True)
    assert state["pos"]["iter"] == step                       # the last good step's checkpoint, kept
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())
