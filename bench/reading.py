"""
How fast evaluate.py reads questions, with and without its two speed levers, on the same model and questions:

  passages read once   the questions on one passage share its prompt prefix (system prompt + passage); it is read
                       once per batch and its keys rotated into every question's row (evaluate.prefill_shared)
  first line only      a row stops at the end of its first non-empty line (only that line is scored) and then
                       leaves the batch, so what a rambling model writes after it costs no decoding steps

    python bench/reading.py                               # bundled SmolLM2, 48 short-passage test questions, fp32
    python bench/reading.py --adapter=out/quickstart      # a fine-tuned model (stops early by itself)
    python bench/reading.py --smoke                       # 6 questions, 1 round: checks that it runs

The variants run interleaved (all, then all again, ...) and medians are reported, in seconds per question. The last
line checks that sharing the passage changes nothing but rounding: every variant with the same stopping rule gives
the same answers.
"""

import argparse
import time

import torch

from common import DEFAULT_CHECKPOINT, ROOT, check_checkpoint, machine_note, median, set_threads, summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--adapter", default="", help="a LoRA adapter folder to read with")
    p.add_argument("--data", default=f"{ROOT}/data/persian_qa_short_test.jsonl")
    p.add_argument("--questions", type=int, default=48)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--smoke", action="store_true")
    a = p.parse_args(argv)
    if a.smoke:
        a.questions, a.reps, a.max_new_tokens = 6, 1, 8
    check_checkpoint(a.checkpoint)
    set_threads(a.threads)

    import data
    import evaluate
    from model import Llama
    from tokenizer import Tokenizer
    model = Llama.from_pretrained(a.checkpoint, dtype=getattr(torch, a.dtype), max_seq_len=1024).eval()
    if a.adapter:
        from lora import load_adapter
        load_adapter(model, a.adapter)
    tok = Tokenizer(a.checkpoint)
    rows = data.load_qa_rows(a.data)[0][:a.questions]
    print(f"reading: {len(rows)} questions of {a.data} on {len(set(r['context'] for r in rows))} passages, "
          f"{a.checkpoint}{' + ' + a.adapter if a.adapter else ''}, {a.dtype}, batch {a.batch}, up to "
          f"{a.max_new_tokens} new tokens; {machine_note()}")

    shared, tables = evaluate.prefill_shared, evaluate._line_end_tables

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
        for rep in range(a.reps):
            for name, (prefill, stop) in variants.items():
                evaluate.prefill_shared, evaluate._line_end_tables = prefill, stop
                t0 = time.perf_counter()
                got[name] = evaluate.read(model, tok, rows, 1024, a.max_new_tokens, a.batch)
                seconds[name].append((time.perf_counter() - t0) / len(rows))
    finally:
        evaluate.prefill_shared, evaluate._line_end_tables = shared, tables
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
