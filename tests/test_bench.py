"""The bench/ scripts run end to end (--smoke=True) and print parseable summary lines. No timing is asserted: speed is
what the scripts measure, not what tests check. The model-based scripts run on a tiny random Llama checkpoint
written by transformers, so each comparison takes seconds; the first-step losses and the greedy tokens of the two
sides must still agree, which checks that the benchmarks compare like with like."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUMMARY = re.compile(r"^(\w+): ours ([0-9.]+) ([^,]+), reference ([0-9.]+) ([^,]+), ratio ([0-9.]+)$")

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 2-layer Llama with grouped-query attention and tied embeddings, in Hugging Face layout."""
    import torch
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("tiny_llama"))
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def run_bench(script, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny work: more threads only add scheduling noise
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc


def summaries(stdout):
    """{name: (ours, ours_unit, reference, reference_unit, ratio)} from the summary lines."""
    out = {}
    for line in stdout.splitlines():
        m = SUMMARY.match(line)
        if m:
            name, ours, u1, ref, u2, ratio = m.groups()
            out[name] = (float(ours), u1, float(ref), u2, float(ratio))
    return out


def check_line(values, unit):
    ours, u1, ref, u2, ratio = values
    assert u1 == u2 == unit
    assert ours > 0 and ref > 0
    assert ratio == pytest.approx(ours / ref, rel=0.02, abs=0.01)  # printed rounded


def run_smoke(script, *args, units):
    """Run a bench script at smoke size; it must succeed and print exactly these summary lines ({name: unit}),
    each one consistent. Returns what it printed."""
    proc = run_bench(script, "--smoke=True", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = summaries(proc.stdout)
    assert set(lines) == set(units)
    for name, unit in units.items():
        check_line(lines[name], unit)
    return proc.stdout


@pytest.mark.parametrize("quantize, name, greedy", [
    ("none", "generate_tokens_per_s", "greedy tokens: identical"),  # same model, same greedy choices on both sides
    ("nf4", "generate_nf4_tokens_per_s", "greedy tokens: "),  # the two quantize a little differently: may part
])
def test_generate_smoke(tiny_checkpoint, quantize, name, greedy):
    out = run_smoke("generate.py", f"--init_from={tiny_checkpoint}", f"--quantize={quantize}", units={name: "tok/s"})
    assert f"linear layers {quantize}" in out and greedy in out


def test_reading_smoke(tiny_dir):
    """bench/reading.py: evaluate.py's reading with and without its levers; sharing the passage changes no answer."""
    out = run_smoke("reading.py", f"--init_from={tiny_dir}", units={"reading_seconds_per_question": "s"})
    m = re.search(r"(\d+)/(\d+) answers identical, null_diff within ([0-9.e+-]+)", out)
    assert m and m.group(1) == m.group(2) == "6" and float(m.group(3)) < 1e-3, out


@pytest.mark.parametrize("decode, units", [
    (False, {"dequant_torch_vs_bnb": "GB/s out", "dequant_torch_vs_copy": "GB/s moved"}),
    (True, {"decode_twin_vs_dequant_matmul": "tok/s"}),
])
def test_dequant_smoke(decode, units):
    """Both sides compute the same thing: the torch twin dequantizes to bitsandbytes' output bit for bit; the fused
    path's twin and dequantize-then-matmul agree to fp32 rounding (they sum in other orders)."""
    out = run_smoke("dequant.py", "--device=cpu", f"--decode={decode}", units=units)
    assert "warning" not in out
    if decode:
        assert float(re.search(r"largest difference ([0-9.e+-]+) of max", out).group(1)) < 1e-5
    else:
        assert "outputs identical" in out


def test_train_smoke(tiny_checkpoint):
    # answer-only loss: the harder case to get equal on both sides (the mask must cover the same positions)
    proc = run_bench("train.py", "--smoke=True", f"--init_from={tiny_checkpoint}", "--loss=answer")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "warning" not in proc.stdout  # same number of trainable LoRA parameters on both sides
    lines = summaries(proc.stdout)
    names = {f"{mode}_{what}" for mode in ("lora", "qlora")
             for what in ("first_step_loss", "train_tokens_per_s", "train_peak_mem", "load_peak_mem")}
    assert set(lines) == names
    for mode in ("lora", "qlora"):
        ours, _, ref, unit, _ = lines[f"{mode}_first_step_loss"]
        assert unit == "nats"
        # LoRA's B starts at zero: both are the base model's loss. A random tiny model over 256 tokens sits near
        # ln(256) = 5.5; QLoRA's two sides quantize alike but round bitsandbytes' absmax search differently.
        assert 4.0 < ours < 7.0
        assert ours == pytest.approx(ref, abs=1e-4 if mode == "lora" else 2e-3)
        check_line(lines[f"{mode}_train_tokens_per_s"], "tok/s")
        check_line(lines[f"{mode}_train_peak_mem"], "MiB")
        # the baseline is taken after all imports: loading a 0.1 MiB model costs a few MiB, not the ~300 MiB
        # that importing transformers + PEFT (or torch's compiler stack) would add if it were counted
        ours, unit, ref, _, _ = lines[f"{mode}_load_peak_mem"]
        assert unit == "MiB" and ours < 50 and ref < 50


def test_products_share_counts_matrix_products_only():
    """bench/common.py: products_share adds up the time of matrix products and attention, and nothing else."""
    import torch
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from common import products_share
    a = torch.randn(256, 256)
    products, total = products_share(lambda: [a.exp() + 1.0 for _ in range(20)])   # no product at all
    assert products == 0 and total > 0
    products, total = products_share(lambda: [(a @ a).exp() for _ in range(20)])    # products and more
    assert 0 < products < total


@pytest.mark.parametrize("script, args, name", [
    ("train.py", ("--mode=lora", "--loss=answer"), "lora_products_floor"),
    ("generate.py", (), "profiled"),
])
def test_profile_gives_the_reachable_ratio(tiny_checkpoint, script, args, name):
    """--profile=True: the most reachable ratio is the reference's time over our products' time, so it is at least
    the ratio ours reached (our step holds those products and more)."""
    proc = run_bench(script, "--smoke=True", "--device=cpu", "--profile=True", f"--init_from={tiny_checkpoint}", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = next(l for l in proc.stdout.splitlines() if l.startswith(name + ":"))
    reachable, reached = map(float, re.search(r"more than ([0-9.]+)x faster here; ours is ([0-9.]+)x", line).groups())
    assert reachable >= reached > 0


def test_missing_checkpoint_says_what_to_do(tmp_path):
    proc = run_bench("generate.py", "--smoke=True", f"--init_from={tmp_path / 'nowhere'}")
    assert proc.returncode != 0
    assert "python prepare.py" in proc.stderr


@pytest.mark.parametrize("script, flag, key", [("generate.py", "--prompt-tokens=8", "prompt_tokens"),
                                               ("train.py", "--seq-len=64", "seq_len")])
def test_a_misspelt_key_names_the_one_meant(script, flag, key):
    """Every bench script reads --key=value through configurator.py: a key it does not have (here the old hyphenated
    spelling) stops it at once, with the closest key in the error."""
    proc = run_bench(script, flag)
    assert proc.returncode != 0 and f"did you mean {key}" in proc.stderr, proc.stderr


def test_gpu_check_runs_the_7b_recipe_at_tiny_size():
    """bench/gpu_check.py: the same loading path, step and decoding as on a GPU, on a tiny model on the CPU."""
    proc = run_bench("gpu_check.py", "--shape=tiny", "--device=cpu", "--seq_len=64", "--new_tokens=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "LoRA r=32 on all-linear, dropout 0.1, checkpointing True, paged_adamw" in out  # config/persian_qa.py's
    losses = [float(m) for m in re.findall(r"^step \d: loss ([0-9.]+)", out, re.M)]
    assert len(losses) == 3 and all(5.0 < l < 6.0 for l in losses)   # random weights: about ln(256) = 5.55
    assert "4 micro-batches per optimizer step" in out
    speed = re.search(r"^speed: ([0-9.]+) s per micro-batch \(4 x 64 tokens, forward \+ backward\), ([0-9.]+) s per "
                      r"optimizer step \(4 micro-batches \+ update\), \d+ tokens/s$", out, re.M)
    # a step's time holds its 4 micro-batches' (3 significant digits printed: 0.5% rounding at most)
    assert speed and float(speed.group(2)) >= 4 * float(speed.group(1)) * 0.99
    # evaluation's KV cache, counted from the tensors allocated: 2 (k, v) x 2 layers x 4 prompts x (64 + 48)
    # positions x 2 KV heads x head_dim 16 x 4 bytes (fp32 on a CPU) = 229,376 bytes
    assert re.search(r"^evaluation memory: KV cache 0\.00 GiB \(0\.219 MiB\) for 4 x 112 positions", out, re.M)
    for batch in (1, 4):  # batch 1 and the evaluation batch (config/persian_qa.py's batch_size)
        assert re.search(rf"^decoding batch {batch}: [0-9.]+ ms/token \(4 tokens; dequantize-then-matmul", out, re.M)


def test_dequant_decode_sweep_smoke():
    proc = run_bench("dequant.py", "--decode_sweep=True", "--smoke=True", "--device=cpu")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = re.findall(r"^\s+(\d+) x (\d+)\s+(\d) +([0-9.]+) +([0-9.]+) +([0-9.]+)x$", proc.stdout, re.M)
    assert [(int(o), int(i), int(m)) for o, i, m, *_ in rows] == [
        (o, i, m) for o, i in ((96, 64), (64, 96), (64, 64)) for m in (1, 2, 4, 8)]   # smoke: dim 64, hidden 96
    for *_, fused, plain, speedup in rows:
        assert float(speedup) == pytest.approx(float(plain) / float(fused), rel=0.05, abs=0.01)
    assert re.search(r"^crossover: fused faster on every shape up to [0-8] rows", proc.stdout, re.M)


def test_gpu_all_runs_its_cpu_steps(tiny_dir, tmp_path):
    """bench/gpu_all.py, the one command for a GPU owner, with every step it has run small on the CPU: the cuda
    tests collected, gpu_check at tiny shapes, the benchmarks at smoke size, a 4-bit run of a tiny model stopped,
    resumed and evaluated, and torchrun with one (gloo) process."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    table = tmp_path / "table.txt"
    proc = subprocess.run([sys.executable, "bench/gpu_all.py", "--device=cpu", "--shape=tiny",
                           f"--init_from={tiny_dir}", f"--out_dir={tmp_path}", f"--out={table}",
                           f"--master_port={port}"], cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    text = table.read_text()
    status = dict(re.findall(r"^(\S+(?: \S+)?)\s{2,}(ok|FAILED \(exit \d+\)|TIMEOUT \(\d+ s\))\s", text, re.M))
    assert status == {name: "ok" for name in ("cuda tests", "gpu_check", "dequant 11008x4096", "dequant 32000x4096",
                                              "decode sweep", "train", "resume", "evaluate", "torchrun")}, text
    assert re.search(r"5/\d+ tests collected", text)                   # the five tests marked cuda
    assert "s per optimizer step (4 micro-batches + update)" in text and "evaluation memory: KV cache" in text
    assert "crossover: fused faster" in text and "step 4: train loss" in text and "EM " in text
    import torch
    assert torch.load(tmp_path / "qlora" / "train_state.pt", weights_only=True)["pos"]["iter"] == 4  # resumed to 4


@pytest.mark.parametrize("folder, kind", [(False, "q8_0"), (True, "bf16")])
def test_export_smoke(tmp_path, folder, kind):
    """bench/export.py: the streamed export and the whole-model path write the same bytes; the scratch folder goes."""
    out = run_smoke("export.py", f"--out_dir={tmp_path / 'scratch'}", f"--folder={folder}", f"--type={kind}",
                    units={"export_peak_rss": "MiB"})
    assert "outputs identical: True" in out and "streamed (python export.py)" in out
    assert not os.path.exists(tmp_path / "scratch")
