"""
Everything a GPU owner can check in one command, ending in a table that is also written to a file. At most 8
minutes on one GPU: every step has its own time limit and the limits add up to 480 s (plus, once, converting the
bundled model if checkpoints/ lacks it: python prepare.py).

    python bench/gpu_all.py                       # on a CUDA GPU
    python bench/gpu_all.py --device=cpu --shape=tiny --init_from=DIR   # the same steps, small, on a CPU (the tests)

The settings, each with what it means, are the block at the top of the code.

Steps, each a subprocess (a crash or a hang in one does not stop the others):
  cuda tests     python -m pytest -m cuda: the compiled kernels at 7B sizes, paged AdamW with work in flight,
                 QLoRA steps in bf16 (on a CPU: only collected, to show the marker selects them)
  gpu_check      bench/gpu_check.py at Llama 2 7B's shapes: memory, seconds per micro-batch and per optimizer step,
                 evaluation memory, decoding at batch 1 and at the evaluation batch
  dequant        bench/dequant.py at 11008 x 4096 and at 32000 x 4096 (embedding-sized): dequantization timed with
                 CUDA events and an emptied L2, against a copy of as many bytes and against bitsandbytes
  decode sweep   bench/dequant.py --decode_sweep=True: fused 4-bit product vs dequantize-then-matmul at 1..8 rows, and
                 the row count where dequantize-then-matmul starts to win (kernels.MATVEC_MAX_ROWS is an estimate)
  train          a short QLoRA run of the bundled SmolLM2 (nf4 base, bf16 on a GPU), stopped halfway,
  resume         continued with --init_from=resume,
  evaluate       and scored by python evaluate.py with its adapter
  torchrun       the same training under torchrun with one process (NCCL on a GPU, gloo on a CPU)
The table holds each step's status, seconds and the lines that carry its numbers; every step's whole output is
in <out_dir>/<step>.log.
"""

import os
import subprocess
import sys
import time

# -- settings (defaults; override with --key=value or a config file, see configurator.py) -------------------------
device = "cuda"              # "cpu" runs every step small (with shape="tiny"): what the tests do
shape = "7b"                 # bench/gpu_check.py's shape: "7b" on a GPU, "tiny" on a CPU
init_from = "checkpoints/SmolLM2-135M-Instruct"  # the model of the short QLoRA run (converted first if missing)
out_dir = "out/gpu_all"      # every step's log, the runs' folders and the table
out = ""                     # the table's file ("" -> <out_dir>/table.txt)
master_port = 29531          # torchrun's rendezvous port
# -------------------------------------------------------------------------------------------------------------------
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from configurator import configure  # noqa: E402


def steps(cfg):
    """(name, command, time limit in seconds, prefixes of the output lines that go into the table)."""
    device, init_from, out = cfg["device"], cfg["init_from"], cfg["out_dir"]
    gpu = device.startswith("cuda")
    run_dir = os.path.join(out, "qlora")
    # the quickstart's data, shortened: seconds of training, a handful of validation and test questions
    n = 4 if gpu else 2  # validation and test questions: on a CPU (the tests) fewer, for time
    train_args = ["config/quickstart.py", f"--init_from={init_from}", f"--out_dir={run_dir}", f"--device={device}",
                  "--quantize=nf4", f"--dtype={'bfloat16' if gpu else 'float32'}", "--batch_size=4",
                  "--max_seq_len=320", f"--val_limit={n}", f"--eval_generate={n}", f"--test_limit={n}",
                  f"--max_new_tokens={2 * n}", "--eval_interval=2", "--warmup_iters=1"]
    tiny = [] if gpu else ["--smoke=True", "--device=cpu"]
    return [
        ("cuda tests", [PY, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
         + ([] if gpu else ["--collect-only"]),
         120, (" passed", " failed", " error", " skipped", " collected", "no tests ran")),
        ("gpu_check", [PY, "bench/gpu_check.py", f"--shape={cfg['shape']}", f"--device={device}"]
         + ([] if gpu else ["--seq_len=64", "--new_tokens=4", "--steps=2"]),
         120, ("loaded", "training:", "speed:", "evaluation memory:", "decoding")),
        ("dequant 11008x4096", [PY, "bench/dequant.py", "--rows=11008", "--cols=4096"] + tiny, 25, ("dequant_",)),
        ("dequant 32000x4096", [PY, "bench/dequant.py", "--rows=32000", "--cols=4096"] + tiny, 25, ("dequant_",)),
        ("decode sweep", [PY, "bench/dequant.py", "--decode_sweep=True"] + tiny, 40, ("crossover:",)),
        ("train", [PY, "train.py", *train_args, "--max_iters=2", "--lr_decay_iters=4"], 45,
         ("step 2:", "peak memory:")),
        ("resume", [PY, "train.py", f"--out_dir={run_dir}", "--init_from=resume", "--max_iters=4"], 30,
         ("step 4:", "held-out test", "peak memory:")),
        ("evaluate", [PY, "evaluate.py", f"--adapter={run_dir}", "--quantize=nf4", f"--device={device}",
                      f"--test_limit={2 * n}", f"--max_new_tokens={2 * n}", f"--out_dir={os.path.join(out, 'eval')}"],
         45, ("EM ",)),
        ("torchrun", [PY, "-m", "torch.distributed.run", "--nproc_per_node=1", f"--master_port={cfg['master_port']}",
                      "train.py", *train_args, f"--out_dir={os.path.join(out, 'torchrun')}", "--max_iters=2",
                      "--eval_generate=0", "--test_data="], 30, ("step 2:", "peak memory:")),
    ]


def run_step(name, cmd, limit, keep, out_dir):
    log = os.path.join(out_dir, name.replace(" ", "_") + ".log")
    t = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        status, text = ("ok" if p.returncode == 0 else f"FAILED (exit {p.returncode})"), p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        def txt(b):
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        status, text = f"TIMEOUT ({limit} s)", txt(e.stdout) + txt(e.stderr)
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n\n" + text)
    lines = [l.strip() for l in text.splitlines() if any(k in l for k in keep)]
    if status != "ok":  # the end of the output says why
        lines += [l.strip() for l in text.strip().splitlines()[-3:]]
    return status, time.time() - t, lines


def main(argv=None):
    cfg = configure(settings, argv)
    out_dir = cfg["out_dir"]
    os.makedirs(out_dir, exist_ok=True)
    if cfg["device"].startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA GPU visible; for the CPU steps: --device=cpu --shape=tiny")
        gpu = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}"
    else:
        gpu = "CPU only: the GPU numbers are not measured here"
    if not os.path.isdir(os.path.join(ROOT, cfg["init_from"])) and not os.path.isdir(cfg["init_from"]):
        subprocess.run([PY, "prepare.py"], cwd=ROOT, check=True)  # converts the bundled SmolLM2 once
    rows = []
    for name, cmd, limit, keep in steps(cfg):
        print(f"== {name} (at most {limit} s): {' '.join(cmd[1:])}", flush=True)
        status, seconds, lines = run_step(name, cmd, limit, keep, out_dir)
        print(f"   {status}, {seconds:.0f} s", flush=True)
        rows.append((name, status, seconds, lines))
    table = [f"bench/gpu_all.py on {gpu}", f"{'step':20s} {'status':22s} {'seconds':>7s}  result"]
    for name, status, seconds, lines in rows:
        table.append(f"{name:20s} {status:22s} {seconds:7.0f}  {lines[0] if lines else ''}")
        table += [f"{'':52s}{l}" for l in lines[1:]]
    table.append(f"total {sum(r[2] for r in rows):.0f} s; logs in {out_dir}/")
    text = "\n".join(table) + "\n"
    print("\n" + text)
    path = cfg["out"] or os.path.join(out_dir, "table.txt")
    with open(path, "w") as f:
        f.write(text)
    print(f"table written to {path}")
    return 0 if all(r[1] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
