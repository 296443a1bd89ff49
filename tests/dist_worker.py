"""One rank of tests/test_train.py's torchrun run: trains with m4's trainer, then writes the
whole weights as this rank sees them (an FSDP all-gather), so the test can compare ranks."""

import sys
from pathlib import Path

from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from m4.train import dist
from m4.train.trainer import TrainConfig, train

data, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
d = dist.setup()
model = train(TrainConfig("tiny", data=data, out=out, steps=steps, batch_size=1, lr=3e-4), d)
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
save_file({k: v.contiguous() for k, v in state.items()}, out / f"rank{d.rank}.safetensors")
dist.close(d)
