"""On a GPU: the mamba_ssm kernel path against the reference path, dense and pruned, on a pretrained proxy.

    python benchmarks/gpu_check.py --model ../shared/models/mamba-proxy-d320-l16 --data ../shared/corpus/valid.txt.xz
Prints one JSON object (relative logit errors and forward times).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simba_compress import load, load_tokenizer  # noqa: E402
from simba_compress.data import load_windows  # noqa: E402
from simba_compress.schedules import linear_for_flops  # noqa: E402
from simba_compress.settings import LinearSchedule  # noqa: E402
from simba_compress import backends as probes  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    args = ap.parse_args()
    tok = load_tokenizer(args.model)
    ids = load_windows(args.data, tok, 1024, 8).cuda()
    out = {"device": torch.cuda.get_device_name(), "mamba_ssm": probes.mamba_ssm_available()}
    for dtype in (torch.float32, torch.bfloat16):
        m = load(args.model, dtype=dtype, device="cuda")
        cpu = load(args.model)
        for name, simba in (("dense", None), ("simba-0.6", linear_for_flops(m.config, LinearSchedule(flops=0.6, form="exact")))):
            res = {}
            for enabled in (True, False):
                m.backends = m.backends.replace(fast_path=enabled)
                with torch.no_grad():
                    m(ids, simba=simba)
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    logits = m(ids, simba=simba).logits.float()
                    torch.cuda.synchronize()
                res["kernel" if enabled else "reference"] = (logits, time.perf_counter() - t0)
            with torch.no_grad():
                ref_cpu = cpu(ids[:2].cpu(), simba=simba).logits
            err = lambda a, b: ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()  # noqa: E731
            out[f"{str(dtype)[6:]}-{name}"] = {
                "kernel_vs_reference_rel_err": err(res["kernel"][0], res["reference"][0]),
                "reference_gpu_vs_cpu_rel_err": err(res["reference"][0][:2].cpu(), ref_cpu),
                "kernel_seconds": res["kernel"][1],
                "reference_seconds": res["reference"][1],
            }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
