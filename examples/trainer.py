"""A peft + transformers Trainer script with only the import changed: `from scalora import ...` instead of peft.

    .venv/bin/python examples/trainer.py [OUTPUT_DIR]

The builtin tiny Llama (built here on first use) in 4-bit NF4, LoRA on every linear layer, the builtin topic data
as instruction text, the Trainer with its defaults but a few steps; save_model() writes a PEFT-format adapter.
"""

import sys

import torch
from datasets import Dataset
from transformers import (AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, DataCollatorForLanguageModeling,
                          Trainer, TrainingArguments)

from scalora import LoraConfig, get_peft_model  # was: from peft import LoraConfig, get_peft_model
from scalora.builtin import generate_topics, tiny_llama_path

out = sys.argv[1] if len(sys.argv) > 1 else "runs/example-trainer"
path = tiny_llama_path()  # any local folder or hub id of a causal LM
tokenizer = AutoTokenizer.from_pretrained(path)
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.float32)  # bfloat16 on GPUs
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
model.print_trainable_parameters()

texts = [f"{r['input']} it is about {r['output']} ." for r in generate_topics()["train"][:256]]
data = Dataset.from_list([{"text": t} for t in texts]).map(lambda r: tokenizer(r["text"]))

args = TrainingArguments(output_dir=out, max_steps=20, per_device_train_batch_size=8, learning_rate=1e-3,
                         logging_steps=5, save_steps=10, report_to=[])
trainer = Trainer(model=model, args=args, train_dataset=data,  # the unused "text" column is dropped by name
                  data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
trainer.train()
trainer.save_model(f"{out}/final")  # adapter_config.json + adapter_model.safetensors, nothing of the base
print("adapter:", f"{out}/final", "| losses:", [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h])
