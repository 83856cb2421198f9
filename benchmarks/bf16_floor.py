"""The bf16 rounding floor of a whole-model forward: the CPU's own bf16 forward against its float32 forward of
the same bf16-rounded weights, on the inputs tests/test_gpu.py compares the GPU path with (2 x 512 random ids,
seed 0). The GPU tests' bf16 bar for whole-model logits is read against this.

    python benchmarks/bf16_floor.py --model ../shared/models/mamba-proxy-d320-l16 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simba_compress import load  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    ref, m = load(args.model, dtype=torch.bfloat16).float(), load(args.model, dtype=torch.bfloat16)
    torch.manual_seed(0)
    ids = torch.randint(0, ref.config.vocab_size, (2, 512))
    with torch.no_grad():
        a, b = m(ids, simba=None).logits.double(), ref(ids, simba=None).logits.double()
    out = {
        "model": args.model,
        "max_abs_relative": ((a - b).abs().max() / b.abs().max()).item(),
        "norm_relative": ((a - b).norm() / b.norm()).item(),
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bf16_floor.json").write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
