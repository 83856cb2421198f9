"""Train a small Mamba on the project's corpus: the embedded demo checkpoint, and the Mamba-2 proxy.

Defaults: the demo (simba_compress/data/demo-model), a Mamba-1 with d_model 128 and 6 layers, the corpus
tokenizer's 8192 tokens, trained from scratch with the package's own model (mamba_ssm's scan kernel when
installed): AdamW, warm-up then cosine, bf16 autocast on a GPU. --layer mamba2 trains a Mamba-2 instead
(the reference SSD path, stable under autograd). --eval-flops also measures Simba at those FLOP ratios on
the valid text (headline loss, last 128 tokens protected) beside truncation. Writes --name.json (settings,
losses, time, machine) and, unless --no-save, the model folder to --out.

    python benchmarks/train_demo.py --corpus ../shared/corpus --out /tmp/demo
    python benchmarks/train_demo.py --corpus ../shared/corpus --out /tmp/m2 --name mamba2 --layer mamba2 \
        --d-model 256 --n-layer 8 --d-state 64 --eval-flops 0.8 0.6 0.45 --no-save
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simba_compress import MambaLM, ModelConfig, save  # noqa: E402
from simba_compress.data import load_windows, read_documents, tokenize  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--corpus", required=True, help="folder with train.txt.xz, valid.txt.xz, tokenizer/")
    ap.add_argument("--out", required=True)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-seconds", type=float, default=None, help="stop training early past this time")
    ap.add_argument("--layer", choices=["mamba1", "mamba2"], default="mamba1")
    ap.add_argument("--d-state", type=int, default=16)
    ap.add_argument("--headdim", type=int, default=64)
    ap.add_argument("--name", default="train_demo", help="result file stem; the model folder is demo-model")
    ap.add_argument("--no-save", action="store_true")
    ap.add_argument("--eval-flops", type=float, nargs="*", default=[])
    args = ap.parse_args()

    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    corpus = Path(args.corpus)
    tok = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))
    t0 = time.time()
    train = tokenize(read_documents(str(corpus / "train.txt.xz")), tok)
    print(f"train tokens {train.numel()} ({time.time() - t0:.0f}s)", flush=True)

    cfg = ModelConfig(
        d_model=args.d_model, n_layer=args.n_layer, vocab_size=len(tok), d_state=args.d_state, layer=args.layer,
        headdim=args.headdim,
    )
    model = MambaLM(cfg).to(device)
    _init(model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (s + 1) / warm if s < warm else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / (args.steps - warm))),
    )
    gen = torch.Generator().manual_seed(args.seed)
    t0, log = time.time(), []
    model.train()
    steps_done = 0
    for step in range(args.steps):
        starts = torch.randint(0, train.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([train[s : s + args.seq_len + 1] for s in starts.tolist()]).to(device)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        steps_done = step + 1
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            log.append({"step": step, "loss": loss.item(), "seconds": time.time() - t0, "stopped": "max-seconds"})
            break
        if step % 100 == 0 or step == args.steps - 1:
            log.append({"step": step, "loss": loss.item(), "seconds": time.time() - t0})
            print(log[-1], flush=True)
    train_seconds = time.time() - t0

    model.eval()
    valid = load_windows(str(corpus / "valid.txt.xz"), tok, 1025, 64)
    with torch.no_grad():
        losses = [
            F.cross_entropy(model(w[None, :-1].to(device)).logits.float()[0], w[1:].to(device)).item() for w in valid
        ]
    valid_loss = sum(losses) / len(losses)
    model.source_dtype = torch.bfloat16
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pruned = _eval_pruned(model, valid, args.eval_flops, corpus, tok) if args.eval_flops else None
    if not args.no_save:
        save(model.cpu(), out / "demo-model", tokenizer=tok, overwrite=True)
    result = {
        "command": " ".join(sys.argv),
        "config": cfg.to_dict(),
        "params": sum(p.numel() for p in model.parameters()),
        "steps": steps_done,
        "steps_planned": args.steps,
        "mamba_ssm_kernels": __import__("simba_compress.backends", fromlist=["x"]).mamba_ssm_available(),
        "batch": args.batch,
        "seq_len": args.seq_len,
        "tokens_seen": steps_done * args.batch * args.seq_len,
        "lr": args.lr,
        "train_seconds": round(train_seconds, 1),
        "valid_loss_64x1024": round(valid_loss, 4),
        "pruned_eval": pruned,
        "log": log,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor(),
        "torch": torch.__version__,
    }
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=2))


def _eval_pruned(model: MambaLM, valid: torch.Tensor, flops: list[float], corpus: Path, tok) -> dict:
    """Headline loss (last 128 protected) dense, Simba at each FLOP ratio, and prompt truncation there.

    Simba runs with the paper's linear schedule where it reaches the ratio, and with the calibrated schedule
    (simba_compress.calibrate: 40 trials, seed 0, on 32 windows of train text) at every ratio.
    """
    from dataclasses import replace

    from simba_compress.calibrate import calibrate
    from simba_compress.errors import SimbaError
    from simba_compress.evaluate import evaluate, evaluate_truncated
    from simba_compress.schedules import linear_for_flops
    from simba_compress.settings import CalibratedSchedule, LinearSchedule

    model.eval()
    calib = load_windows(str(corpus / "train.txt.xz"), tok, 1025, 32)
    rows = {"dense": evaluate(model, valid, 128, simba=None, progress=False).to_dict() | {"position_loss": None}}
    for f in flops:
        schedules = {}
        try:
            schedules["linear"] = linear_for_flops(model.config, LinearSchedule(flops=f, protect_last=128, form="exact"))
        except SimbaError as e:
            rows[f"simba@{f} (linear)"] = {"error": str(e)}
        try:
            cfg = CalibratedSchedule(flops=f, trials=40, seq_len=1024, protect_last=128)
            schedules["calibrated"] = calibrate(model, calib, cfg, progress=False)[0]
        except Exception as e:  # keep the other rows if the search is unavailable
            rows[f"simba@{f} (calibrated)"] = {"error": f"{type(e).__name__}: {e}"}
        for how, sched in schedules.items():
            res = evaluate(model, valid, 128, simba=replace(sched, protect_last=1), progress=False)
            rows[f"simba@{f} ({how})"] = res.to_dict() | {"position_loss": None, "keep": sched.keep}
        rows[f"truncate@{f}"] = evaluate_truncated(model, valid, f, 128, progress=False).to_dict() | {"position_loss": None}
    return rows


@torch.no_grad()
def _init(model: MambaLM) -> None:
    """mamba_ssm's initialisation: dt bias for dt in [1e-3, 1e-1], small embeddings, out_proj scaled by depth
    (Mamba-2: A in [1, 16] per head, as mamba_ssm's Mamba2)."""
    for block in model.backbone.layers:
        mixer = block.mixer
        mamba2 = model.config.layer == "mamba2"
        width = mixer.nheads if mamba2 else mixer.d_inner
        dt = torch.exp(torch.rand(width) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        (mixer.dt_bias if mamba2 else mixer.dt_proj.bias).copy_(dt + torch.log(-torch.expm1(-dt)))
        if mamba2:
            mixer.A_log.copy_(torch.log(torch.empty(width).uniform_(1, 16)))
        else:
            std = mixer.dt_rank**-0.5
            torch.nn.init.uniform_(mixer.dt_proj.weight, -std, std)
        torch.nn.init.kaiming_uniform_(mixer.out_proj.weight, a=math.sqrt(5))
        mixer.out_proj.weight /= math.sqrt(len(model.backbone.layers))
    torch.nn.init.normal_(model.backbone.embeddings.weight, std=0.02)


if __name__ == "__main__":
    main()
