"""Run under torchrun with 2 processes: DoRA's weight norm on a base that DeepSpeed ZeRO-3 has partitioned.

In a training run ZeRO-3's hooks have gathered a layer's parameters before its forward reads them, so
scalora/core/lora.py `_gathered` finds them whole. Here the norm is asked for outside any forward, with the
persistence threshold at 0 so that even these small parameters are partitioned: the base weight, lora_A and lora_B
must be gathered for it. Rank 0 prints one line per rank: "PROBE <rank> <partitioned before> <norm equal to the
unsharded one> <max |norm - W's row norms|> <partitioned after>"."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402
from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus  # noqa: E402
from torch import nn  # noqa: E402

from scalora.core import LoraConfig, get_peft_model  # noqa: E402


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


tdist.init_process_group("gloo")
torch.manual_seed(0)  # the same weights on both ranks
model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True))
layer = model.base_model.model.proj
with torch.no_grad():
    layer.lora_B["default"].weight.normal_()  # B A non-zero: the norm is W + scaling * B A's, not W's
whole = layer.dora_norm("default").clone()
w_rows = torch.linalg.vector_norm(layer.base_layer.weight.detach().float(), dim=1)
params = [p for p in model.parameters() if p.requires_grad]
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(params, lr=1e-3), config={
    "train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
watched = (layer.base_layer.weight, layer.lora_A["default"].weight, layer.lora_B["default"].weight)
before = all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in watched)
got = layer._cached_dora_norm("default")
after = all(p.ds_status == ZeroParamStatus.NOT_AVAILABLE for p in watched)
mine = (tdist.get_rank(), before, torch.equal(got, whole), float((got - w_rows).abs().max()), after)
lines = [None] * tdist.get_world_size()
tdist.all_gather_object(lines, mine)  # printed by rank 0 alone: two processes' prints interleave
if tdist.get_rank() == 0:
    print("\n".join("PROBE " + " ".join(map(str, line)) for line in lines), flush=True)
