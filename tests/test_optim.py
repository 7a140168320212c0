"""PagedAdamW against torch.optim.AdamW: same trajectory, interchangeable state_dicts, bounded GPU memory."""

import contextlib
import io

import pytest
import torch

from optim import PagedAdamW, make_pages

SHAPES = [(7,), (5, 3), (2, 3, 4), (1,), (33, 9)]


def make_params(device="cpu", dtype=torch.float32, shapes=SHAPES, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device, dtype)) for s in shapes]


def groups(params, frozen):
    """Two groups with different lr / weight decay; `frozen` sits in the optimizer but never gets a gradient."""
    return [{"params": params[:3] + [frozen], "lr": 1e-2, "weight_decay": 0.1},
            {"params": params[3:], "lr": 3e-3, "weight_decay": 0.0}]


def set_grads(params, step):
    g = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        # scales from 1e-6 (where eps matters as much as the gradient) to 1e2
        p.grad = (torch.randn(p.shape, generator=g) * 10.0 ** (2 * i - 6)).to(p.device, p.dtype)


def clone(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def saved(opt):
    """A state_dict as a checkpoint has it: through torch.save / torch.load, so nothing is shared."""
    f = io.BytesIO()
    torch.save(opt.state_dict(), f)
    f.seek(0)
    return torch.load(f, weights_only=True)


def assert_steps_equal(params, opt, resumed, resumed_opt, steps):
    """The original and the resumed optimizer take the same steps: parameters stay bit-identical."""
    for step in steps:
        set_grads(params, step)
        set_grads(resumed, step)
        opt.step()
        resumed_opt.step()
        for p, r in zip(params, resumed):
            assert torch.equal(p, r)


def test_matches_torch_adamw_over_50_steps():
    ours, ref = make_params(), make_params()
    frozen_ours, frozen_ref = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt = PagedAdamW(groups(ours, frozen_ours), betas=(0.8, 0.95), eps=1e-6)
    ref_opt = torch.optim.AdamW(groups(ref, frozen_ref), betas=(0.8, 0.95), eps=1e-6, foreach=False)
    start = [p.detach().clone() for p in ours]
    for step in range(50):
        set_grads(ours, step)
        set_grads(ref, step)
        opt.step()
        ref_opt.step()
        for p, r in zip(ours, ref):
            torch.testing.assert_close(p, r, rtol=0, atol=1e-6)
    for p, r in zip(ours, ref):
        s, rs = opt.state[p], ref_opt.state[r]
        assert s["step"].item() == 50
        torch.testing.assert_close(s["exp_avg"], rs["exp_avg"], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(s["exp_avg_sq"], rs["exp_avg_sq"], rtol=1e-6, atol=0)
    assert all((p - p0).abs().max() > 1e-3 for p, p0 in zip(ours, start))  # the test moved the weights
    assert torch.equal(frozen_ours, torch.ones(4)) and frozen_ours not in opt.state


def test_state_dict_round_trip_continues_exactly():
    params = make_params()
    opt = PagedAdamW(groups(params, torch.nn.Parameter(torch.ones(4))))
    for step in range(10):
        set_grads(params, step)
        opt.step()
    resumed = clone(params)
    resumed_opt = PagedAdamW(groups(resumed, torch.nn.Parameter(torch.ones(4))), lr=0.5, weight_decay=0.5)
    resumed_opt.load_state_dict(saved(opt))
    assert [g["lr"] for g in resumed_opt.param_groups] == [1e-2, 3e-3]  # hyperparameters come back too
    assert_steps_equal(params, opt, resumed, resumed_opt, range(10, 30))


@pytest.mark.parametrize("direction", ["torch_to_paged", "paged_to_torch"])
def test_state_dict_interchanges_with_torch_adamw(direction):
    def adamw(ps):
        return torch.optim.AdamW(groups(ps, torch.nn.Parameter(torch.ones(4))), foreach=False)

    def paged(ps):
        return PagedAdamW(groups(ps, torch.nn.Parameter(torch.ones(4))))

    first, second = (adamw, paged) if direction == "torch_to_paged" else (paged, adamw)
    params, other = make_params(), make_params()
    opt, other_opt = first(params), first(other)  # `opt` runs on; `other_opt` hands over after 10 steps
    for step in range(10):
        for ps, o in ((params, opt), (other, other_opt)):
            set_grads(ps, step)
            o.step()
    handed = second(other)
    handed.load_state_dict(saved(other_opt))
    for step in range(10, 30):
        for ps, o in ((params, opt), (other, handed)):
            set_grads(ps, step)
            o.step()
        for p, r in zip(params, other):
            torch.testing.assert_close(p, r, rtol=0, atol=1e-6)


def test_bf16_params_keep_fp32_states():
    """A bf16 weight is updated in fp32 and rounded back each step; the states stay fp32 throughout."""
    ours = make_params(dtype=torch.bfloat16)
    ref = [torch.nn.Parameter(p.detach().float()) for p in ours]  # fp32 twin, rounded to bf16 after each step
    opt, ref_opt = PagedAdamW(ours, lr=1e-2), torch.optim.AdamW(ref, lr=1e-2, foreach=False)
    for step in range(10):
        set_grads(ours, step)
        for p, r in zip(ours, ref):
            r.grad = p.grad.float()
        opt.step()
        ref_opt.step()
        for p, r in zip(ours, ref):
            r.data = r.data.bfloat16().float()
            assert p.dtype == torch.bfloat16 and torch.equal(p.float(), r)
    assert all(opt.state[p]["exp_avg"].dtype == torch.float32 for p in ours)


def test_pages_cover_every_element_once():
    params = make_params(shapes=[(3,), (4, 5), (2,), (0,), (11,)])
    pages = make_pages(params, page_size=8)
    assert all(sum(end - start for _, start, end, _ in page) <= 8 for page in pages)
    assert sum(end - start for page in pages for _, start, end, _ in page) == 3 + 20 + 2 + 11
    assert [(p.numel(), start, end, offset) for p, start, end, offset in pages[0]] == [(3, 0, 3, 0), (20, 0, 5, 3)]
    covered = {id(p): [] for p in params}
    for page in pages:
        offsets = [offset for _, _, _, offset in page]
        assert offsets == sorted(offsets) and offsets[0] == 0  # pieces packed from the page start
        for p, start, end, _ in page:
            covered[id(p)] += range(start, end)
    assert all(covered[id(p)] == list(range(p.numel())) for p in params)
    with pytest.raises(ValueError, match="contiguous"):
        make_pages([torch.nn.Parameter(torch.randn(4, 6).t())], page_size=8)


class FakeStream:
    """A stand-in for a CUDA stream on the CPU: work runs at once, so every wait is already satisfied."""

    def __init__(self, device=None):
        pass

    def wait_event(self, event):
        pass

    def wait_stream(self, stream):
        pass

    def synchronize(self):
        pass


class FakeEvent:
    def record(self, stream=None):
        pass


def test_paging_loop_on_cpu_matches_torch_adamw(monkeypatch):
    """Runs the paging loop itself (cutting, buffer slices, copies in and out) on CPU tensors."""
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    ours, ref = make_params(), make_params()
    frozen = torch.nn.Parameter(torch.ones(4))
    opt = PagedAdamW(groups(ours, frozen), page_size=10)  # pages split params and share them
    ref_opt = torch.optim.AdamW(groups(ref, torch.nn.Parameter(torch.ones(4))), foreach=False)
    for step in range(20):
        set_grads(ours, step)
        set_grads(ref, step)
        with torch.no_grad():
            for group in opt.param_groups:  # what step() does for GPU parameters
                opt._step_paged(opt._begin_step(group), group)
        ref_opt.step()
        for p, r in zip(ours, ref):
            torch.testing.assert_close(p, r, rtol=0, atol=1e-6)
    for p, r in zip(ours, ref):
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], ref_opt.state[r]["exp_avg_sq"], rtol=1e-6, atol=0)


def test_step_with_closure():
    params = make_params(shapes=[(3, 4)])
    ref = clone(params)
    opt = PagedAdamW(params, lr=0.1, weight_decay=0.0)
    ref_opt = torch.optim.AdamW(ref, lr=0.1, weight_decay=0.0, foreach=False)

    def closure(ps, o):  # recomputes loss and gradients, as step(closure) expects
        o.zero_grad()
        loss = (ps[0] ** 2).sum()
        loss.backward()
        return loss

    losses = []
    for _ in range(3):
        losses.append(opt.step(lambda: closure(params, opt)))
        assert torch.equal(losses[-1], ref_opt.step(lambda: closure(ref, ref_opt)))
        torch.testing.assert_close(params[0], ref[0], rtol=0, atol=1e-6)
    assert losses[2] < losses[0]  # the returned loss is the closure's, and training lowers it


def test_clear_errors():
    with pytest.raises(ValueError, match="betas"):
        PagedAdamW(make_params(), betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="page_size"):
        PagedAdamW(make_params(), page_size=0)
    big, small = make_params(shapes=[(4, 4)]), make_params(shapes=[(4,)])
    opt = PagedAdamW(big)
    set_grads(big, 0)
    opt.step()
    with pytest.raises(ValueError, match="other parameters"):
        PagedAdamW(small).load_state_dict(saved(opt))
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        PagedAdamW(emb.parameters()).step()


def work_in_flight(n):
    """Queue work on the default stream that is still running when step() begins: a spin of about 40 ms, then
    writes of garbage into two temporaries the size of step()'s page buffers, freed before step() allocates its
    buffers (likely the same memory: the allocator hands a freed block back to the same stream at once). A copy
    stream that did not wait for the default stream would load the states into that memory before the queued
    writes land on it, and the update would read garbage."""
    scratch = [torch.empty(2, n, device="cuda") for _ in range(2)]   # the shapes of PagedAdamW's 2 buffers
    torch.cuda._sleep(2**26)                                         # GPU clock cycles
    for t in scratch:
        t.fill_(1e30)


def check_paging_matches_adamw_and_bounds_memory(device, shapes, page_size):
    """The GPU test, runnable on the CPU too: there the paging loop runs on CPU tensors (fake streams, set up by
    the caller), nothing is in flight and no GPU memory is counted; on a GPU step() itself runs, with work still
    queued on the default stream, and its extra memory is bounded."""
    on_gpu = device.startswith("cuda")
    ours, ref = make_params(device, shapes=shapes), make_params(device, shapes=shapes)
    opt = PagedAdamW(ours, lr=1e-3, weight_decay=0.1, page_size=page_size)
    ref_opt = torch.optim.AdamW(ref, lr=1e-3, weight_decay=0.1, foreach=False)
    state_bytes = 8 * sum(p.numel() for p in ours)
    n = min(page_size, sum(p.numel() for p in ours))                 # the elements of one page buffer

    @torch.no_grad()
    def paged_step():  # step() pages only GPU parameters: on the CPU call its paging loop directly
        for group in opt.param_groups:
            opt._step_paged(opt._begin_step(group), group)

    for step in range(5):
        set_grads(ours, step)
        set_grads(ref, step)
        if on_gpu:
            before = torch.cuda.memory_allocated()                   # the allocator's count: no synchronize
            torch.cuda.reset_peak_memory_stats()
            work_in_flight(n)                                        # its temporaries are freed again here
            opt.step()
            extra = torch.cuda.max_memory_allocated() - before       # the temporaries (16 n bytes) are less
            assert extra <= 20 * page_size + 2**21, (extra, state_bytes)  # the page bound + allocator rounding
            assert torch.cuda.memory_allocated() == before  # nothing stays on the GPU between steps
        else:
            paged_step()
        ref_opt.step()
        for p, r in zip(ours, ref):
            torch.testing.assert_close(p, r, rtol=0, atol=1e-6)
    for p, r in zip(ours, ref):
        s = opt.state[p]
        assert s["exp_avg"].device.type == "cpu" and s["exp_avg"].is_pinned() == s["exp_avg_sq"].is_pinned() == on_gpu
        torch.testing.assert_close(s["exp_avg"], ref_opt.state[r]["exp_avg"].cpu(), rtol=1e-5, atol=1e-9)
    resumed = clone(ours)
    resumed_opt = PagedAdamW(resumed, page_size=page_size)
    resumed_opt.load_state_dict(saved(opt))
    assert all(resumed_opt.state[p]["exp_avg"].is_pinned() == on_gpu for p in resumed)
    assert_steps_equal(ours, opt, resumed, resumed_opt, range(5, 8))


def test_gpu_paging_check_runs_on_cpu(monkeypatch):
    """The lines of the GPU test below, on the CPU: a typo in them shows here, not first on a GPU."""
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    check_paging_matches_adamw_and_bounds_memory("cpu", [(64, 32), (100, 3), (17,), (32, 16)], page_size=500)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_paging_matches_adamw_and_bounds_memory():
    # about 6.3M weights, 50 MB of states; page bound: 20 bytes x 256Ki = 5 MiB
    check_paging_matches_adamw_and_bounds_memory(
        "cuda", [(1024, 1024), (4096, 1024), (1000, 3), (17,), (2048, 512)], page_size=2**18)
