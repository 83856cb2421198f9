"""Run under `accelerate launch --multi_gpu --num_processes 2 tests/ddp_worker.py OUT CHECKPOINT` (on the CPU: gloo)
by test_finetune.py: a fine-tune stopped after 2 steps and resumed, then the command line on CHECKPOINT. Only the
main process writes: OUT/ddp.pt (final weights and the result) and the command line's output folder."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_finetune import config, pruned_model, run  # noqa: E402

from simba_compress.cli import main  # noqa: E402

out, checkpoint = Path(sys.argv[1]), sys.argv[2]
cfg = config(grad_clip=1e6)
first = run(pruned_model(), cfg, state=out / "state", stop_after=2)
model = pruned_model()  # a restarted job: the original weights, the same settings
res = run(model, cfg, state=out / "state")
rank = torch.distributed.get_rank()
if rank == 0:
    torch.save({"state_dict": model.state_dict(), "first": first.to_dict(), "result": res.to_dict()}, out / "ddp.pt")
code = main(["--model", checkpoint, "--flops", "0.6", "--schedule", "linear", "--output", str(out / "cli"), "--calib-samples",
             "2", "--calib-seq-len", "64", "--finetune-data", "demo", "--finetune-seq-len", "64", "--finetune-batch-size", "4",
             "--finetune-steps", "2", "--device", "cpu", "--json"])
print(json.dumps({"rank": rank, "cli_exit": code}), file=sys.stderr)
