"""
How a run is judged, and what it reports (train.py calls these; `python evaluate.py` judges a finished adapter).

  during training  the loss per answer token on the validation examples (val_loss), every eval_interval steps
  before and after the validation questions, answered by reading the passages (answer.py), which choose the
                   no-answer threshold: the model's best use of its own scores
  at the end       the test questions, never trained on, answered once at that threshold by the base model and by
                   the fine-tuned one, with a few of them side by side; then metrics.json, test_predictions.jsonl
                   and loss.png in out_dir

Under torchrun every process reads every world-th question (or example) and the results are gathered, so the GPUs
split the work instead of waiting for rank 0 (NCCL's 10-minute timeout would kill the others during a long
evaluation).
"""

import os

import torch
import torch.distributed as dist

import data
from answer import abstain_above, read_passages
from convert import write_json, write_jsonl
from evaluate import f1_score, score, summary
from memory import gib, peak_memory


@torch.no_grad()
def val_loss(model, examples, cfg, pad_id, ctx):
    """Mean loss per answer token over the whole validation set."""
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(examples), cfg["batch_size"]):
        idx, targets = data.collate(examples, list(range(b, min(b + cfg["batch_size"], len(examples)))), pad_id)
        n = int((targets != -100).sum())
        with ctx:
            _, loss = model(idx.to(cfg["device"]), targets.to(cfg["device"]))
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / max(count, 1)


# -- shared under torchrun --------------------------------------------------------------------------------------------

def read_all(model, tok, rows, cfg, ctx, rank, world, progress=False):
    """Candidates (answer.py: read_passages) of all rows, in order, each process reading its share."""
    mine = rows[rank::world]
    mine = read_passages(model, tok, mine, cfg["max_seq_len"], cfg["max_new_tokens"],
                         cfg["eval_batch_size"] or cfg["batch_size"], ctx, progress and rank == 0) if mine else []
    if world == 1:
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    return [parts[i % world][i // world] for i in range(len(rows))]


def global_val_loss(model, examples, cfg, pad_id, ctx, rank, world):
    """Loss per answer token over the whole validation set: each process sums over its share."""
    mine = examples[rank::world]
    n = sum(len(answer) for _, answer in mine)
    loss = val_loss(model, mine, cfg, pad_id, ctx) if mine else 0.0
    if world == 1:
        return loss
    t = torch.tensor([loss * n, n], dtype=torch.float64, device=cfg["device"])
    dist.all_reduce(t)
    return (t[0] / t[1]).item()


def choose_threshold(candidates, golds):
    """The threshold with the best F1 on these questions (SQuAD v2's best_f1_thresh), found in one sorted pass:
    with the questions ordered by null_diff, a threshold answers a prefix of them and abstains on the rest."""
    answer_f1 = [f1_score(c["answer"], g) for c, g in zip(candidates, golds)]
    abstain_f1 = [f1_score("", g) for g in golds]
    order = sorted(range(len(candidates)), key=lambda i: candidates[i]["null_diff"])
    total = best = sum(abstain_f1)  # threshold below every null_diff: abstain on all
    threshold = candidates[order[0]]["null_diff"] - 1.0 if order else 0.0
    for k, i in enumerate(order):
        total += answer_f1[i] - abstain_f1[i]
        nxt = candidates[order[k + 1]]["null_diff"] if k + 1 < len(order) else candidates[i]["null_diff"] + 2.0
        if total > best + 1e-9:
            best, threshold = total, (candidates[i]["null_diff"] + nxt) / 2  # halfway to the next question
    return threshold


def answer_validation(model, tok, rows, cfg, ctx, rank, world, when):
    """EM/F1 on the validation questions, abstaining above the null_diff threshold that is best on them
    (choose_threshold): the model's best use of its own scores, before and after alike."""
    candidates = read_all(model, tok, rows, cfg, ctx, rank, world)
    golds = [r["answers"] for r in rows]
    threshold = choose_threshold(candidates, golds)
    s = dict(score(abstain_above(candidates, threshold), golds, [r["context"] for r in rows]), null_threshold=threshold)
    if rank == 0:
        print(f"{when} ({len(rows)} validation questions, abstaining above null_diff {threshold:.2f}): {summary(s)}")
    return s


def answer_test(model, tok, rows, cfg, ctx, rank, world, threshold):
    """The test questions, answered once at a threshold chosen on validation: the score at that threshold, the
    predictions, and each question's best answer, which answering every question would give (the model's
    reading, whatever it decides)."""
    candidates = read_all(model, tok, rows, cfg, ctx, rank, world, progress=True)
    golds, contexts = [r["answers"] for r in rows], [r["context"] for r in rows]
    preds = abstain_above(candidates, threshold)
    s = score(preds, golds, contexts)
    every = score([c["answer"] for c in candidates], golds, contexts)
    s.update(null_threshold=threshold, answering_all={k: every[k] for k in ("has_answer_f1", "answered", "invented")},
             always_no_answer_f1=score([""] * len(golds), golds)["f1"])
    return {"score": s, "predictions": preds, "best_answers": [c["answer"] for c in candidates],
            "null_diffs": [c["null_diff"] for c in candidates]}


def validate_then_test(model, tok, eval_rows, test_rows, cfg, ctx, rank, world, when):
    """The validation questions, which choose the no-answer threshold, then the test questions at that threshold:
    nothing is tuned on these. -> (validation score, test answers), None for a set the run does not have"""
    val = answer_validation(model, tok, eval_rows, cfg, ctx, rank, world, when) if eval_rows else None
    threshold = val["null_threshold"] if eval_rows else 0.0
    return val, answer_test(model, tok, test_rows, cfg, ctx, rank, world, threshold) if test_rows else None


def judge_base_model(model, tok, val_ex, eval_rows, test_rows, history, cfg, pad_id, ctx, rank, world):
    """Before training, into history: the base model's validation loss (step 0), its validation questions, and its
    test questions at its own threshold, the base side of the comparison at the end."""
    if val_ex:
        history["val"].append((0, global_val_loss(model, val_ex, cfg, pad_id, ctx, rank, world)))
        if rank == 0:
            print(f"before training: val loss {history['val'][0][1]:.4f}")
    history["before"], base_test = validate_then_test(model, tok, eval_rows, test_rows, cfg, ctx, rank, world,
                                                      "before training")
    if test_rows:
        history["base_test"] = base_test


def report_test(rows, base, tuned, n_examples=4):
    """The last lines of a run: the test questions answered by the base model and by the fine-tuned one (each at the
    threshold chosen on validation, and answering every question), and a few of them side by side."""
    print(f"held-out test: {len(rows)} questions, never trained on (always 'no answer' scores F1 "
          f"{tuned['score']['always_no_answer_f1']:.1f})")
    for name, run in (("base model", base), ("fine-tuned", tuned)):
        if run is None:  # resumed from a run that did not answer them before training
            continue
        s, forced = run["score"], run["score"]["answering_all"]
        print(f"  {name:<10}  {summary(s)}\n  {'':<10}  answering all: has-answer F1 {forced['has_answer_f1']:.1f}, "
              f"invented {forced['invented']:.1f}%")

    def invented(s):
        return f"{s['invented']:.0f}%" if s["answered"] else "none"
    if base is not None:
        b, t = base["score"], tuned["score"]
        print(f"  fine-tuned vs base: F1 {t['f1']:.1f} vs {b['f1']:.1f}, answered {t['answered']} vs {b['answered']}, "
              f"invented {invented(t)} vs {invented(b)}; answering all: has-answer F1 "
              f"{t['answering_all']['has_answer_f1']:.1f} vs {b['answering_all']['has_answer_f1']:.1f}, invented "
              f"{invented(t['answering_all'])} vs {invented(b['answering_all'])}")

    def shown(text):
        return (text if len(text) <= 60 else text[:57] + "...") if text else "(no answer)"

    def answer(run, i):  # what it says, and the best answer it held back when it abstains
        said, best = run["predictions"][i], run["best_answers"][i]
        return shown(said) if said or not best else f"(no answer; its best answer: {shown(best)})"
    for i in range(0, len(rows), max(1, len(rows) // n_examples))[:n_examples]:  # evenly spread, the same every run
        print(f"\n  question   {rows[i]['question']}\n  gold       {shown(' | '.join(rows[i]['answers']))}")
        if base is not None:
            print(f"  base       {answer(base, i)}")
        print(f"  fine-tuned {answer(tuned, i)}")


def plot_losses(history, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h[0] for h in history["train"]], [h[1] for h in history["train"]], lw=1, label="train")
    if history["val"]:
        ax.plot([h[0] for h in history["val"]], [h[1] for h in history["val"]], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss per answer token")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(cfg, history, test_rows, tuned, est):
    """The end of a run, on rank 0: the test comparison, test_predictions.jsonl, metrics.json and the memory line."""
    device, threshold = cfg["device"], history["after"]["null_threshold"] if history["after"] else 0.0
    if test_rows:
        report_test(test_rows, history.get("base_test"), tuned)
        write_jsonl(os.path.join(cfg["out_dir"], "test_predictions.jsonl"),
                    [{"id": row["id"], "answers": row["answers"], "prediction": pred, "null_diff": nd}
                     for row, pred, nd in zip(test_rows, tuned["predictions"], tuned["null_diffs"])])
    metrics = {"before": history["before"], "after": history["after"], "test": tuned["score"] if test_rows else None,
               "base_test": (history.get("base_test") or {}).get("score"),
               "null_threshold": threshold, "val_loss": history["val"], "skipped_steps": history.get("skipped", 0),
               "train_loss_last": history["train"][-1][1] if history["train"] else None,
               "peak_memory_bytes": peak_memory(device), "estimated_memory_bytes": est["total"]}
    write_json(os.path.join(cfg["out_dir"], "metrics.json"), metrics, indent=2)
    where = "GPU allocated" if device.startswith("cuda") else "process RSS"
    print(f"peak memory: {gib(metrics['peak_memory_bytes'])} measured ({where}), {gib(est['total'])} estimated. "
          f"Adapter and metrics in {cfg['out_dir']}")
