"""Train the Mamba-2 and the hybrid proxy with the Mamba-1 proxies' recipe, through mamba_ssm itself (GPU).

../shared/models holds pretrained Mamba-1 proxies only (README, Pretrained proxies). Issues 21 and 22 need a pretrained Mamba-2
and a pretrained hybrid (Mamba-2 + attention) of the same family to measure pruning quality on, so this trains
them the way the Mamba-1 proxies were trained: d_model 320, 16 layers, the corpus tokenizer's 8192 tokens,
96M tokens of train.txt.xz (about 6 epochs) in batches of 32 x 1024, AdamW (lr 3e-3, betas 0.9/0.95, weight
decay 0.1 on matrices), 5% warm-up then cosine to 10%, bf16 autocast, gradient clip 1.0, on one GPU with
mamba_ssm's kernels. The model is mamba_ssm's own MambaLMHeadModel, so the checkpoint is written in the
original state-spaces layout (config.json of MambaConfig's fields, pytorch_model.bin: a bf16 state dict), the
layout of state-spaces/mamba2-* and mamba2attn-2.7b, which the project reads like any other such checkpoint.

    --kind mamba2   Mamba-2 layers: d_state 128, headdim 64 (10 heads), 1 group, d_conv 4, expand 2, chunk 256
    --kind hybrid   the same with attention at layers 5 and 11 (mamba_ssm's attn_layer_idx / attn_cfg): 5 query
                    heads of 64, 1 KV head, no positional encoding (as Granite-4.0-H and Jamba), no biases;
                    no MLPs (d_intermediate 0), as mamba2attn-2.7b

    python benchmarks/train_proxy.py --kind mamba2 --corpus ../shared/corpus --out /tmp/proxies
    python benchmarks/train_proxy.py --kind hybrid --corpus ../shared/corpus --out /tmp/proxies --max-seconds 300

Writes OUT/<name>/ (config.json, pytorch_model.bin, the tokenizer, train_proxy.json with the settings, the loss
curve, the held-out loss, time, machine and versions). --max-seconds stops early (the JSON says how many tokens
were seen). --smoke trains a tiny model for a few steps (tests the script; on a CPU through Triton's interpreter).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from pathlib import Path

import env  # benchmarks/env.py

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simba_compress.data import read_documents, tokenize, windows  # noqa: E402

NAMES = {"mamba2": "mamba2-proxy-d320-l16", "hybrid": "hybrid-proxy-d320-l16"}


def mamba_config(kind: str, d_model: int, n_layer: int, vocab: int) -> dict:
    """MambaConfig's fields (mamba_ssm/models/config_mamba.py), as config.json stores them."""
    cfg = {
        "d_model": d_model, "d_intermediate": 0, "n_layer": n_layer, "vocab_size": vocab,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 128, "headdim": 64, "ngroups": 1, "d_conv": 4, "expand": 2,
                    "chunk_size": 256},
        "attn_layer_idx": [], "attn_cfg": {},
        "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8,
        "tie_embeddings": True,
    }
    if kind == "hybrid":
        cfg["attn_layer_idx"] = [n_layer * 5 // 16, n_layer * 11 // 16]  # 5 and 11 of 16
        cfg["attn_cfg"] = {"num_heads": 5, "num_heads_kv": 1, "head_dim": 64, "causal": True, "rotary_emb_dim": 0,
                           "qkv_proj_bias": False, "out_proj_bias": False}
    return cfg


def import_mamba_ssm_triton_only() -> str:
    """Import mamba_ssm for its Triton kernels alone. Mamba-2 and attention layers use none of its CUDA extension
    (the Mamba-1 selective scan), but mamba_ssm 2.3.2 imports that extension when the package is imported (its
    main branch makes it optional: state-spaces/mamba PR #977). Where it was not built, an empty stand-in lets
    the package import; anything that would call it fails loudly. Returns mamba_ssm's version."""
    import types

    try:
        import selective_scan_cuda  # noqa: F401
    except ImportError:
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    import mamba_ssm

    return mamba_ssm.__version__


def build_model(cfg: dict, device: torch.device) -> torch.nn.Module:
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.modules.mamba2 import Mamba2

    model = MambaLMHeadModel(MambaConfig(**cfg), device=device)
    try:  # the memory-efficient path fuses causal_conv1d's CUDA conv: without the package, the plain path
        import causal_conv1d_cuda  # noqa: F401
    except ImportError:
        for m in model.modules():
            if isinstance(m, Mamba2):
                m.use_mem_eff_path = False
    return model


def lr_at(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kind", choices=sorted(NAMES), required=True)
    ap.add_argument("--corpus", required=True, help="folder with train.txt.xz, valid.txt.xz, tokenizer/")
    ap.add_argument("--out", required=True, help="the model folder is written to OUT/<name>")
    ap.add_argument("--tokens", type=float, default=96e6)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--valid-windows", type=int, default=256)
    ap.add_argument("--max-seconds", type=float, default=None, help="stop training after the step that passes it")
    ap.add_argument("--smoke", action="store_true", help="a tiny model, a few steps, on the CPU (tests the script)")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    torch.manual_seed(args.seed)
    corpus, name = Path(args.corpus), NAMES[args.kind]
    tok = AutoTokenizer.from_pretrained(str(corpus / "tokenizer"))
    t0 = time.time()
    train = tokenize(read_documents(str(corpus / "train.txt.xz")), tok)
    valid = windows(tokenize(read_documents(str(corpus / "valid.txt.xz")), tok), args.seq_len + 1, args.valid_windows)
    print(f"{name}: {train.numel()} training tokens ({time.time() - t0:.0f} s to read)", flush=True)

    vocab = len(tok)
    if args.smoke:  # tiny sizes; on a machine without CUDA, Triton's interpreter runs mamba_ssm's kernels
        args.batch, args.seq_len, args.tokens, valid = 2, 64, 2 * 64 * 3, valid[:2, :65]
        cfg = mamba_config(args.kind, 64, 4, vocab)
        cfg["ssm_cfg"].update(d_state=16, headdim=16, chunk_size=32)
        if args.kind == "hybrid":
            cfg["attn_cfg"].update(num_heads=2, head_dim=32)
            cfg["attn_layer_idx"] = [1, 3]
    else:
        cfg = mamba_config(args.kind, 320, 16, vocab)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    mamba_ssm_version = import_mamba_ssm_triton_only()
    model = build_model(cfg, device)
    steps = max(1, round(args.tokens / (args.batch * args.seq_len)))
    warmup = max(1, steps // 20)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s, steps, warmup))
    gen = torch.Generator().manual_seed(args.seed)
    log, done = [], 0
    t0 = time.time()
    model.train()
    for step in range(steps):
        starts = torch.randint(0, train.numel() - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([train[s : s + args.seq_len + 1] for s in starts.tolist()]).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        late = args.max_seconds is not None and time.time() - t0 > args.max_seconds
        if step % 100 == 0 or done == steps or late:
            log.append({"step": done, "loss": round(loss.item(), 4), "lr": round(sched.get_last_lr()[0], 6),
                        "seconds": round(time.time() - t0, 1)})
            print(log[-1], flush=True)
        if late:
            break
    train_seconds = time.time() - t0

    model.eval()
    losses = []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for chunk in valid.split(16):
            chunk = chunk.to(device)
            logits = model(chunk[:, :-1]).logits.float()
            losses.append(F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="none").view(len(chunk), -1).mean(1))
    valid_loss = torch.cat(losses).mean().item()

    folder = Path(args.out) / name
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save(state, folder / "pytorch_model.bin")  # the state-spaces layout (MambaLMHeadModel.save_pretrained)
    (folder / "config.json").write_text(json.dumps(cfg, indent=4) + "\n")
    tok.save_pretrained(str(folder))
    result = {
        "name": name, "kind": args.kind, "command": "python " + shlex.join(sys.argv), "config": cfg,
        "params": sum(p.numel() for p in model.parameters()), "steps": done, "steps_planned": steps,
        "batch": args.batch, "seq_len": args.seq_len, "tokens_seen": done * args.batch * args.seq_len,
        "tokens_planned": steps * args.batch * args.seq_len, "lr": args.lr, "warmup_steps": warmup,
        "train_seconds": round(train_seconds, 1), "valid_loss": round(valid_loss, 4),
        "valid": f"{len(valid)} windows of {args.seq_len} tokens of valid.txt.xz, every position, bf16 autocast",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "versions": env.versions("torch", "triton", "causal_conv1d", "transformers") | {"mamba_ssm": mamba_ssm_version},
        "log": log,
    }
    (folder / "train_proxy.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "log"}), flush=True)


if __name__ == "__main__":
    main()
