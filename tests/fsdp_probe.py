"""Run under torchrun with 2 processes: what accelerate makes of ACCELERATE_USE_FSDP on a CPU, alone and with scalora.
Prints one line per rank: "<rank> <accelerate alone> <scalora>"."""

import os

os.environ["ACCELERATE_USE_FSDP"] = "true"
os.environ.setdefault("FSDP_VERSION", "2")

from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402

alone = Accelerator(cpu=True).distributed_type
AcceleratorState._reset_state(reset_partial_state=True)
from scalora import dist  # noqa: E402

ours = dist.make_accelerator(4, 2, "no", None, "/tmp").distributed_type
print(PartialState().process_index, alone.value, ours.value, flush=True)
