"""
Paged AdamW: the optimizer states live in CPU memory and visit the GPU one page at a time.

AdamW keeps two fp32 numbers per trainable weight: a running mean of the gradient (exp_avg) and a
running mean of its square (exp_avg_sq). That is 8 bytes per weight, twice what the fp32 weights
themselves take, and 16 times a 4-bit base weight. QLoRA's third idea is to take these states off the
GPU: they sit in CPU memory, and at each step they are brought over, used, and sent back. bitsandbytes
does this with CUDA unified memory, where the driver moves pages on demand; here we do it by hand so
every copy is visible:

    for each page (a run of at most `page_size` state elements, cut across the parameters):
        copy its exp_avg / exp_avg_sq from pinned CPU memory into a GPU buffer   (side stream)
        apply the AdamW update to the parameters in that page                   (main stream)
        copy the two states back to CPU memory                                  (side stream)

Two GPU buffers take turns (double buffering): while the main stream updates page k from one buffer,
the side stream sends page k-1 home and brings page k+1 into the other, so the copies hide behind the
arithmetic. CUDA events tell each stream when it may go on. The CPU states are pinned (page-locked)
memory, which is what lets those copies run asynchronously.

Memory bound. During step() the extra GPU memory is the two buffers, each holding both states of one
page (2 x 2 x 4 bytes x page_size), plus one page-sized fp32 temporary of the update:
20 x page_size bytes (28 x page_size for bf16/fp16 parameters, whose update runs on fp32 copies).
With the default page_size of 2**22 elements that is 80 MiB, however many weights are trained; unpaged
AdamW would hold 8 bytes per trainable weight on the GPU all the time (1.3 GB for 160M LoRA weights).
The cost is PCIe traffic: 16 bytes per trainable weight per step, mostly hidden behind the update.

The math is exactly torch.optim.AdamW (decoupled weight decay, bias corrections, eps added after the
square root), and the state_dict has the same shape, so checkpoints move between the two optimizers.
Parameters on the CPU get the same update in place, without paging.
"""

import torch


def adamw_(p, grad, exp_avg, exp_avg_sq, step, group):
    """One AdamW update, in place, of p and its two states (whole tensors or matching page slices)."""
    lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    p32, g = p.float(), grad.float()  # the math runs in fp32; .float() is p itself for fp32 params
    p32.mul_(1 - lr * wd)  # decoupled weight decay: shrink the weight, not the gradient
    exp_avg.lerp_(g, 1 - beta1)  # m = beta1 * m + (1 - beta1) * g
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = beta2 * v + (1 - beta2) * g^2
    bias_correction1 = 1 - beta1**step  # m and v start at 0: undo their pull towards 0
    bias_correction2 = 1 - beta2**step
    denom = exp_avg_sq.sqrt().div_(bias_correction2**0.5).add_(eps)  # the one page-sized temporary
    p32.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)  # p -= lr * m_hat / (sqrt(v_hat) + eps)
    if p32 is not p:
        p.copy_(p32)  # round back into the bf16/fp16 parameter


def make_pages(params, page_size):
    """Cut the flattened parameters into pages of at most page_size elements.

    A page is a list of pieces (p, start, end, offset): elements start:end of p.view(-1) sit at
    offset:offset + end - start of the page. Small parameters share a page; a big one spans several.
    """
    pages, page, used = [], [], 0
    for p in params:
        if not p.is_contiguous():
            raise ValueError(f"PagedAdamW pages flat views of GPU parameters; make the parameter of shape "
                             f"{tuple(p.shape)} contiguous (p.data = p.data.contiguous()) before training")
        start = 0
        while start < p.numel():
            end = min(p.numel(), start + page_size - used)
            page.append((p, start, end, used))
            used, start = used + end - start, end
            if used == page_size:  # page full: start the next one
                pages.append(page)
                page, used = [], 0
    if page:
        pages.append(page)
    return pages


class PagedAdamW(torch.optim.Optimizer):
    """AdamW whose states stay in (pinned) CPU memory; GPU parameters are updated page by page.

    page_size: state elements per page. Extra GPU memory during step() is at most 20 bytes per page
    element (28 for bf16/fp16 parameters): 80 MiB at the default 2**22.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, page_size=2**22):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"betas must both lie in [0, 1), got {betas}")
        if page_size < 1:
            raise ValueError(f"page_size is a number of elements and must be >= 1, got {page_size}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.page_size = page_size  # not a group setting, so state_dicts stay interchangeable with AdamW

    def _new_state(self, p, saved=None):
        """Fresh states for p (or a copy of `saved`): fp32, on the CPU; pinned when p is on the GPU."""
        if p.device.type not in ("cpu", "cuda"):
            raise ValueError(f"PagedAdamW trains parameters on the CPU or a CUDA GPU, not on {p.device}")

        def buffer(key):
            t = torch.zeros(p.shape, dtype=torch.float32, pin_memory=p.is_cuda)
            if saved is not None:
                if saved[key].shape != p.shape:
                    raise ValueError(f"saved {key} has shape {tuple(saved[key].shape)} but its parameter has "
                                     f"{tuple(p.shape)}: this state_dict belongs to other parameters")
                t.copy_(saved[key])
            return t

        step = float(saved["step"]) if saved is not None else 0.0
        return {"step": torch.tensor(step, dtype=torch.float32),  # a CPU scalar, as torch's AdamW keeps it
                "exp_avg": buffer("exp_avg"), "exp_avg_sq": buffer("exp_avg_sq")}

    def _begin_step(self, group):
        """The group's parameters that have a gradient, with states ready and their step counted."""
        params = [p for p in group["params"] if p.grad is not None]  # frozen or unused: skipped
        for p in params:
            if p.grad.is_sparse:
                raise ValueError("PagedAdamW needs dense gradients; use nn.Embedding(sparse=False)")
            if not self.state[p]:
                self.state[p] = self._new_state(p)
            self.state[p]["step"] += 1
        return params

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:  # the usual optimizer contract: closure() recomputes the loss and gradients
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = self._begin_step(group)
            for p in params:
                if not p.is_cuda:  # CPU memory is where the states live already: plain AdamW
                    s = self.state[p]
                    adamw_(p, p.grad, s["exp_avg"], s["exp_avg_sq"], s["step"].item(), group)
            on_gpu = [p for p in params if p.is_cuda]
            for device in dict.fromkeys(p.device for p in on_gpu):  # each GPU pages its own parameters
                self._step_paged([p for p in on_gpu if p.device == device], group)
        return loss

    def _step_paged(self, params, group):
        """The paging loop: AdamW for one group's parameters on one GPU, states streamed through 2 buffers."""
        pages = make_pages(params, self.page_size)
        if not pages:
            return
        device = params[0].device
        n = min(self.page_size, sum(p.numel() for p in params))  # a small model needs no full page
        bufs = [torch.empty(2, n, device=device) for _ in range(2)]  # 2 x (2, n) fp32: [exp_avg, exp_avg_sq]
        compute = torch.cuda.current_stream(device)  # where the update runs (and the training step)
        copy = torch.cuda.Stream(device)  # a side stream for the CPU <-> GPU copies
        loaded = [torch.cuda.Event(), torch.cuda.Event()]  # loaded[i]: buffer i holds its page's states
        updated = torch.cuda.Event()  # the main stream is done with the page just updated

        def pairs(k):  # (GPU buffer slice, pinned CPU slice) for both states of every piece of page k
            buf = bufs[k % 2]
            for p, start, end, offset in pages[k]:
                for i, key in enumerate(("exp_avg", "exp_avg_sq")):
                    yield buf[i, offset:offset + end - start], self.state[p][key].view(-1)[start:end]

        def page_in(k):  # queued on the side stream behind page k-2's copy-out, the last user of its buffer
            with torch.cuda.stream(copy):
                for gpu, cpu in pairs(k):
                    gpu.copy_(cpu, non_blocking=True)
            loaded[k % 2].record(copy)

        # The buffers come from memory the main stream may have used until just now (the backward pass):
        # the side stream must not write into them before the main stream's queued work is done.
        copy.wait_stream(compute)
        page_in(0)
        for k, page in enumerate(pages):
            compute.wait_event(loaded[k % 2])  # page k has arrived
            if k + 1 < len(pages):
                page_in(k + 1)  # page k+1 travels while page k is computed
            buf = bufs[k % 2]
            for p, start, end, offset in page:
                s = self.state[p]
                adamw_(p.view(-1)[start:end], p.grad.reshape(-1)[start:end],  # (end - start,)
                       buf[0, offset:offset + end - start], buf[1, offset:offset + end - start],
                       s["step"].item(), group)
            updated.record(compute)
            copy.wait_event(updated)  # page k goes home only once its update is done
            with torch.cuda.stream(copy):
                for gpu, cpu in pairs(k):
                    cpu.copy_(gpu, non_blocking=True)
        # The CPU waits for the last copy home: when step() returns, the CPU states are current (a
        # checkpoint may read them) and nothing still reads the buffers that are freed on return.
        copy.synchronize()

    def load_state_dict(self, state_dict):
        """Load a PagedAdamW or torch.optim.AdamW state_dict. States stay fp32 on the CPU (pinned for GPU
        parameters); the base class would move them onto the parameter's device and dtype instead."""
        saved_states = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})  # checks the groups, loads the hyperparameters
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(saved_ids, params):
            if i in saved_states:
                self.state[p] = self._new_state(p, saved_states[i])
