"""The PEFT workflow on scalora: wrap a tiny Llama, train its LoRA adapter for a few steps, save it in PEFT format."""

import os
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from scalora import LoraConfig, get_peft_model

torch.manual_seed(0)
base = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, vocab_size=128))
model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
model.print_trainable_parameters()

opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
ids = torch.randint(0, 128, (4, 32))
for step in range(30):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad()
    if step % 10 == 0 or step == 29:
        print(f"step {step:2d}  loss {loss.item():.3f}")

with tempfile.TemporaryDirectory() as d:
    model.save_pretrained(d)
    print("PEFT-format adapter written:", sorted(os.listdir(d)))
