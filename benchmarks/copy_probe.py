"""Does a proxy copy a phrase it read far back? The check behind issue 23's choice of a second retrieval probe.

Fact recall (simba_compress/facts.py) needs a proxy fine-tuned to recall facts (passkey_proxy.py --facts, a GPU
run): the plain proxies answer at chance. A probe that needs no fine-tuning would be copying: a span of held-out
text inserted into a haystack at a random depth, its first CUE tokens repeated at the end, and its next ANS tokens
scored against ANS-token spans from elsewhere (4 candidates). If the model copies, the true continuation gains
log-likelihood when the span is in the context; this measures that gain (the same prompt without the span is the
control) and the accuracy with and without the span.

    python benchmarks/copy_probe.py --models ../shared/models/mamba-proxy-d320-l16 \
        ~/.cache/simba-compress/proxies/mamba-proxy-d320-l16-passkey --data ../shared/corpus/valid.txt.xz \
        --length 1024 --samples 24 --out benchmarks/results/cpu/copy_probe
Writes the --out path with .json and .md appended.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import env  # benchmarks/env.py

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import simba_compress as sc  # noqa: E402
from simba_compress.data import load_windows  # noqa: E402
from simba_compress.facts import answer_logprobs  # noqa: E402

CUE, ANS = 10, 6  # tokens repeated at the end; tokens scored after them


def sample(stream: torch.Tensor, sep: torch.Tensor, length: int, seed: int):
    """(prompt with the span, the same prompt without it, the 4 candidates with the true one first)."""
    r = random.Random(seed)

    def span(n: int) -> torch.Tensor:
        s = r.randrange(stream.numel() - n)
        return stream[s : s + n]

    sent = span(CUE + ANS + 4)
    candidates = (sent[CUE : CUE + ANS],) + tuple(span(ANS) for _ in range(3))
    hay = span(length - sent.numel() - sep.numel() - CUE)
    at = int(hay.numel() * (0.1 + 0.8 * r.random()))
    with_span = torch.cat([hay[:at], sent, hay[at:], sep, sent[:CUE]])
    without = torch.cat([hay, sep, sent[:CUE]])
    return with_span, without, candidates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", required=True, help="model folders")
    ap.add_argument("--data", required=True, help="held-out text (.txt.xz)")
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--out", required=True, help="output path without extension")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for folder in args.models:
        t0 = time.time()
        model, tok = sc.load(folder).eval(), sc.load_tokenizer(folder)
        stream = load_windows(args.data, tok, 4096, 64).flatten()
        sep = torch.tensor(tok("\n\n", add_special_tokens=False)["input_ids"])
        gains, right, right_without = [], 0, 0
        for i in range(args.samples):
            with_span, without, candidates = sample(stream, sep, args.length, i)
            a = answer_logprobs(model, with_span[None], candidates, None)
            b = answer_logprobs(model, without[None], candidates, None)
            gains.append(a[0] - b[0])
            right += a[0] > max(a[1:])
            right_without += b[0] > max(b[1:])
        rows.append({"model": Path(folder).name, "length": args.length, "samples": args.samples,
                     "accuracy_with_span": round(right / args.samples, 3),
                     "accuracy_without_span": round(right_without / args.samples, 3),
                     "mean_gain_nats": round(statistics.mean(gains), 3),
                     "median_gain_nats": round(statistics.median(gains), 3),
                     "samples_gaining_over_1_nat": sum(g > 1 for g in gains), "seconds": round(time.time() - t0, 1)})
        print(rows[-1], flush=True)
    meta = {"command": "python " + shlex.join(sys.argv), "machine": f"CPU {platform.machine()}, {os.cpu_count()} cores, 1 thread",
            "versions": env.versions("torch")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# Copy probe: does the proxy copy a span it read earlier?", "",
             f"Command: `{meta['command']}`", f"Machine: {meta['machine']}; torch {meta['versions'].get('torch')}",
             "", f"A {CUE + ANS + 4}-token span of held-out text inserted at a random depth (10-90%), its first {CUE} "
             f"tokens repeated at the end; its next {ANS} tokens scored against 3 spans from elsewhere. Gain: the true "
             "continuation's log-likelihood with the span in the prompt minus without it.", "",
             "| model | length | samples | accuracy with span | without | mean gain (nats) | median gain | gaining > 1 nat |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['length']} | {r['samples']} | {r['accuracy_with_span']} | {r['accuracy_without_span']} "
              f"| {r['mean_gain_nats']} | {r['median_gain_nats']} | {r['samples_gaining_over_1_nat']} |" for r in rows]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
