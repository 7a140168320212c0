"""
Peak memory of `python export.py` on a ~1B-parameter checkpoint: the streamed export (the base read, merged and
written one tensor at a time, stream.py) against the whole-model path (the base loaded, the adapter merged in memory,
then written: what export.py did before it streamed, and still does for Meta's layout and 4-bit checkpoints).

    python bench/export.py                     # a random 1.2B Llama in bf16 (2.3 GB) + LoRA r=16, GGUF f16
    python bench/export.py --type=q8_0         # another GGUF type
    python bench/export.py --folder=True       # the merged Hugging Face folder instead of GGUF
    python bench/export.py --reference=False   # the streamed export only (the other needs ~5 GB more)
    python bench/export.py --smoke=True        # a tiny model: checks that it runs

The settings, each with what it means, are the block at the top of the code.

The checkpoint is random weights of TinyLlama-1.1B's shape with SmolLM2's 49,152-token vocabulary (the bundled
tokenizer goes into the GGUF), written to out_dir in bf16, as Hub checkpoints come, with an adapter on every linear
layer. Each side then runs in a fresh process and reports its peak resident memory (VmHWM: everything the process
ever held at once, file pages it mapped included). Both outputs must be the same bytes. out_dir is emptied at the end.
The memory rule the numbers check: peak = what the imports cost + a few copies of the largest tensor (read, in fp32,
converted) + the adapter, whatever the number of layers; the whole-model path holds every weight in fp32 (GGUF) or
in the folder's dtype.
"""

import hashlib
import os
import shutil
import sys
import time

import torch


# -- settings (defaults; override with --key=value or a config file, see configurator.py) -------------------------
out_dir = "/tmp/bench_export"  # scratch folder for the random checkpoint and the exports (emptied at the end)
dim = 2048                   # the random checkpoint's shape: TinyLlama-1.1B's ...
n_layers = 22
n_heads = 32
n_kv_heads = 4
hidden_dim = 5632
vocab_size = 49152           # ... with SmolLM2's vocabulary, whose tokenizer the GGUF needs: 1.17B parameters
lora_r = 16                  # the adapter: LoRA of this rank on every linear layer
type = "f16"                 # what export.py writes: GGUF f32 | f16 | bf16 | q8_0 | q4_0; folder=True: f32 | f16 | bf16
folder = False               # export a merged Hugging Face folder instead of a GGUF file
reference = True             # also measure the whole-model path (fp32 for GGUF: 4 bytes a parameter, and more)
seed = 0                     # of the random weights
smoke = False                # a tiny model: checks that everything runs, measures nothing useful
worker = ""                  # internal: "streamed" or "whole" exports in this process and reports its peak
# -------------------------------------------------------------------------------------------------------------------
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}

from common import (DEFAULT_CHECKPOINT, check_checkpoint, check_choice, peak_rss_mib, report_result,  # noqa: E402
                    rss_mib, run_worker, summary)
from configurator import configure  # noqa: E402

SMOKE = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, lora_r=4)


def paths(cfg):
    base, adapter = os.path.join(cfg["out_dir"], "base"), os.path.join(cfg["out_dir"], "adapter")
    out = os.path.join(cfg["out_dir"], "{}" + ("" if cfg["folder"] else ".gguf"))
    return base, adapter, out


def write_checkpoint(cfg, args):
    """A random bf16 checkpoint (written one tensor at a time: the writer's memory is not what is measured) and
    an adapter with LoRA factors on every linear layer."""
    import torch.nn as nn

    import stream
    from convert import hf_config, write_json
    from lora import apply_lora, lora_layers, save_adapter
    from model import Llama
    base, adapter, _ = paths(cfg)
    os.makedirs(base)
    with torch.device("meta"):
        model = Llama(args)                                      # names and shapes only
    shapes = stream.model_shapes(model)

    def random_tensor(name):
        g = torch.Generator().manual_seed(cfg["seed"] + list(shapes).index(name))
        if len(shapes[name]) == 1:                               # RMSNorm gains
            return torch.ones(shapes[name], dtype=torch.bfloat16)
        return (torch.randn(shapes[name], generator=g) * 0.02).to(torch.bfloat16)
    stream.write_safetensors(os.path.join(base, "model.safetensors"), stream.Weights(args, shapes, random_tensor),
                             torch.bfloat16)
    write_json(os.path.join(base, "config.json"), hf_config(args, torch.bfloat16), indent=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(DEFAULT_CHECKPOINT, f), base)
    apply_lora(model, r=cfg["lora_r"], alpha=2 * cfg["lora_r"], dropout=0.0, targets="all-linear")
    g = torch.Generator().manual_seed(cfg["seed"])
    for _, layer in lora_layers(model):                          # real factors on the meta model's LoRA layers
        layer.lora_A.weight = nn.Parameter(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.02)
        layer.lora_B.weight = nn.Parameter(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.02)
    save_adapter(model, adapter, base_model_name_or_path=base)
    return sum(torch.Size(s).numel() for s in shapes.values()), max(torch.Size(s).numel() for s in shapes.values())


def measure(cfg):
    """Export in this process, as cfg["worker"] says, and hand the peak RSS to the parent process."""
    import export
    import stream
    from checkpoint import load_model
    from lora import merge_lora
    base, adapter, out = paths(cfg)
    after_imports = rss_mib()
    t0 = time.perf_counter()
    path = out.format(cfg["worker"])
    if cfg["worker"] == "streamed":                              # the command itself
        export.main([f"--adapter={adapter}", f"--out={path}", f"--type={cfg['type']}"])
    else:
        dtype = export.FOLDER_TYPES[cfg["type"]] if cfg["folder"] else torch.float32
        model, _ = load_model(base, adapter, dtype=dtype)
        weights = stream.model_weights(merge_lora(model))
        if cfg["folder"]:
            stream.write_folder(weights, base, path, dtype)
        else:
            export.write_gguf(weights, base, path, cfg["type"], progress=False)
    report_result(dict(peak_mib=peak_rss_mib(), after_imports_mib=after_imports, seconds=time.perf_counter() - t0,
                       digest=digest(path)))


def digest(path):
    """sha256 of a file, or of a folder's model.safetensors, read in chunks."""
    h = hashlib.sha256()
    with open(os.path.join(path, "model.safetensors") if os.path.isdir(path) else path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    cfg = configure(settings, argv)
    if cfg["smoke"]:
        cfg.update(SMOKE)
    check_choice("worker", cfg["worker"], ("", "streamed", "whole"))
    check_choice("type", cfg["type"], ("f32", "f16", "bf16") + (() if cfg["folder"] else ("q8_0", "q4_0")))
    if cfg["worker"]:
        return measure(cfg)
    check_checkpoint(DEFAULT_CHECKPOINT)
    from model import ModelArgs
    args = ModelArgs(dim=cfg["dim"], n_layers=cfg["n_layers"], n_heads=cfg["n_heads"], n_kv_heads=cfg["n_kv_heads"],
                     hidden_dim=cfg["hidden_dim"], vocab_size=cfg["vocab_size"], max_seq_len=2048)
    if os.path.exists(cfg["out_dir"]) and os.listdir(cfg["out_dir"]):
        sys.exit(f"error: out_dir {cfg['out_dir']} is not empty; pass a new or empty --out_dir (it is emptied at "
                 f"the end)")
    worker_argv = [a for a in argv if not a.startswith("--worker=")]
    try:
        n_params, largest = write_checkpoint(cfg, args)
        print(f"export: {n_params / 1e6:,.0f}M random parameters (bf16, {2 * n_params / 2**30:.2f} GiB on disk; "
              f"largest tensor {largest / 1e6:.1f}M, {4 * largest / 2**20:.0f} MiB in fp32) + LoRA r={cfg['lora_r']} "
              f"on every linear layer -> {'folder' if cfg['folder'] else 'GGUF'} {cfg['type']}", flush=True)
        runs = {}
        for system in ("streamed", "whole") if cfg["reference"] else ("streamed",):
            runs[system] = r = run_worker(os.path.abspath(__file__), worker_argv + [f"--worker={system}"])
            label = "streamed (python export.py)" if system == "streamed" else "whole model (load + merge_lora)"
            print(f"  {label:32s} peak RSS {r['peak_mib']:7,.0f} MiB (after imports {r['after_imports_mib']:4,.0f} "
                  f"MiB), {r['seconds']:6.1f} s", flush=True)
            written = paths(cfg)[2].format(system)                  # gone before the next one: disk space
            shutil.rmtree(written) if cfg["folder"] else os.remove(written)
    finally:
        shutil.rmtree(cfg["out_dir"], ignore_errors=True)
    ours = runs["streamed"]
    extra = ours["peak_mib"] - ours["after_imports_mib"]
    print(f"streamed: {extra:,.0f} MiB above the imports = {extra / (4 * largest / 2**20):.1f} x the largest tensor "
          f"in fp32; the whole model in fp32 would be {4 * n_params / 2**20:,.0f} MiB")
    if cfg["reference"]:
        same = ours["digest"] == runs["whole"]["digest"]
        print(f"outputs identical: {same}")
        summary("export_peak_rss", ours["peak_mib"], runs["whole"]["peak_mib"], "MiB", digits=0)
    else:
        summary("export_peak_rss", ours["peak_mib"], 4 * n_params / 2**20, "MiB", digits=0)  # the fp32 rule


if __name__ == "__main__":
    main()
