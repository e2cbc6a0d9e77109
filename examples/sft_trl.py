"""A peft + TRL SFTTrainer script with only the import changed: `from scalora import ...` instead of peft.

    .venv/bin/python examples/sft_trl.py [OUTPUT_DIR]

Pass the scalora model as `model=`. (TRL's `peft_config=` argument hands the config to peft's own get_peft_model,
which builds a peft model: to train scalora's layers, wrap the model first, as here.)
"""

import sys

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from scalora import LoraConfig, get_peft_model  # was: from peft import LoraConfig, get_peft_model
from scalora.builtin import generate_topics, tiny_llama_path

out = sys.argv[1] if len(sys.argv) > 1 else "runs/example-sft"
path = tiny_llama_path()
bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb, dtype=torch.float32)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                         task_type="CAUSAL_LM"))
texts = [f"{r['input']} it is about {r['output']} ." for r in generate_topics()["train"][:256]]
args = SFTConfig(output_dir=out, max_steps=20, per_device_train_batch_size=8, learning_rate=1e-3, logging_steps=5,
                 save_steps=10, report_to=[], max_length=64,
                 use_cpu=not torch.cuda.is_available())  # SFTConfig assumes a GPU unless told otherwise
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"text": t} for t in texts]),
                     processing_class=AutoTokenizer.from_pretrained(path))
trainer.train()
trainer.save_model(f"{out}/final")
print("adapter:", f"{out}/final", "| losses:", [round(h["loss"], 3) for h in trainer.state.log_history if "loss" in h])
