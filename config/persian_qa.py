# QLoRA fine-tuning of Llama 2 7B chat on PersianQA, designed for one 12 GB GPU: train.py's memory estimate is
# 6.3 GiB (lesson 13), not yet measured on a GPU. Measure it with python bench/gpu_check.py (bench/gpu_all.py
# prints the whole GPU table).
# Get the weights and data first:
#   HF_TOKEN=hf_... python prepare.py --hub_id=meta-llama/Llama-2-7b-chat-hf   (accept Meta's licence on the Hub first)
#   python prepare.py --data=persian_qa
init_from = "checkpoints/Llama-2-7b-chat-hf"
hub_id = "meta-llama/Llama-2-7b-chat-hf"
out_dir = "out/persian_qa"
train_data = "data/persian_qa/train.jsonl"
val_fraction = 0.03           # validation: ~270 questions on passages held out of the TRAINING set
test_data = "data/persian_qa/test.jsonl"  # the 930 test questions, answered once at the end: comparable with
                              # the published table (XLM-RoBERTa-large F1 84.8 / EM 70.4)

# The QLoRA recipe of the notes: 4-bit NF4 base with double quantization, bf16 compute, paged optimizer.
quantize = "nf4"
dtype = "bfloat16"
optimizer = "paged_adamw"
gradient_checkpointing = True

lora_r = 32
lora_alpha = 16
lora_dropout = 0.1
lora_targets = "all-linear"   # the QLoRA paper needed adapters on every linear layer to match full fine-tuning

batch_size = 4
grad_accum = 4                # 16 sequences per optimizer step
max_seq_len = 1024
learning_rate = 2e-4
warmup_iters = 30
weight_decay = 0.0
max_iters = 1000
eval_interval = 100
eval_generate = 200            # validation questions answered before and after; they choose the no-answer threshold
max_new_tokens = 48
