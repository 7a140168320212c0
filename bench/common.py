"""
What the three benchmarks share: timing, memory readings, the worker subprocess, and the summary line.

A fair speed comparison runs both systems in ONE session, alternating (ours, reference, ours, reference, ...), and
reports medians: a background process that slows the machine for a while then slows both sides, not just one.
Every comparison ends in one line a script (or a person) can parse:

    name: ours X unit, reference Y unit, ratio Z

ratio is always ours / reference. For a speed that means higher is better; for memory, lower is better.

Every bench script takes --key=value through configurator.py (python bench/generate.py --smoke=True), with its
settings block at the top of the script; SHARED_SETTINGS below are the ones three of them share.
"""

import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root (model.py, quant.py, ...)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from convert import BUNDLED_DIR  # noqa: E402
DEFAULT_CHECKPOINT = os.path.join(ROOT, BUNDLED_DIR)  # the bundled SmolLM2, from wherever a bench is started
RESULT_TAG = "BENCH_RESULT "  # a worker's last stdout line: this tag, then its measurements as JSON

# The settings dequant.py, generate.py and train.py share: each merges them into its own settings block.
SHARED_SETTINGS = dict(
    device="cuda" if torch.cuda.is_available() else "cpu",  # as the commands choose it; or "cpu", "cuda"
    dtype="",       # "": float32 on a CPU, bfloat16 on a GPU, on every CPU alike, so that two machines' numbers
                    # compare (dtype="auto" in the commands picks bfloat16 on a CPU that computes it natively);
                    # or float32, bfloat16, float16
    threads=0,      # torch CPU threads (0: torch's default; on a busy machine 1 gives steadier numbers)
    seed=0,         # of the random weights, tokens and prompts
    smoke=False,    # a tiny run: checks that everything works, times nothing useful
)


def summary(name, ours, ref, unit, digits=1):
    """Print the one parseable line of a comparison."""
    ratio = ours / ref if ref else float("nan")
    print(f"{name}: ours {ours:.{digits}f} {unit}, reference {ref:.{digits}f} {unit}, ratio {ratio:.{max(digits, 2)}f}",
          flush=True)


def median(xs):
    return statistics.median(xs)


def interleaved_seconds(systems, device, iters, reps):
    """{name: median seconds per call} for in-process comparisons: one warm-up call each (Triton compiles, caches
    fill), then `reps` rounds, each timing `iters` calls of every system in turn."""
    seconds = {name: [] for name in systems}
    for fn in systems.values():
        fn()
    for _ in range(reps):
        for name, fn in systems.items():
            with Timer(device) as t:
                for _ in range(iters):
                    fn()
            seconds[name].append(t.seconds / iters)
    return {name: median(s) for name, s in seconds.items()}


def kernel_seconds(systems, device, iters, reps):
    """{name: seconds per call}. On a GPU, triton.testing.do_bench: each call timed by CUDA events (no Python
    launch overhead in the number, no host clock) with the L2 cache emptied before it (a 256 MB write), so every
    call reads its inputs from memory as it would inside a model, where other layers' weights evict them; the
    median. On a CPU, interleaved_seconds."""
    if not str(device).startswith("cuda"):
        return interleaved_seconds(systems, device, iters, reps)
    from triton.testing import do_bench
    return {name: do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3 for name, fn in systems.items()}


def timing_note(device):
    if str(device).startswith("cuda"):
        return "CUDA events, L2 emptied before each call (triton.testing.do_bench), median"
    return "wall clock, interleaved rounds, median"


def pick_device(name):
    """The device setting -> "cpu" or "cuda"."""
    check_choice("device", name, ("cpu", "cuda"))
    if name == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device=cuda but torch sees no CUDA GPU; use --device=cpu")
    return name


def pick_dtype(name, device):
    """The dtype setting -> a torch dtype; "": bfloat16 on a GPU, float32 on a CPU (SHARED_SETTINGS)."""
    from memory import torch_dtype
    if name == "":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return torch_dtype(name)


def check_choice(key, value, choices):
    """A setting that must be one of a few words: say which, in one line, instead of failing later."""
    if value not in choices:
        sys.exit(f"error: {key} must be one of {', '.join(choices)}, got {value!r}")


def sync(device):
    """Wait for queued GPU work, so a timer measures the work and not just its launch."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def set_threads(n):
    """Pin the number of CPU threads torch uses. On a busy machine 1 thread is often steadier than 2: a parallel
    region waits for its slowest thread, and a thread descheduled by another process stalls all of them."""
    if n:
        torch.set_num_threads(n)


def machine_note():
    """The state of the machine, for the header: other processes change every number a benchmark prints."""
    cpus, load = os.cpu_count(), os.getloadavg()[0]
    note = f"{cpus} CPUs, load average {load:.1f}, {torch.get_num_threads()} torch threads"
    if load > 0.75 * cpus and torch.get_num_threads() > 1:
        note += " (busy machine: --threads=1 gives steadier numbers)"
    return note


def check_checkpoint(path):
    if not os.path.exists(os.path.join(path, "config.json")):
        sys.exit(f"error: no checkpoint at {path}; run `python prepare.py` first (it converts the bundled model)")


# --------------------------------------------------------------------------------------------------------------
# CPU memory. ru_maxrss-style peaks cover the whole life of a process, so each system is measured in its own fresh
# process. Linux also lets a process reset its own peak ("5" into /proc/self/clear_refs), which splits the peak of
# loading from the peak of training.

def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_mib():
    """Resident memory now, in MiB."""
    return _status_kib("VmRSS") / 1024


def peak_rss_mib():
    """Highest resident memory of this process so far (or since reset_peak_rss), in MiB."""
    return _status_kib("VmHWM") / 1024


def reset_peak_rss():
    """Make VmHWM start again from the current RSS. Returns False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# The operations that do the arithmetic itself: matrix products and attention. Any implementation of the same
# model, batch and loss must run them; everything else (norms, rotations, additions, copies, the optimizer, the
# framework's own bookkeeping) is what one implementation can do with less time than another.
PRODUCTS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::mv", "aten::addmv",
            "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def check_profile(cfg):
    """profile=True reads torch.profiler's CPU times, which say nothing of work queued on a GPU."""
    if cfg["profile"] and cfg["device"] != "cpu":
        sys.exit("error: profile=True measures CPU operations; on a GPU use a CUDA profiler (nsys) instead")


def products_share(fn):
    """Run fn() once under torch.profiler (CPU only) -> (seconds in PRODUCTS, seconds in all operations), each an
    operation's own time without what it calls, so nothing is counted twice. The profiler slows the small
    operations down, not the large products: use the first number, not the second, beside an unprofiled time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    products = sum(e.self_cpu_time_total for e in events if e.key in PRODUCTS) / 1e6
    return products, sum(e.self_cpu_time_total for e in events) / 1e6


def run_worker(script, args, env=None):
    """Run `python script args...` in a fresh process; return the JSON dict on its BENCH_RESULT line."""
    cmd = [sys.executable, script] + [str(a) for a in args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    lines = [l for l in proc.stdout.splitlines() if l.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        sys.exit(f"error: worker failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return json.loads(lines[-1][len(RESULT_TAG):])


def report_result(result):
    """A worker's last act: hand its measurements to the parent process."""
    print(RESULT_TAG + json.dumps(result), flush=True)


class Timer:
    """Wall-clock seconds of a block, with the device synchronized at both ends."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        sync(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0
