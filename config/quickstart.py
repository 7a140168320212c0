# The CPU quickstart: LoRA on the bundled SmolLM2-135M-Instruct, on bundled Persian QA data written for this
# project, in under 10 minutes on 2 laptop CPU cores (bf16 where the CPU computes it natively, fp32 elsewhere).
# Run `python prepare.py` once first (converts the bundled model). Lesson 15 explains every choice below.
#
# Short passages (pieces of at most 260 characters, ~330-token prompts), because a 135M model with about one token
# per Persian letter can learn to read those in minutes, not the ~1,000-character passages of real PersianQA
# (python evaluate.py measures those; lesson 15). Train, validation and test come from different passages.
init_from = "checkpoints/SmolLM2-135M-Instruct"
out_dir = "out/quickstart"
train_data = "data/persian_qa_short_train.jsonl"  # 330 questions on pieces of 55 passages, 33% unanswerable
val_data = "data/persian_qa_short_val.jsonl"      # pieces of 10 other passages: loss, and the no-answer threshold
val_limit = 36                                    # its first 36 questions
test_data = "data/persian_qa_short_test.jsonl"    # the 120 held-out questions on pieces of their 20 passages,
test_limit = 0                                    # answered once by the base model and once by the fine-tuned one
device = "cpu"
dtype = "auto"               # bf16 on CPUs that compute it natively, else fp32

lora_r = 16
lora_alpha = 32
lora_dropout = 0.0           # 36 steps do not overfit; dropout would keep a copy of every LoRA layer's input
lora_targets = "all-linear"

batch_size = 4
grad_accum = 1
max_seq_len = 448            # the longest prompt + answer of these files: nothing is windowed
learning_rate = 1e-3         # small model, few steps: a high LoRA learning rate is fine
warmup_iters = 3
max_iters = 36               # 144 of the 330 questions: what 2 fp32 cores train in about 3.5 minutes
eval_interval = 36           # validation loss and a checkpoint at the end
eval_generate = 36           # validation questions answered before and after training, for EM / F1 / threshold
eval_batch_size = 16         # prompts read at once: a decoding step costs about the same for 1 or 16
max_new_tokens = 32          # Persian costs ~1 token per letter in SmolLM2's vocabulary: the median answer is 20
                             # tokens, a few are cut (the longest has 65); 48 costs the base model's rambling 1.2x
