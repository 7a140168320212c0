"""memory.py's CPU allocator setting: the 1 MiB mmap threshold by default, and a user's own threshold kept."""
import ctypes

import memory


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
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
