"""The passkey proxy: a pretrained proxy fine-tuned to retrieve a passkey from real text (issue 14).

The pretrained proxies barely recall far-away text (benchmarks/RESULTS.md, Long context), so whether pruning keeps far-away information
can only be asked of a model that retrieves at all. This fine-tunes a dense proxy (l16, l9) on passkey samples
(simba_compress.passkey) of 256 to 1024 tokens, the proxies' training length, whose haystacks are training
text, mixed with plain next-token loss on training windows so that it stays a language model; it writes a
loadable folder (simba_compress.save) with MODEL_CARD.md. The folder (27 MB for l16) is not committed: this
script rebuilds it, deterministically up to the GPU's nondeterministic scan backward.

    python benchmarks/passkey_proxy.py --base ../shared/models/mamba-proxy-d320-l16 \
        --train ../shared/corpus/train.txt.xz --valid ../shared/corpus/valid.txt.xz --out out/passkey-l16

benchmarks/long_context.py builds the proxies the same way (build()) inside its own run, since a model cannot
come back from the GPU machine.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import env  # benchmarks/env.py (this folder is the script's path)

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simba_compress import load, load_tokenizer, save  # noqa: E402
from simba_compress.data import read_documents, tokenize, windows  # noqa: E402
from simba_compress.evaluate import evaluate  # noqa: E402
from simba_compress.facts import TRAIN_TEMPLATES, FactTask, evaluate_facts  # noqa: E402
from simba_compress.passkey import PasskeyTask, evaluate_passkey  # noqa: E402

EVAL_DEPTHS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


@dataclass
class ProxyConfig:
    steps: int = 600
    batch: int = 8  # passkey samples per step, all of one length
    lm_batch: int = 8  # plain training windows per step (next-token loss on every position)
    lengths: tuple[int, ...] = (256, 512, 768, 1024)  # passkey lengths, one drawn per step: at most the training length
    lm_len: int = 1024
    lm_weight: float = 1.0
    lr: float = 3e-4
    warmup: int = 30  # linear warm-up, then cosine to lr * 0.1
    weight_decay: float = 0.1  # on matrices (not A_log), as the proxies were trained
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 200
    eval_samples: int = 8  # per depth (EVAL_DEPTHS) of the held-out passkey check, at the longest length
    facts: int = 0  # fact-recall samples per step (simba_compress.facts, TRAIN_TEMPLATES); 0: the passkey proxy



def versions() -> dict:
    return env.versions("torch", "transformers", "triton", "mamba_ssm", "causal_conv1d")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"


def spread_text(path: str, tokenizer, pieces: int, chars: int) -> list[torch.Tensor]:
    """`pieces` token runs of about `chars` characters each, from evenly spread line starts of the text in
    `path`: a sample of every source of a corpus whose sources follow one another (corpus/SOURCES.md). A .pt file
    is such a sample saved by --save-pieces (5 MB to carry to a GPU machine instead of the 12 MB corpus)."""
    if path.endswith(".pt"):
        saved = torch.load(path, weights_only=True)
        if (saved["pieces"], saved["chars"]) != (pieces, chars):
            raise SystemExit(f"{path}: {saved['pieces']} pieces of {saved['chars']} characters, not {pieces} of {chars}")
        return [t.long() for t in saved["tokens"]]
    text = "\n".join(read_documents(path))
    step = max(1, (len(text) - chars) // pieces)
    parts = [text[s : s + chars] for s in (text.find("\n", i * step) + 1 for i in range(pieces))]
    return [torch.tensor(ids, dtype=torch.long) for ids in tokenizer(parts, add_special_tokens=False)["input_ids"]]


def valid_stream(path: str, tokenizer) -> torch.Tensor:
    return tokenize(read_documents(path), tokenizer)


def _lr(cfg: ProxyConfig, step: int) -> float:
    if step < cfg.warmup:
        return (step + 1) / (cfg.warmup + 1)
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def passkey_loss(model, samples, device) -> torch.Tensor:
    """Next-token loss on the answer tokens of passkey samples of one length (teacher-forced)."""
    k = max(s.answer for s in samples) + 1
    ids = torch.stack([s.ids for s in samples]).to(device)
    logits = model(ids, simba=None, last_logits=k).logits.float()  # (b, k, vocab): position L - k + j
    mask = torch.zeros(len(samples), k, dtype=torch.bool)
    for r, s in enumerate(samples):
        mask[r, k - s.answer - 1 : k - 1] = True
    targets = ids[:, -k:].roll(-1, dims=1)  # position j predicts token j + 1
    return F.cross_entropy(logits[mask.to(device)], targets[mask.to(device)])


def fact_loss(model, samples, device) -> torch.Tensor:
    """Next-token loss on the true answer's tokens after fact-recall samples of one length (teacher-forced; the
    answers, of different lengths, are right-padded: causal, so the padding changes no scored position)."""
    answers = [s.answers[0] for s in samples]
    longest, length = max(a.numel() for a in answers), samples[0].length
    ids = torch.zeros(len(samples), length + longest, dtype=torch.long)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for r, (s, a) in enumerate(zip(samples, answers)):
        ids[r, :length], ids[r, length : length + a.numel()] = s.ids, a
        mask[r, length - 1 : length - 1 + a.numel()] = True  # position j predicts token j + 1
    ids, mask = ids.to(device), mask.to(device)
    logits = model(ids, simba=None, last_logits=longest + 1).logits.float()
    targets = ids[:, -longest - 1 :].roll(-1, dims=1)
    return F.cross_entropy(logits[mask[:, -longest - 1 :]], targets[mask[:, -longest - 1 :]])


def held_out(model, task: PasskeyTask, valid_windows: torch.Tensor, cfg: ProxyConfig, device, facts=None) -> dict:
    """Passkey accuracy on held-out text at the longest training length, and next-token loss on valid windows;
    with a FactTask `facts` (held-out text, held-out templates), fact-recall accuracy at that length too."""
    model.eval()
    with _autocast(device):
        pk = evaluate_passkey(model, task.samples(max(cfg.lengths), EVAL_DEPTHS, cfg.eval_samples, seed=0))
        lm = evaluate(model, valid_windows, protect=128, batch_size=8, simba=None, progress=False)
        fr = None if facts is None else evaluate_facts(model, facts.samples(max(cfg.lengths), EVAL_DEPTHS, cfg.eval_samples))
    model.train()
    out = {"passkey_accuracy": round(pk.accuracy, 4), "valid_loss": round(lm.all_position_loss, 4),
           "valid_loss_last128": round(lm.loss, 4)}
    if fr is not None:
        out["fact_accuracy"] = round(fr.accuracy, 4)
    return out


def build(base: str, out: Path, cfg: ProxyConfig, train_pieces: list[torch.Tensor], valid: torch.Tensor, tokenizer,
          device: torch.device, command: str, log=print, max_seconds: float | None = None) -> dict:
    """Fine-tune the dense model at `base` on passkey + next-token loss; save it to `out` with MODEL_CARD.md and
    passkey_proxy.json; return the summary. train_pieces: training text (spread_text); valid: held-out stream.
    max_seconds: stop after the step that passes it (the card says how many steps ran)."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    train_task = PasskeyTask(tokenizer, torch.cat(train_pieces))
    valid_task = PasskeyTask(tokenizer, valid)
    # fact recall: training templates on training text; the held-out check on held-out text with held-out templates
    train_facts = FactTask(tokenizer, torch.cat(train_pieces), templates=TRAIN_TEMPLATES) if cfg.facts else None
    valid_facts = FactTask(tokenizer, valid) if cfg.facts else None
    valid_windows = windows(valid, cfg.lm_len + 1, 32)
    lm_pieces = [p for p in train_pieces if p.numel() > cfg.lm_len + 1]
    model = load(base, device=device)  # float32 master weights; bf16 inside autocast on CUDA
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and not n.endswith("A_log")]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and not n.endswith("A_log"))]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr(cfg, s))
    history = [{"step": 0, **held_out(model, valid_task, valid_windows, cfg, device, valid_facts)}]
    log(f"passkey proxy {Path(base).name}: before {history[0]}")
    for step in range(1, cfg.steps + 1):
        length = rng.choice(cfg.lengths)
        samples = [train_task.sample(length, rng.random(), f"train:{cfg.seed}:{step}:{i}") for i in range(cfg.batch)]
        lm = []
        for _ in range(cfg.lm_batch):
            piece = rng.choice(lm_pieces)
            s = rng.randrange(piece.numel() - cfg.lm_len - 1)
            lm.append(piece[s : s + cfg.lm_len + 1])
        lm = torch.stack(lm).to(device)
        with _autocast(device):
            pk_loss = passkey_loss(model, samples, device)
            logits = model(lm[:, :-1], simba=None).logits.float()
            lm_loss = F.cross_entropy(logits.flatten(0, 1), lm[:, 1:].flatten())
            loss = pk_loss + cfg.lm_weight * lm_loss
            if train_facts is not None:
                recall = [train_facts.sample(length, rng.random(), f"train:{cfg.seed}:{step}:{i}") for i in range(cfg.facts)]
                loss = loss + fact_loss(model, recall, device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        out_of_time = max_seconds is not None and time.time() - t0 > max_seconds
        if step % cfg.eval_every == 0 or step == cfg.steps or out_of_time:
            history.append({"step": step, "passkey_loss": round(pk_loss.item(), 4), "lm_loss": round(lm_loss.item(), 4),
                            **held_out(model, valid_task, valid_windows, cfg, device, valid_facts),
                            "seconds": round(time.time() - t0, 1)})
            log(f"  step {step}: {history[-1]}")
        if out_of_time:
            log(f"  stopped after step {step} of {cfg.steps}: past {max_seconds} s")
            break
    model.eval()
    summary = {"name": out.name, "base": str(base), "config": asdict(cfg), "device": device_name(device), "versions": versions(),
               "command": command, "seconds": round(time.time() - t0, 1), "steps_done": history[-1]["step"],
               "before": history[0], "after": history[-1],
               "history": history, "train_tokens": int(sum(p.numel() for p in train_pieces)),
               "train_pieces": len(train_pieces)}
    save(model, out, tokenizer=tokenizer, overwrite=True,
         files={"MODEL_CARD.md": model_card(summary), "passkey_proxy.json": json.dumps(summary, indent=1) + "\n"})
    log(f"passkey proxy written to {out} in {summary['seconds']} s")
    return summary


def model_card(s: dict) -> str:
    c, b, a = s["config"], s["before"], s["after"]
    name = Path(s["base"]).name
    return "\n".join([
        f"# {s.get('name', name + '-passkey')}",
        "",
        f"{name} (../shared/models, pretrained at 1024 tokens) fine-tuned densely to retrieve a passkey, by "
        "`benchmarks/passkey_proxy.py` (issue 14: long context). Not committed (tens of MB): the command below rebuilds it.",
        "",
        "**Task** (`simba_compress/passkey.py`): a task line, a haystack of real text with the needle \"The pass key is "
        "X. Remember it. X is the pass key.\" (X: 5 random digits) at a uniform random depth, the question \"What is "
        "the pass key? The pass key is\", the answer \" X\". Loss: next-token loss on the answer tokens.",
        "",
        f"**Data**: {s['train_tokens']} tokens of `train.txt.xz`, {s['train_pieces']} pieces read from evenly spread "
        "line starts (its sources follow one another, so every source is in them), serve as haystacks and as the "
        "plain windows; the held-out checks use `valid.txt.xz` only.",
        "",
        *([f"**Fact recall** (`simba_compress/facts.py`, `--facts`): each step also {c['facts']} samples of a fact "
           "stated once in training text and asked about at the end, from TRAIN_TEMPLATES (relations, wordings and "
           "answers the evaluation's TEMPLATES do not use); loss on the true answer's tokens.", ""]
          if c.get("facts") else []),
        f"**Training**: {s['steps_done']} steps (of {c['steps']} planned); each step {c['batch']} passkey samples of one length drawn from "
        f"{list(c['lengths'])} tokens (never past the training length) plus {c['lm_batch']} plain windows of "
        f"{c['lm_len']} tokens (next-token loss on every position, weight {c['lm_weight']}); AdamW lr {c['lr']} "
        f"(betas 0.9/0.95, weight decay {c['weight_decay']} on matrices), {c['warmup']} warm-up steps then cosine to "
        f"10%, gradient clip {c['grad_clip']}, bf16 autocast on CUDA, seed {c['seed']}; {s['seconds']} s on "
        f"{s['device']}.",
        "",
        "| held out (`valid.txt.xz`) | before | after |",
        "|---|---:|---:|",
        f"| passkey exact match, {max(c['lengths'])} tokens, depths 0.1-0.9 x {c['eval_samples']} | "
        f"{b['passkey_accuracy']:.3f} | {a['passkey_accuracy']:.3f} |",
        *([f"| fact recall (held-out templates), {max(c['lengths'])} tokens, 4 choices, depths 0.1-0.9 x "
           f"{c['eval_samples']} | {b['fact_accuracy']:.3f} | {a['fact_accuracy']:.3f} |"] if "fact_accuracy" in a else []),
        f"| next-token loss, 32 windows of {c['lm_len']}, every position | {b['valid_loss']:.4f} | {a['valid_loss']:.4f} |",
        f"| the same, last 128 positions | {b['valid_loss_last128']:.4f} | {a['valid_loss_last128']:.4f} |",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in s["versions"].items() if v) + ".",
        "",
        "```",
        s["command"],
        "```",
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the dense proxy folder to fine-tune")
    ap.add_argument("--train", required=True, help="training text (haystacks and plain windows), or its pieces (.pt)")
    ap.add_argument("--valid", help="held-out text for the checks")
    ap.add_argument("--out", help="folder to write (replaced if it exists)")
    ap.add_argument("--save-pieces", help="only save the pieces of --train the run reads, tokenized, to this .pt file")
    ap.add_argument("--steps", type=int, default=ProxyConfig.steps)
    ap.add_argument("--lr", type=float, default=ProxyConfig.lr)
    ap.add_argument("--seed", type=int, default=ProxyConfig.seed)
    ap.add_argument("--facts", type=int, default=0, help="fact-recall samples per step (the recall proxy: 8)")
    ap.add_argument("--train-pieces", type=int, default=128, help="pieces of 64K characters of --train")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--smoke", action="store_true", help="a few tiny steps, to test the script on a CPU")
    args = ap.parse_args()
    cfg = ProxyConfig(steps=args.steps, lr=args.lr, seed=args.seed, facts=args.facts)
    pieces, chars = args.train_pieces, 1 << 16
    if args.smoke:
        cfg = ProxyConfig(steps=2, batch=2, lm_batch=2, lengths=(128, 160), lm_len=128, eval_every=1, eval_samples=1,
                          seed=args.seed, facts=min(args.facts, 2))
        pieces, chars = 4, 4096
    tok = load_tokenizer(args.base)
    train = spread_text(args.train, tok, pieces, chars)
    if args.save_pieces:
        tokens = [t.to(torch.int16) for t in train]  # a vocabulary of 8192
        torch.save({"pieces": pieces, "chars": chars, "source": Path(args.train).name, "tokens": tokens}, args.save_pieces)
        return
    if not (args.valid and args.out):
        raise SystemExit("--valid and --out are needed to build the proxy")
    device = torch.device(args.device)
    build(args.base, Path(args.out), cfg, train, valid_stream(args.valid, tok), tok, device, "python " + shlex.join(sys.argv))


if __name__ == "__main__":
    main()
