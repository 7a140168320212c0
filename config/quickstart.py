# The CPU quickstart: LoRA on the bundled SmolLM2-135M-Instruct with the bundled Persian QA sample.
# About 5-8 minutes on 2 CPU cores. Run `python prepare.py` once first (converts the bundled model).
init_from = "checkpoints/SmolLM2-135M-Instruct"
out_dir = "out/quickstart"
train_data = "data/persian_qa_sample.jsonl"
val_fraction = 0.15          # held-out passages, never seen in training
device = "cpu"
dtype = "float32"

lora_r = 16
lora_alpha = 32
lora_dropout = 0.05
lora_targets = "all-linear"

batch_size = 8
grad_accum = 1
max_seq_len = 512
learning_rate = 1e-3         # small model, few steps: a high LoRA learning rate is fine
warmup_iters = 5
epochs = 2
eval_interval = 10
eval_generate = 30
max_new_tokens = 24
