"""
How fast evaluate.py reads questions, with and without its two speed levers, on the same model and questions:

  passages read once   the questions on one passage share its prompt prefix (system prompt + passage); it is read
                       once per batch and its keys rotated into every question's row (prefix_cache.prefill_shared)
  first line only      a row stops at the end of its first non-empty line (only that line is scored) and then
                       leaves the batch, so what a rambling model writes after it costs no decoding steps

    python bench/reading.py                               # bundled SmolLM2, 48 short-passage test questions, fp32
    python bench/reading.py --adapter=out/quickstart      # a fine-tuned model (stops early by itself)
    python bench/reading.py --smoke=True                  # 6 questions, 1 round: checks that it runs

The settings, each with what it means, are the block at the top of the code.

The variants run interleaved (all, then all again, ...) and medians are reported, in seconds per question. The last
line checks that sharing the passage changes nothing but rounding: every variant with the same stopping rule gives
the same answers.
"""

import time

import torch

import common

# -- settings (defaults; override with --key=value or a config file, see configurator.py) -------------------------
init_from = common.DEFAULT_CHECKPOINT  # checkpoint folder in Hugging Face layout (default: the bundled SmolLM2)
adapter = ""                 # a LoRA adapter folder to read with (PEFT format, e.g. a train.py out_dir)
test_data = f"{common.ROOT}/data/persian_qa_short_test.jsonl"  # the questions, as evaluate.py reads them
test_limit = 48              # read only the first N questions (0: all)
batch_size = 8               # prompts read at once
max_new_tokens = 48          # the longest answer a row may write
reps = 2                     # rounds, each variant once per round, interleaved
dtype = "float32"            # or "bfloat16" (the model runs on the CPU, as evaluate.py's reading does here)
threads = 0                  # torch CPU threads (0: torch's default; on a busy machine 1 gives steadier numbers)
smoke = False                # 6 questions, 1 round, 8 new tokens: checks that everything works, times nothing useful
# -------------------------------------------------------------------------------------------------------------------
settings = {k: v for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))}

from common import check_checkpoint, check_choice, machine_note, median, set_threads, summary  # noqa: E402
from configurator import configure  # noqa: E402


def main(argv=None):
    cfg = configure(settings, argv)
    if cfg["smoke"]:
        cfg.update(test_limit=6, reps=1, max_new_tokens=8)
    check_choice("dtype", cfg["dtype"], ("float32", "bfloat16"))
    check_checkpoint(cfg["init_from"])
    set_threads(cfg["threads"])

    import answer
    import data
    from model import Llama
    from tokenizer import Tokenizer
    model = Llama.from_pretrained(cfg["init_from"], dtype=getattr(torch, cfg["dtype"]), max_seq_len=1024).eval()
    if cfg["adapter"]:
        from lora import load_adapter
        load_adapter(model, cfg["adapter"])
    tok = Tokenizer(cfg["init_from"])
    rows = data.load_qa_rows(cfg["test_data"])[0][:cfg["test_limit"] or None]
    print(f"reading: {len(rows)} questions of {cfg['test_data']} on {len(set(r['context'] for r in rows))} passages, "
          f"{cfg['init_from']}{' + ' + cfg['adapter'] if cfg['adapter'] else ''}, {cfg['dtype']}, "
          f"batch {cfg['batch_size']}, up to {cfg['max_new_tokens']} new tokens; {machine_note()}")

    shared, tables = answer.prefill_shared, answer._line_end_tables

    def one_prompt_each(model, prompts, groups, extra):  # every prompt its own group: nothing shared
        return shared(model, prompts, list(range(len(prompts))), extra)

    def to_end_of_turn(tok, vocab, device):  # no token ends a line: rows stop at their end of turn only
        newline, visible = tables(tok, vocab, device)
        return torch.zeros_like(newline), visible

    variants = {"before (each prompt whole, to the end of turn)": (one_prompt_each, to_end_of_turn),
                "+ passages read once": (shared, to_end_of_turn),
                "+ first line only (what evaluate.py does)": (shared, tables)}
    seconds, got = {v: [] for v in variants}, {}
    try:
        for rep in range(cfg["reps"]):
            for name, (prefill, stop) in variants.items():
                answer.prefill_shared, answer._line_end_tables = prefill, stop
                t0 = time.perf_counter()
                got[name] = answer.read_passages(model, tok, rows, 1024, cfg["max_new_tokens"], cfg["batch_size"])
                seconds[name].append((time.perf_counter() - t0) / len(rows))
    finally:
        answer.prefill_shared, answer._line_end_tables = shared, tables
    first = median(seconds[next(iter(variants))])
    for name in variants:
        s = median(seconds[name])
        print(f"  {name:48s} {s:6.3f} s per question, {first / s:4.2f}x")
    names = list(variants)
    same = [x["answer"] == y["answer"] for x, y in zip(got[names[0]], got[names[1]])]
    gap = max(abs(x["null_diff"] - y["null_diff"]) for x, y in zip(got[names[0]], got[names[1]]))
    print(f"passages read once vs each prompt whole: {sum(same)}/{len(same)} answers identical, "
          f"null_diff within {gap:.1e}")
    summary("reading_seconds_per_question", median(seconds[names[-1]]), first, "s", digits=5)


if __name__ == "__main__":
    main()
