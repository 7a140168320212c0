"""train.py end to end: exact resume, clear failures, DDP = one process, and real learning on the bundled model."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import configurator
import checkpoint
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(tmp, name, *extra, base):
    out = str(tmp / name)
    # validation: a split of the short sample (not the quickstart's long passages), no test set: seconds, not minutes
    train.main(["config/quickstart.py", f"--init_from={base}", f"--out_dir={out}", "--batch_size=2",
                "--train_data=data/persian_qa_sample.jsonl",
                "--max_seq_len=320", "--eval_generate=0", "--eval_interval=2", "--learning_rate=1e-3",
                "--warmup_iters=1", "--val_data=", "--test_data=", "--dtype=float32", *extra])
    return out


def adapter_bytes(out):
    with open(os.path.join(out, "adapter_model.safetensors"), "rb") as f:
        return f.read()


def test_resume_continues_exactly(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    straight = run(tmp_path, "straight", "--max_iters=4", base=tiny_dir)
    half = run(tmp_path, "resumed", "--max_iters=2", "--lr_decay_iters=4", base=tiny_dir)
    saved = torch.load(os.path.join(half, checkpoint.STATE_FILE), weights_only=False)
    assert saved["pos"]["iter"] == 2 and saved["rng"]["cuda"] is None     # a CPU run: no GPU state
    # as if saved by an older train.py on a machine with 3 GPUs: one state per GPU, none of them this machine's
    saved["rng"]["cuda"] = [torch.zeros(16, dtype=torch.uint8)] * 3
    torch.save(saved, os.path.join(half, checkpoint.STATE_FILE))
    train.main([f"--out_dir={half}", "--init_from=resume", "--max_iters=4"])
    s = torch.load(os.path.join(straight, checkpoint.STATE_FILE), weights_only=False)
    r = torch.load(os.path.join(half, checkpoint.STATE_FILE), weights_only=False)
    assert [l for _, l in r["history"]["train"]] == [l for _, l in s["history"]["train"]]  # identical losses
    assert adapter_bytes(half) == adapter_bytes(straight)                                 # identical adapter bytes
    assert r["pos"] == s["pos"]


def test_rng_state_is_the_training_devices_only(monkeypatch):
    """Saved: the CPU's, Python's and the training GPU's random states, never every visible GPU's (a resume on a
    machine with fewer GPUs would index GPUs that are not there). Restored: onto the GPU this process trains on;
    an older checkpoint's list of states gives its first (the GPU rank 0 trained on)."""
    calls = []

    def get_rng_state(device="cuda"):
        calls.append(("get", str(device)))
        return torch.full((4,), int(str(device)[-1]), dtype=torch.uint8)

    def every_gpu(*args):
        raise AssertionError("one GPU's state only")

    monkeypatch.setattr(torch.cuda, "get_rng_state", get_rng_state)
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda s, device="cuda": calls.append(("set", s[0].item(), str(device))))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", every_gpu)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", every_gpu)
    rng = checkpoint.rng_state("cuda:3")                         # saved by the process training on GPU 3
    assert calls == [("get", "cuda:3")] and rng["cuda"].tolist() == [3] * 4
    cpu_before = torch.get_rng_state()
    torch.rand(5)
    checkpoint.restore_rng(rng, "cuda:0")                        # resumed on a machine with one GPU
    assert calls[-1] == ("set", 3, "cuda:0") and torch.equal(torch.get_rng_state(), cpu_before)
    rng["cuda"] = [torch.full((4,), i, dtype=torch.uint8) for i in (5, 6, 7, 8)]  # older: one per visible GPU
    checkpoint.restore_rng(rng, "cuda:1")
    assert calls[-1] == ("set", 5, "cuda:1")
    n = len(calls)
    checkpoint.restore_rng(rng, "cpu")                           # resumed on a CPU: no GPU state to set
    assert checkpoint.rng_state("cpu")["cuda"] is None and len(calls) == n


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "nan", "--max_iters=6", "--eval_interval=1", "--learning_rate=1e30", "--grad_clip=0.0",
            "--warmup_iters=0", base=tiny_dir)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert "error: loss is" in err and "the last good checkpoint is kept" in err and "learning_rate" in err
    failed_at = int(err.split(" at step ")[1].split(".")[0])
    state = torch.load(tmp_path / "nan" / checkpoint.STATE_FILE, weights_only=False)
    assert state["pos"]["iter"] == failed_at  # the checkpoint of the last finished step, not a poisoned one
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "nan" / "adapter_model.safetensors")).values())


def test_non_finite_gradients_skip_the_update():
    """A gradient that is inf or NaN skips the step (as GradScaler does) instead of poisoning the weights."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([w], lr=0.1)
    before = w.detach().clone()
    w.grad = torch.tensor([[float("inf")] * 3] + [[0.0] * 3] * 3)
    assert not train.optimizer_step(opt, [w], grad_clip=1.0)
    assert torch.equal(w, before) and w.grad is None and not opt.state           # nothing moved, nothing counted
    w.grad = torch.ones(4, 3)
    assert train.optimizer_step(opt, [w], grad_clip=0.0)
    assert not torch.equal(w, before) and opt.state[w]["step"] == 1


def test_fp16_loss_scaling_unscales_before_clipping_and_skips_overflow():
    """With the scaler, the update equals plain AdamW on the true (unscaled, clipped) gradients; an overflow is a
    skipped step and a halved scale."""
    torch.manual_seed(0)
    w, ref = torch.nn.Parameter(torch.randn(8)), torch.nn.Parameter(torch.randn(8))
    ref.data.copy_(w.data)
    opt, opt_ref = torch.optim.AdamW([w], lr=0.1), torch.optim.AdamW([ref], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randn(8)
    scaler.scale((w * x).sum() * 3).backward()                   # d/dw = 3x, stored times 1024
    (ref * x).sum().mul(3).backward()
    assert torch.allclose(w.grad, ref.grad * 2 ** 10)
    assert train.optimizer_step(opt, [w], grad_clip=1.0, scaler=scaler)
    assert train.optimizer_step(opt_ref, [ref], grad_clip=1.0)
    assert torch.allclose(w, ref, atol=1e-7)                    # clipped to norm 1 after unscaling, as without fp16
    scaler.scale((w * float("inf")).sum()).backward()
    before = w.detach().clone()
    assert not train.optimizer_step(opt, [w], grad_clip=1.0, scaler=scaler)
    assert torch.equal(w, before) and scaler.get_scale() == 2.0 ** 9


def test_float16_run_trains_with_a_loss_scale_and_resumes_with_it(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = run(tmp_path, "fp16", "--max_iters=2", "--dtype=float16", base=tiny_dir)
    state = torch.load(os.path.join(out, checkpoint.STATE_FILE), weights_only=True)
    assert state["scaler"]["scale"] > 0 and all(math.isfinite(l) for _, l in state["history"]["train"])
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["skipped_steps"] == state["history"].get("skipped", 0)
    train.main([f"--out_dir={out}", "--init_from=resume", "--max_iters=3"])
    assert torch.load(os.path.join(out, checkpoint.STATE_FILE), weights_only=True)["pos"]["iter"] == 3


def test_unknown_config_key_names_the_closest(capsys):
    with pytest.raises(SystemExit) as e:
        configurator.configure(train.settings, ["--learning_rte=1e-3"])
    assert "unknown config key 'learning_rte'" in str(e.value) and "learning_rate" in str(e.value)
    with pytest.raises(SystemExit) as e:
        configurator.configure(train.settings, ["--lora_dropout"])
    assert "expected --key=value" in str(e.value)
    cfg = configurator.configure(train.settings, ["config/persian_qa.py", "--batch_size=2", "--quantize=nf4"])
    assert cfg["batch_size"] == 2 and cfg["quantize"] == "nf4" and cfg["optimizer"] == "paged_adamw"


def test_unknown_key_in_config_file(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("lora_rank = 8\n")
    with pytest.raises(SystemExit) as e:
        configurator.configure(train.settings, [str(bad)])
    assert "unknown config key 'lora_rank'" in str(e.value) and "lora_r" in str(e.value)


def test_bad_dtype_and_quantize_values_are_clear_errors(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "bf16", "--dtype=bf16", base=tiny_dir)
    assert "dtype must be auto or one of float32, bfloat16, float16, got 'bf16'" in str(e.value)
    with pytest.raises(SystemExit):
        run(tmp_path, "int8", "--quantize=int8", base=tiny_dir)
    assert "quantize must be 'nf4'" in capsys.readouterr().err and not os.path.exists(tmp_path / "int8")


def test_missing_weights_say_how_to_get_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit):
        train.main(["config/persian_qa.py", f"--init_from={tmp_path / 'Llama-2-7b-chat-hf'}"])
    assert "python prepare.py --hub_id=meta-llama/Llama-2-7b-chat-hf" in capsys.readouterr().err


def test_lr_schedule_warmup_then_cosine():
    cfg = dict(train.settings, learning_rate=1.0, warmup_iters=10, min_lr_ratio=0.1, lr_decay_iters=0)
    assert train.get_lr(0, cfg, 110) == pytest.approx(0.1)
    assert train.get_lr(9, cfg, 110) == pytest.approx(1.0)
    assert train.get_lr(60, cfg, 110) == pytest.approx(0.55)   # halfway down the cosine: (1 + 0.1) / 2
    assert train.get_lr(110, cfg, 110) == pytest.approx(0.1)


def first_step_gradients(out):
    """The gradient of the first step, read back from the checkpoint: after one step AdamW's first moment is
    exactly (1 - beta1) * gradient (it starts at zero), so nothing but train.py itself has to run."""
    state = torch.load(os.path.join(out, checkpoint.STATE_FILE), weights_only=True)
    beta1 = state["config"]["beta1"]
    names = [n for n in state["trainable"]]  # the optimizer numbers parameters in this order
    return {n: state["optimizer"]["state"][i]["exp_avg"] / (1 - beta1) for i, n in enumerate(names)}, state


def test_ddp_two_processes_equal_one_process(tiny_dir, tmp_path):
    """2 processes x batch 2 (gloo, CPU) and 1 process x batch 4 see the same global batch: same gradient. The two
    processes share the evaluation (each reads half the questions): the same scores as one process alone."""
    common = ["config/quickstart.py", f"--init_from={tiny_dir}", "--max_seq_len=320", "--eval_generate=5",
              "--max_new_tokens=3", "--test_data=data/persian_qa_heldout.jsonl", "--test_limit=3",
              "--val_data=", "--dtype=float32",
              "--max_iters=1", "--eval_interval=1", "--lora_dropout=0.0", "--grad_clip=0.0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    one = subprocess.run([sys.executable, "train.py", *common, "--batch_size=4", f"--out_dir={tmp_path / 'one'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
                          "train.py", *common, "--batch_size=2", f"--out_dir={tmp_path / 'two'}"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-2000:]
    ga, sa = first_step_gradients(tmp_path / "one")
    gb, sb = first_step_gradients(tmp_path / "two")
    assert ga.keys() == gb.keys() and any(g.abs().max() > 0 for g in ga.values())
    # The two runs add the same per-token gradients in another order (two partial sums, then all_reduce), so they
    # agree to fp32 rounding: measured 6e-7 of the largest gradient entry. A wrong batch split (both ranks taking
    # the first half of the batch) is off by 1.1 times it. Bound: 1e-5 of the largest entry, per tensor.
    for k in ga:
        torch.testing.assert_close(gb[k], ga[k], atol=1e-5 * ga[k].abs().max().item(), rtol=0)
    (_, la), (_, lb) = sa["history"]["train"][0], sb["history"]["train"][0]
    assert la == pytest.approx(lb, rel=1e-6)  # the global loss, summed in another order too
    ma, mb = (json.load(open(tmp_path / run / "metrics.json")) for run in ("one", "two"))
    for when in ("before", "after", "test"):
        for k in ("exact_match", "f1", "answered"):
            assert ma[when][k] == mb[when][k], (when, k)
    assert ma["null_threshold"] == pytest.approx(mb["null_threshold"], abs=1e-4)
    pa, pb = ([json.loads(l) for l in open(tmp_path / run / "test_predictions.jsonl")] for run in ("one", "two"))
    assert [(p["id"], p["prediction"]) for p in pa] == [(p["id"], p["prediction"]) for p in pb]
    assert [p["null_diff"] for p in pb] == pytest.approx([p["null_diff"] for p in pa], abs=1e-4)  # gathered in order
    for (sa_, va), (sb_, vb) in zip(ma["val_loss"], mb["val_loss"]):
        assert sa_ == sb_ and va == pytest.approx(vb, rel=1e-5)  # per-token mean from two partial sums


@pytest.mark.slow
def test_real_steps_on_bundled_model_lower_the_loss(bundled_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = run(tmp_path, "real", "--max_iters=3", "--eval_interval=3", "--max_seq_len=288", "--val_fraction=0.05",
              base=bundled_dir)
    val = torch.load(os.path.join(out, checkpoint.STATE_FILE), weights_only=False)["history"]["val"]
    assert val[0][0] == 0 and val[-1][0] == 3
    assert val[-1][1] < val[0][1] - 0.1, val  # validation loss (unseen passages) clearly down after 3 steps
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["peak_memory_bytes"] > 0
    assert os.path.exists(os.path.join(out, "loss.png"))


def test_validation_chooses_the_threshold_and_the_test_set_is_answered_once(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    out = run(tmp_path, "t", "--max_iters=2", "--eval_generate=4", "--max_new_tokens=3", "--test_limit=3",
              "--test_data=data/persian_qa_heldout.jsonl", base=tiny_dir)
    printed = capsys.readouterr().out
    assert "before training (4 validation questions, abstaining above null_diff " in printed
    assert "after training (4 validation questions, abstaining above null_diff " in printed
    assert "held-out test: 3 questions, never trained on (always 'no answer' scores F1 " in printed
    assert "\n  base model  EM " in printed and "\n  fine-tuned  EM " in printed and "fine-tuned vs base: F1 " in printed
    assert printed.count("answering all: has-answer F1 ") == 3   # each model's line, and the comparison
    assert printed.count("\n  question   ") == 3 and printed.count("\n  base       ") == 3  # side by side
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["null_threshold"] == metrics["after"]["null_threshold"]   # chosen on validation, used on test
    assert metrics["base_test"]["null_threshold"] == metrics["before"]["null_threshold"]  # the base's own choice
    assert metrics["test"]["n"] == metrics["base_test"]["n"] == 3 and "invented" in metrics["test"]
    assert set(metrics["test"]["answering_all"]) == {"has_answer_f1", "answered", "invented"}
    assert metrics["test"]["answering_all"]["answered"] >= metrics["test"]["answered"]   # forcing can only add answers
    preds = [json.loads(line) for line in open(os.path.join(out, "test_predictions.jsonl"), encoding="utf-8")]
    assert len(preds) == 3 and all(p["prediction"] == "" for p in preds if p["null_diff"] > metrics["null_threshold"])
