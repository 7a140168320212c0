# The CPU quickstart: LoRA on the bundled SmolLM2-135M-Instruct, on bundled Persian QA data written for this
# project. About 10 minutes on 2 CPU cores with native bf16 (AVX-512-BF16); training steps take 1.6x longer in fp32.
# Run `python prepare.py` once first (converts the bundled model). Lesson 15 explains every choice below.
init_from = "checkpoints/SmolLM2-135M-Instruct"
out_dir = "out/quickstart"
train_data = "data/persian_qa_sample.jsonl"     # 201 questions on short passages (~200 characters)
val_data = "data/persian_qa_long.jsonl"         # real-length passages (~1,000 characters), never trained on:
val_limit = 24                                  # the first 24 questions (4 passages) choose the no-answer threshold
test_data = "data/persian_qa_heldout.jsonl"     # kept aside; answered once at the end with that threshold
test_limit = 24                                 # its first 24 questions (4 passages); all 120: python evaluate.py
device = "cpu"
dtype = "auto"               # bf16 on CPUs that compute it natively (1.65x a training step here), else fp32

lora_r = 16
lora_alpha = 32
lora_dropout = 0.0           # two passes over the data do not overfit; dropout would keep a copy of every LoRA
                             # layer's input for the backward pass (1.2 GiB more here)
lora_targets = "all-linear"

batch_size = 4
grad_accum = 1
max_seq_len = 384            # training prompts; longer passages are read in windows of this size (lesson 14)
learning_rate = 1e-3         # small model, few steps: a high LoRA learning rate is fine
warmup_iters = 3
epochs = 2                   # 2 x 51 steps
eval_interval = 51           # validation loss and a checkpoint after each epoch
eval_generate = 24           # validation questions answered before and after training, for EM / F1 / threshold
eval_batch_size = 8          # prompts read at once: a decoding step costs about the same for 1 or 8
max_new_tokens = 48          # Persian costs ~1 token per letter in SmolLM2's vocabulary
