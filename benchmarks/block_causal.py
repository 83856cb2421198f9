"""What a block-causal Simba would cost in quality: the prerequisite for prefix caching and chunked prefill.

Simba ranks a layer's tokens by their impact on the prompt's last position, and keeps a share of the whole
prompt: so which tokens a layer kept (and its state at any point) depends on the prompt's end. A serving
engine that caches prefix states, or prefills a long prompt in chunks, needs the opposite: what a chunk
keeps must be decided from that chunk and what precedes it. The block-causal variant measured here tiles
the prompt into blocks of B tokens; after a scoring layer, every block keeps its share of the tokens the global
schedule keeps of the prompt at that layer (its last token always), ranked by their global impact on the block's
own last token. The protected continuation (the last --protect positions, the headline: README, How quality is
measured) runs through every layer, as generated tokens do. Everything else is the model's own: its layers, the schedule's keep ratios, frozen streams.

The global rows are the model's forward (simba_compress's pruned forward with the continuation protected),
and the run first checks that this script's layer loop, given one block spanning the whole window, gives the
same logits as that forward; the block rows change only where blocks end. FLOP ratios are counted from the
tokens each layer ran on (flops.layer_flops). Differences are paired over the same windows.

    python benchmarks/block_causal.py --data ../shared/corpus/valid.txt.xz --seq-len 1024 --windows 64 \
        --flops 0.6 0.53 --blocks 64 128 256 448 --out benchmarks/results/cpu
Writes block_causal_T{seq_len}.json and .md to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import simba_compress  # noqa: E402
from benchmarks.env import versions  # noqa: E402
from benchmarks.proxies import require  # noqa: E402
from simba_compress import MambaLM, SimbaConfig, load, load_tokenizer  # noqa: E402
from simba_compress.data import load_windows  # noqa: E402
from simba_compress.evaluate import protected  # noqa: E402
from simba_compress.flops import count, layer_flops  # noqa: E402
from simba_compress.layers import MixerContext, norm  # noqa: E402
from simba_compress.schedules import linear_for_flops  # noqa: E402
from simba_compress.settings import LinearSchedule  # noqa: E402


def segments(seq_len: int, protect: int, block: int | None) -> list[tuple[int, int, int]]:
    """(start, end, protected) spans of one window: block None is one span, its last `protect` tokens protected
    (the global forward); else blocks of `block` prompt tokens, each protecting its last token, then the
    continuation, all of it protected."""
    if block is None:
        return [(0, seq_len, protect)]
    prompt = seq_len - protect
    spans = [(s, min(s + block, prompt), 1) for s in range(0, prompt, block)]
    return spans + [(prompt, seq_len, protect)]


def span_counts(simba: SimbaConfig, spans, seq_len: int, protect: int, chunks) -> list[list[int]]:
    """Tokens each layer keeps of each span. One span: the schedule as the model applies it (the protected tail
    inside its counts). Blocks: the same number of tokens per layer as that, the continuation's `protect` among
    them, the rest shared among the prompt's blocks in proportion to their length (each keeps at least its last
    token): the variants differ in which tokens they keep, not in how many."""
    total = protected(simba, protect).counts(torch.tensor([seq_len]), chunks)[:, 0].tolist()
    if len(spans) == 1:
        return [total]
    prompt = seq_len - protect
    share = [max(k - protect, 0) / prompt for k in total]  # of the prompt, per layer (non-increasing)
    out = [[min(e - s, max(p, math.ceil(round(r * (e - s), 6)))) for r in share] for s, e, p in spans[:-1]]
    return out + [[spans[-1][1] - spans[-1][0]] * len(total)]


@torch.no_grad()
def forward_spans(model: MambaLM, ids: torch.Tensor, simba: SimbaConfig, spans) -> tuple[torch.Tensor, list[int]]:
    """Logits (b, l, vocab) with each span pruned on its own: after a layer that scores, a span keeps its top
    tokens by their impact on the span's last kept token. Also the tokens each layer ran on (per row)."""
    if simba.criterion != "simba":
        raise SystemExit("block_causal.py measures the simba criterion")
    b, length = ids.shape
    counts = span_counts(simba, spans, length, spans[-1][2], model.config.scan_chunks)
    n_layer = model.config.n_layer
    h = model.backbone.embeddings(ids).to(torch.float32 if model.config.residual_in_fp32 else model.lm_head.weight.dtype)
    kept = torch.arange(length, device=ids.device).expand(b, length)  # (b, k): positions, in order
    tokens = []
    for layer, block in enumerate(model.backbone.layers):
        width = sum(c[layer] for c in counts)
        assert kept.shape[1] == width
        tokens.append(width)
        index = kept.unsqueeze(-1).expand(-1, -1, h.shape[-1])
        stream = h.gather(1, index)
        x = norm(block.norm, stream, model.backends)
        everyone = torch.full((b,), kept.shape[1] - 1, device=ids.device)
        stream = stream + block.mixer(x, MixerContext(None, everyone, backends=model.backends)).out
        h.scatter_(1, index, stream)
        if layer + 1 == n_layer or all(c[layer + 1] == c[layer] for c in counts):
            continue
        parts, slot = [], 0
        for c, (_, _, protect) in zip(counts, spans):  # spans in order; a span's kept tokens are consecutive slots
            now, nxt = c[layer], c[layer + 1]
            mine = kept[:, slot : slot + now]
            if nxt < now:
                # the span's impacts on its own last token: its tokens and the d_conv - 1 before them (their conv
                # window) are enough, since a token's impact on a later one reads only the steps between them
                lead = min(slot, model.config.d_conv - 1)
                window = x[:, slot - lead : slot + now]
                last = torch.full((b,), window.shape[1] - 1, device=ids.device)
                impact = block.mixer(window, MixerContext(None, last, score="simba", backends=model.backends)).score
                score = impact[:, lead:].float()
                score[:, now - min(protect, now) :] = float("inf")  # its last tokens: always kept
                order = torch.argsort(score, dim=1, descending=True, stable=True)[:, :nxt]
                mine = mine.gather(1, order.sort(dim=1).values)
            parts.append(mine)
            slot += now
        kept = torch.cat(parts, 1)
    h = norm(model.backbone.norm_f, h, model.backends)
    return model.lm_head(h.to(model.lm_head.weight.dtype)), tokens


def tail_losses(logits: torch.Tensor, targets: torch.Tensor, protect: int) -> torch.Tensor:
    """Mean next-token loss over the last `protect` positions, per window."""
    tail = logits[:, -protect:].float()
    return F.cross_entropy(tail.transpose(1, 2), targets[:, -protect:], reduction="none").mean(1)


def flop_ratio(model: MambaLM, tokens: list[int], seq_len: int) -> float:
    """Backbone FLOPs of layers that ran on `tokens` (the score after every layer whose successor runs on fewer)
    against the dense model at seq_len."""
    cfg = model.config
    sparse = sum(layer_flops(cfg, k, "simba" if i + 1 < len(tokens) and tokens[i + 1] < k else None)
                 for i, k in enumerate(tokens))  # fmt: skip
    return sparse / count(cfg, None, seq_len).dense


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="checkpoint folder (default: the l16 proxy, benchmarks/proxies.py)")
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--protect", type=int, default=128)
    ap.add_argument("--flops", type=float, nargs="+", default=[0.6, 0.53])
    ap.add_argument("--form", default="fast", choices=["fast", "exact"], help="the schedule's form (fast: the default)")
    ap.add_argument("--blocks", type=int, nargs="+", default=[64, 128, 256, 448])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="benchmarks/results/cpu")
    args = ap.parse_args()

    t0 = time.time()
    path = Path(args.model) if args.model else require("mamba-proxy-d320-l16")
    model = load(path, device=args.device)
    tok = load_tokenizer(path)
    win = load_windows(args.data, tok, args.seq_len + 1, args.windows)
    batches = [(w[:, :-1].to(args.device), w[:, 1:].to(args.device)) for w in win.split(args.batch_size)]

    def per_window(run) -> torch.Tensor:
        return torch.cat([tail_losses(run(x), y, args.protect).cpu() for x, y in batches]).double()

    dense = per_window(lambda x: model(x, simba=None).logits)
    rows = [dict(method="dense", flops_target=1.0, block=None, flop_ratio=1.0, loss=dense.mean().item(),
                 loss_se=dense.std().item() / math.sqrt(len(dense)), delta=None, delta_se=None)]  # fmt: skip
    check = 0.0
    for f in args.flops:
        simba = linear_for_flops(model.config, LinearSchedule(flops=f, seq_len=args.seq_len, form=args.form))
        head = protected(simba, args.protect)
        base = per_window(lambda x: model(x, simba=head).logits)
        x0 = batches[0][0]
        ours, _ = forward_spans(model, x0, simba, segments(args.seq_len, args.protect, None))
        want = model(x0, simba=head).logits
        check = max(check, (ours[:, -args.protect :] - want[:, -args.protect :]).abs().max().item())
        if check > 1e-3:
            raise SystemExit(f"the span forward differs from the model's by {check} at F = {f}: no measurement")
        rows.append(dict(method="simba, global (the model's forward)", flops_target=f, block=None,
                         flop_ratio=count(model.config, head, args.seq_len).ratio, loss=base.mean().item(),
                         loss_se=base.std().item() / math.sqrt(len(base)), delta=0.0, delta_se=0.0,
                         keep=[round(k, 4) for k in simba.keep]))  # fmt: skip
        for block in args.blocks:
            spans = segments(args.seq_len, args.protect, block)
            tokens = []

            def run(x):
                logits, t = forward_spans(model, x, simba, spans)
                tokens[:] = t
                return logits

            losses = per_window(run)
            diff = losses - base
            rows.append(dict(method="simba, block-causal", flops_target=f, block=block,
                             flop_ratio=flop_ratio(model, tokens, args.seq_len), loss=losses.mean().item(),
                             loss_se=losses.std().item() / math.sqrt(len(losses)), delta=diff.mean().item(),
                             delta_se=diff.std().item() / math.sqrt(len(diff)), tokens=tokens))  # fmt: skip
            print(f"F={f} block={block}: {rows[-1]['loss']:.4f} ({rows[-1]['delta']:+.4f} ± {rows[-1]['delta_se']:.4f})",
                  file=sys.stderr)  # fmt: skip
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU {platform.machine()}"
    meta = dict(command="python " + " ".join(sys.argv), device=device, model=str(path), data=args.data,
                windows=int(win.shape[0]), seq_len=args.seq_len, protect=args.protect, form=args.form,
                span_forward_max_abs_diff=check, seconds=round(time.time() - t0, 1),
                versions=versions("torch", "simba-compress"), simba_compress=simba_compress.__version__)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"block_causal_T{args.seq_len}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(meta, rows))


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# Block-causal Simba, T = {meta['seq_len']}",
        "",
        f"`{meta['command']}`",
        "",
        f"{meta['device']}, torch {meta['versions'].get('torch')}, simba_compress {meta['simba_compress']}; "
        f"{meta['model']}; {meta['windows']} windows of {meta['seq_len']} tokens of {meta['data']}; the last "
        f"{meta['protect']} positions protected and scored (the headline, README: How quality is measured); schedule: the linear schedule in "
        f"the {meta['form']} form at each FLOP target; {meta['seconds']} s. The span forward reproduced the model's "
        f"logits within {meta['span_forward_max_abs_diff']:.2g}.",
        "",
        "Block-causal: the prompt in blocks of B tokens, each keeping its share by impact on its own last token. "
        "Δ: loss minus the global Simba's at the same target, paired over the windows (± its standard error).",
        "",
        "| method | target | block | FLOP ratio | loss | ± | Δ vs global | ± |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        delta = "" if r["delta"] is None else f"{r['delta']:+.4f}"
        dse = "" if r["delta_se"] is None else f"{r['delta_se']:.4f}"
        lines.append(f"| {r['method']} | {r['flops_target']} | {r['block'] or ''} | {r['flop_ratio']:.4f} | "
                     f"{r['loss']:.4f} | {r['loss_se']:.4f} | {delta} | {dse} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
