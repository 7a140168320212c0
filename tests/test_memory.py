"""memory.py's CPU allocator settings: the 1 MiB mmap threshold by default, a user's own threshold kept, and the
heap trimmed after every training step."""
import ctypes

import memory


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("trim", pad))
        return 1


def test_mmap_threshold_is_fixed_at_1_mib_unless_the_user_set_one(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    memory.give_back_freed_memory()
    assert libc.calls == [(-3, 1 << 20)]  # M_MMAP_THRESHOLD, 1 MiB
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4194304")  # glibc read it at start: train.py must not undo it
    memory.give_back_freed_memory()
    assert libc.calls == [(-3, 1 << 20)]


def test_the_heap_is_trimmed_after_every_cpu_step(monkeypatch, tmp_path, tiny_dir):
    """train.py calls trim_freed_memory once per optimizer step on a CPU (malloc_trim(0): every free page back), and
    a system without glibc trims nothing and does not fail."""
    import os
    import train
    libc = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    memory.trim_freed_memory()
    assert libc.calls == [("trim", 0)]
    trims = []
    monkeypatch.setattr(train, "trim_freed_memory", lambda: trims.append(1))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.chdir(root)
    train.main(["config/quickstart.py", "--max_iters=3", "--eval_interval=3", "--eval_generate=0", "--test_data=",
                "--val_limit=2", "--batch_size=2", f"--init_from={tiny_dir}", f"--out_dir={tmp_path}"])
    assert len(trims) == 3

    def no_glibc(name):
        raise OSError("no libc.so.6")
    monkeypatch.setattr(ctypes, "CDLL", no_glibc)
    memory.trim_freed_memory()
