# The CPU quickstart: LoRA on the bundled SmolLM2-135M-Instruct with the bundled Persian QA sample.
# About 9 minutes on 2 CPU cores. Run `python prepare.py` once first (converts the bundled model).
init_from = "checkpoints/SmolLM2-135M-Instruct"
out_dir = "out/quickstart"
train_data = "data/persian_qa_sample.jsonl"
val_fraction = 0.15          # held-out passages, never seen in training
device = "cpu"
dtype = "float32"

lora_r = 16
lora_alpha = 32
lora_dropout = 0.0           # one pass over the data does not overfit; dropout would keep a copy of every LoRA
                             # layer's input for the backward pass (1.2 GiB more here)
lora_targets = "all-linear"

batch_size = 4
grad_accum = 1
max_seq_len = 384            # our Persian passages are ~200 tokens in SmolLM2's English-centred vocabulary
learning_rate = 1e-3         # small model, few steps: a high LoRA learning rate is fine
warmup_iters = 3
max_iters = 48               # ~190 questions, about one pass over the 175 training questions
eval_interval = 24
eval_generate = 20           # held-out questions answered before and after training, for EM / F1
eval_batch_size = 10         # answered 10 at a time: a decoding step costs about the same for 1 or 10
max_new_tokens = 48          # Persian costs ~1 token per letter in SmolLM2's vocabulary
