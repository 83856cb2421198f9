"""Issue 23, the research stage: candidate pruning criteria written as functions of a layer's quantities, plugged
into the model without changing it, measured on the passkey proxy against truncation, Simba and the oracle.

A candidate is a function of what a Mamba-1 layer computed on its current tokens (`Layer`: x, dt, A, B, C of the
scan, the block's output stream, the protected positions, the token ids) returning one score per slot. The study
captures those quantities by wrapping the scan the mixer calls (mamba1.selective_scan) and registers each candidate
as a criterion for the run (pruning.CRITERIA / CRITERION_FNS), so the model's own pruned forward ranks, selects and
freezes tokens exactly as it does for its built-in criteria. The winners become criteria of the project
(pruning.py); this script is what chose them, and it stays to show how.

    python benchmarks/criteria_study.py ranks --model PASSKEY_PROXY --lengths 1024 4096   # dense: where the key ranks
    python benchmarks/criteria_study.py passkey --model PASSKEY_PROXY --lengths 1024 2048 4096 --out DIR

PASSKEY_PROXY: the l16 passkey proxy, found by benchmarks/proxies.py (find("mamba-proxy-d320-l16-passkey"): unpack
what benchmarks/passkey_proxy.py built on a GPU machine with `python benchmarks/proxies.py PART...`), or any folder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import simba_compress.flops as flops_mod  # noqa: E402
import simba_compress.mamba1 as mamba1_mod  # noqa: E402
import simba_compress.pruning as pruning  # noqa: E402
from simba_compress import load, load_tokenizer  # noqa: E402
from simba_compress.layers import norm  # noqa: E402
from simba_compress.pruning import SimbaConfig, TokenPlan  # noqa: E402


@dataclass
class Layer:
    """What a candidate sees after layer `index` ran on its slots (b rows, w slots, d channels, n states)."""

    index: int
    x: torch.Tensor  # (b, w, d) the scan's input (after conv and SiLU)
    dt: torch.Tensor  # (b, w, d) softplus step sizes
    A: torch.Tensor  # (d, n) < 0
    B: torch.Tensor  # (b, w, n)
    C: torch.Tensor  # (b, w, n)
    hidden: torch.Tensor  # (b, w, d_model) the residual stream after the block
    real: torch.Tensor  # (b, w) bool
    tail: torch.Tensor  # (b, w) bool: the protected positions (what the prompt's end will ask with)
    last: torch.Tensor  # (b,) slot of the last real token
    ids: torch.Tensor  # (b, w) token id of each slot (0 on padding)
    idx: torch.Tensor  # (b, w) original position of each slot
    keep_next: float  # fraction of the row the next layer keeps
    keep_here: float  # fraction this layer ran on
    model: object


# --- capture ---------------------------------------------------------------------------------------------------------


class Capture:
    """Wraps the scan the Mamba-1 mixer calls to keep its last inputs; holds the batch's token ids."""

    def __init__(self):
        self.scan_inputs = None
        self.ids: torch.Tensor | None = None
        self.model = None

    @contextmanager
    def active(self, model, candidates: dict[str, Callable]):
        scan, view, crit = mamba1_mod.selective_scan, TokenPlan.view, pruning.CRITERIA

        def wrapped(x, dt, A, B, C, h0=None, last=None):
            self.scan_inputs = (x, dt, A, B, C)
            return scan(x, dt, A, B, C, h0, last)

        def view_with_plan(plan, layer, hidden, impact):
            v = view(plan, layer, hidden, impact)
            v.plan = plan
            return v

        def save_ids(module, inputs):
            self.ids = inputs[0]

        hook = model.backbone.embeddings.register_forward_pre_hook(save_ids)
        costs = flops_mod.score_flops  # a candidate is counted at Simba's cost here (the project's criteria count their own)
        flops_mod.score_flops = lambda cfg, c: costs(cfg, "simba" if c in candidates else c)
        mamba1_mod.selective_scan = wrapped
        TokenPlan.view = view_with_plan
        pruning.CRITERIA = crit + tuple(candidates)
        for name, fn in candidates.items():
            pruning.CRITERION_FNS[name] = self._criterion(fn)
        self.model = model
        try:
            yield self
        finally:
            hook.remove()
            flops_mod.score_flops = costs
            mamba1_mod.selective_scan, TokenPlan.view, pruning.CRITERIA = scan, view, crit
            for name in candidates:
                pruning.CRITERION_FNS.pop(name, None)

    def layer(self, view, plan: TokenPlan) -> Layer:
        x, dt, A, B, C = self.scan_inputs
        protect = plan.simba.protect_last if plan.simba is not None else 1
        tail = plan.real & (plan.idx >= (plan.end - protect)[:, None])
        ids = torch.cat([self.ids, self.ids.new_zeros(self.ids.shape[0], 1)], 1).gather(1, plan.idx)
        n = plan.n_real.clamp_min(1).float()
        here = float((plan.real.sum(1) / n).mean())
        nxt = float(((view.target if torch.is_tensor(view.target) else torch.tensor(view.target)) / n).mean())
        return Layer(view.layer, x, dt, A, B, C, view.hidden, plan.real, tail, view.last, ids, plan.idx, nxt, here,
                     self.model)

    def _criterion(self, fn):
        def criterion(view, seed):
            return fn(self.layer(view, view.plan))

        return criterion


CAPTURE = Capture()


# --- candidate scores --------------------------------------------------------------------------------------------------

CHUNK = 1 << 22


def _suffix(dt: torch.Tensor) -> torch.Tensor:
    """S_end - S_t over the row (b, w, d): the decay exponent to the row's end, float64 then float32."""
    d = dt.double()
    return (d.flip(1).cumsum(1).flip(1) - d).float()


def impacts(L: Layer, queries: torch.Tensor, scale: float = 1.0, reduce: str = "max") -> torch.Tensor:
    """|dy_q(t)[d]| of token t on each query slot q (queries (b, w) bool, every row the same count), the decay
    exponent times `scale` (1: the dense row; 0: no decay), max (or sum) over the queries: (b, w, d) float32."""
    b, w, d = L.x.shape
    n = L.A.shape[-1]
    u = (L.dt * L.x).float().abs()
    S = L.dt.double().cumsum(1)  # (b, w, d)
    out = L.x.new_zeros(b, w, d, dtype=torch.float32)
    qs = [torch.nonzero(queries[r]).flatten() for r in range(b)]
    nq = max(len(q) for q in qs)
    step = max(1, CHUNK // max(1, w * d * n))
    A = L.A.float()
    for r in range(b):
        for q in qs[r].tolist():
            cb_all = L.B[r].float() * L.C[r, q].float()  # (w, n)
            gap = (S[r, q] - S[r]).clamp_min(0).float() * scale  # (w, d) S_q - S_t
            for c0 in range(0, q + 1, step):
                c1 = min(q + 1, c0 + step)
                dec = torch.exp(gap[c0:c1].unsqueeze(-1) * A)  # (c, d, n)
                v = torch.einsum("cdn,cn->cd", dec, cb_all[c0:c1]).abs() * u[r, c0:c1]
                if reduce == "max":
                    out[r, c0:c1] = torch.maximum(out[r, c0:c1], v)
                else:
                    out[r, c0:c1] += v / nq
    return out


def tail_of(L: Layer) -> torch.Tensor:
    return L.tail


def last_only(L: Layer) -> torch.Tensor:
    q = torch.zeros_like(L.real)
    q[torch.arange(q.shape[0]), L.last] = True
    return q


def s_simba(L):  # the reference: max_d |dy_T(t)|, T the last position
    return impacts(L, last_only(L)).amax(-1)


def s_tail_max(L):  # max over every protected position
    return impacts(L, tail_of(L)).amax(-1)


def s_tempered(L):  # decay through the kept tokens only: S scaled by the next layer's keep
    return impacts(L, tail_of(L), scale=L.keep_next / max(L.keep_here, 1e-6)).amax(-1)


def s_nodecay(L):  # content match: max_q |C_q . B_t| max_d |dt x|
    cb = torch.einsum("bwn,bqn->bwq", L.B.float(), L.C.float())
    cb = cb.abs().masked_fill(~L.tail[:, None, :], 0).amax(-1)
    return cb * (L.dt * L.x).float().abs().amax(-1)


def s_share_tail(L):  # per-channel shares of the tail impact (share, over the tail)
    per = impacts(L, tail_of(L))
    return (per / per.sum(1, keepdim=True).clamp_min(1e-30)).amax(-1)


def s_slow(L, horizon: float = 1.0):
    """Only the channels whose slowest state keeps at least e^-horizon of a token across the whole row."""
    S_total = L.dt.float().sum(1)  # (b, d)
    reach = (L.A.float().abs().amin(-1)[None] * S_total)  # (b, d)
    per = impacts(L, tail_of(L))
    slow = reach <= horizon
    return per.masked_fill(~slow[:, None, :], 0).amax(-1)


def s_state_share(L):
    """Per state slot (d, n): token t's share of the slot's total |contribution| at the end of the row, times the
    weight the tail reads the slot with, max over slots."""
    b, w, d = L.x.shape
    A = L.A.float()
    u = (L.dt * L.x).float()
    gap = _suffix(L.dt)  # (b, w, d)
    cq = L.C.float().masked_fill(~L.tail[..., None], 0).abs().amax(1)  # (b, n) the tail's read weight
    out = L.x.new_zeros(b, w, dtype=torch.float32)
    for r in range(b):
        contrib = (torch.exp(gap[r].unsqueeze(-1) * A) * (u[r].unsqueeze(-1) * L.B[r].float().unsqueeze(1))).abs()
        share = contrib / contrib.sum(0, keepdim=True).clamp_min(1e-30)  # (w, d, n)
        out[r] = (share * cq[r]).flatten(1).amax(-1)
    return out


def s_surprisal(L):
    """-log p(token t | the stream at t - 1 after this layer), through norm_f and the LM head (logit lens)."""
    m = L.model
    h = norm(m.backbone.norm_f, L.hidden)
    logp = F.log_softmax(m.lm_head(h.to(m.lm_head.weight.dtype)).float(), -1)  # (b, w, vocab)
    nxt = logp[:, :-1].gather(-1, L.ids[:, 1:, None]).squeeze(-1)  # predicted at slot s for the token in slot s + 1
    out = torch.full(L.real.shape, float("inf"), device=L.x.device)
    out[:, 1:] = -nxt
    return out


def s_utr(L):
    return L.hidden.float().clamp(min=0).sum(-1)


def pooled(fn, width: int = 8):
    """fn's scores max-pooled over +-width slots: a token next to a high-scoring one scores as high (SnapKV pools
    its attention scores so that a kept key keeps its neighbours)."""

    def score(L: Layer) -> torch.Tensor:
        s = fn(L).float().masked_fill(~L.real, float("-inf"))
        s = torch.where(torch.isinf(s) & (s > 0), torch.finfo(torch.float32).max, s)
        return F.max_pool1d(s[:, None], 2 * width + 1, 1, width)[:, 0]

    return score


def s_lexical(L):
    """Tokens of the question, in the prompt: each token whose id occurs in the tail, weighted by the inverse of how
    often the id occurs in the row (a word the question shares with few places points at them)."""
    ids = L.ids.masked_fill(~L.real, -1)
    b, w = ids.shape
    out = torch.zeros(b, w, device=ids.device)
    for r in range(b):
        vocab, inverse, counts = torch.unique(ids[r], return_inverse=True, return_counts=True)
        in_tail = torch.zeros(len(vocab), dtype=torch.bool, device=ids.device)
        in_tail[inverse[L.tail[r]]] = True
        out[r] = torch.where(in_tail[inverse], 1.0 / counts[inverse].float(), 0.0)
    return out


def s_snap(L, tau: float = 0.05):
    """SnapKV's score with the layer's own stream as queries and keys: each tail position's softmax over the
    row of cosine similarities / tau, summed over the tail (the attention mass the question would pay each token)."""
    h = F.normalize(L.hidden.float(), dim=-1)
    out = torch.zeros(L.real.shape, device=h.device)
    for r in range(h.shape[0]):
        sim = (h[r, L.tail[r]] @ h[r].T / tau).masked_fill(~L.real[r], float("-inf"))  # (q, w)
        out[r] = sim.softmax(-1).sum(0)
    return out


CANDIDATES: dict[str, Callable[[Layer], torch.Tensor]] = {
    "c_simba": s_simba,
    "tail_max": s_tail_max,
    "tempered": s_tempered,
    "nodecay": s_nodecay,
    "share_tail": s_share_tail,
    "slow": s_slow,
    "state_share": s_state_share,
    "surprisal": s_surprisal,
    "c_utr": s_utr,
    "lexical": s_lexical,
    "nodecay_pool": pooled(s_nodecay),
    "lexical_pool": pooled(s_lexical),
    "surprisal_pool": pooled(s_surprisal),
    "tempered_pool": pooled(s_tempered),
    "snap": s_snap,
    "snap_pool": pooled(s_snap),
}


# --- dense ranks -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def dense_layers(model, ids: torch.Tensor, protect: int, keep: list[float]):
    """Yield a Layer for every layer of the dense forward of ids (b, l); keep_next / keep_here as if the schedule
    `keep` ran (for the candidates that read them)."""
    b, length = ids.shape
    simba = SimbaConfig([1.0] * model.config.n_layer, "simba", protect)
    plan = TokenPlan(None, b, length, simba, ids.device)
    h, mixed = model.backbone.embeddings(ids).to(model._stream_dtype), None
    n = model.config.n_layer
    for i in range(n):
        h, mixed, _, _ = model._layer(i, h, mixed, plan, None, False, owned=True)
        h, mixed = h + mixed, None
        view = pruning.LayerView(i, h, None, plan.last, plan.real, length, plan.idx, plan.end)
        L = CAPTURE.layer(view, plan)
        L.keep_here, L.keep_next = keep[i], keep[min(i + 1, n - 1)]
        yield L


def rank_quantile(scores: torch.Tensor, span: tuple[int, int], n: int, best: bool) -> float:
    """Rank quantile (0 = top) among the first n positions of the best (or worst) ranked token in span."""
    order = scores[:n].argsort(descending=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n)
    r = rank[span[0] : span[1]]
    return (r.min() if best else r.max()).item() / n


def cmd_ranks(args) -> None:
    from passkey_proxy import valid_stream

    from simba_compress.passkey import PasskeyTask

    from simba_compress.schedules import linear_for_flops

    model = load(args.model)
    tok = load_tokenizer(args.model)
    task = PasskeyTask(tok, valid_stream(args.valid, tok))
    names = args.candidates or list(CANDIDATES)
    with CAPTURE.active(model, {}):
        for length in args.lengths:
            keep = linear_for_flops(model.config, args.budget, length).keep
            samples = task.samples(length, args.depths, args.per_depth, seed=1)
            res = {c: [[] for _ in range(model.config.n_layer)] for c in names}
            for s in samples:
                for L in dense_layers(model, s.ids[None], s.tail, keep):
                    for c in names:
                        sc = CANDIDATES[c](L)[0]
                        n = s.length - s.tail
                        res[c][L.index].append((rank_quantile(sc, s.needle, n, True),
                                                rank_quantile(sc, s.keys[0], n, False)))
            print(f"\n== length {length}: per layer, needle's best token / key's worst token rank quantile (0 = top)")
            print("layer " + " ".join(f"{c:>16s}" for c in names))
            for layer in range(model.config.n_layer):
                cells = []
                for c in names:
                    v = torch.tensor(res[c][layer])
                    cells.append(f"{v[:, 0].mean():.2f}/{v[:, 1].mean():.2f}".rjust(16))
                print(f"{layer:5d} " + " ".join(cells))


# --- pruned runs ------------------------------------------------------------------------------------------------------


def mixed(content: str, recent: float):
    """`recent` of each layer's budget to the most recent tokens, the rest by `content` (a candidate's name)."""
    fn = candidate(content)

    def score(L: Layer) -> torch.Tensor:
        s = fn(L).float()
        from_end = L.real.flip(1).cumsum(1).flip(1)  # real slots at or after each slot
        n = L.real.sum(1, keepdim=True).float()
        window = L.real & (from_end <= torch.ceil(recent * L.keep_next * n))
        return s.masked_fill(window, float("inf"))

    return score


def oracle(name: str, span: tuple[int, int]):
    """"oracle": the span always kept; "oracle@K": kept by the layers up to K only (then Simba's ranking alone)."""
    from long_context import forcing, needle

    until = int(name.split("@")[1]) if "@" in name else 1 << 30
    force = needle(span)
    return forcing(lambda plan, layer: force(plan, layer) & (layer <= until))


def ranks(s: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Each slot's rank quantile in its row under scores s: 1 for the top real slot, 0 for the bottom."""
    s = s.float().masked_fill(~real, float("-inf"))
    order = torch.argsort(s, dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order))
    return 1 - rank.float() / real.sum(1, keepdim=True).clamp_min(1)


def then(first, second):
    """Tokens `first` scores above zero, by its score, then the rest by `second` (a tie-break that is not the
    slot order: most tokens share a content score of zero)."""

    def score(L: Layer) -> torch.Tensor:
        a = first(L).float()
        return torch.where(a > 0, 1 + a / a.amax(1, keepdim=True).clamp_min(1e-30), ranks(second(L), L.real) * 0.999)

    return score


def candidate(name: str):
    """A candidate by name: a CANDIDATES key, "A>B" (A's positive scores first, then B's order: then()), or
    "X+recentW" (mixed: W of each layer's budget to the most recent tokens, the rest by X)."""
    if "+recent" in name:
        content, w = name.split("+recent")
        return mixed(content, float(w))
    if ">" in name:
        a, b = name.split(">")
        return then(candidate(a), candidate(b))
    return CANDIDATES[name]


def cmd_run(args) -> None:
    from passkey_proxy import device_name, valid_stream, versions

    from simba_compress.data import windows as make_windows
    from simba_compress.evaluate import evaluate, evaluate_truncated
    from simba_compress.facts import FactTask, evaluate_facts
    from simba_compress.passkey import PasskeyTask, evaluate_passkey
    from simba_compress.schedules import linear_for_flops

    device = torch.device(args.device)
    model = load(args.model, device=device)
    tok = load_tokenizer(args.model)
    valid = valid_stream(args.valid, tok)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"{args.task}.json"
    data = json.loads(file.read_text()) if file.exists() else {"cells": []}
    data["meta"] = {"command": "python " + " ".join(sys.argv), "device": device_name(device), "versions": versions(),
                    "model": str(args.model), "depths": args.depths, "per_depth": args.per_depth,
                    "windows": args.windows}
    done = {(c["method"], c["budget"], c["length"]) for c in data["cells"]}
    names = args.methods
    cands = {n: candidate(n) for n in names
             if n not in ("dense", "truncate", "simba", "share", "utr", "deci") and not n.startswith("oracle")}
    with CAPTURE.active(model, cands):
        for length in args.lengths:
            if args.task == "passkey":
                samples = PasskeyTask(tok, valid).samples(length, args.depths, args.per_depth, seed=0)
                protect = max(s.tail for s in samples)
            elif args.task == "facts":
                samples = FactTask(tok, valid, args.choices).samples(length, args.depths, args.per_depth, seed=0)
                protect = max(s.tail for s in samples)
            else:
                wins = make_windows(valid, length + 1, args.windows)
                protect = args.protect
            for name in names:
                f = None if name == "dense" else args.budget
                if (name, f, length) in done:
                    continue
                t = time.time()
                simba = None
                if name not in ("dense", "truncate"):
                    crit = "simba" if name == "simba" or name.startswith("oracle") else name
                    simba = linear_for_flops(model.config, f, length, "simba", protect_last=protect)
                    simba = SimbaConfig(simba.keep, crit, protect)
                recent = round(f * length) if name == "truncate" else None
                cell = {"method": name, "budget": f, "length": length}
                if args.task == "loss":
                    if name == "oracle":
                        continue
                    r = (evaluate_truncated(model, wins, f, protect, args.batch, progress=False) if name == "truncate"
                         else evaluate(model, wins, protect, args.batch, simba=simba, all_positions=False, progress=False))
                    cell.update(loss=round(r.loss, 4), loss_se=round(r.loss_se, 4), windows=r.windows)
                    per = None
                else:
                    per = []
                    if args.task == "passkey" and not name.startswith("oracle"):  # batched: one layout per forward
                        per = evaluate_passkey(model, samples, simba, recent=recent, batch_tokens=args.batch_tokens).correct
                    for s in samples if not per else []:
                        span = s.needle if args.task == "passkey" else s.fact
                        with oracle(name, span) if name.startswith("oracle") else contextlib.nullcontext():
                            if args.task == "passkey":
                                per.append(evaluate_passkey(model, [s], simba, recent=recent).correct[0])
                            else:
                                r = evaluate_facts(model, [s], simba, recent=recent)
                                per.append((r.correct[0], r.logprob[0]))
                    if args.task == "passkey":
                        cell["accuracy"] = round(sum(per) / len(per), 4)
                        cell["correct"] = "".join("1" if c else "0" for c in per)
                    else:
                        cell["accuracy"] = round(sum(c for c, _ in per) / len(per), 4)
                        cell["logprob"] = round(sum(lp for _, lp in per) / len(per), 4)
                        cell["correct"] = "".join("1" if c else "0" for c, _ in per)
                cell["seconds"] = round(time.time() - t, 1)
                data["cells"].append(cell)
                file.write_text(json.dumps(data, indent=1) + "\n")
                shown = {k: cell[k] for k in ("accuracy", "logprob", "loss") if k in cell}
                print(f"{args.task} {name} {f} {length}: {shown} ({cell['seconds']} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=["ranks", "run"])
    ap.add_argument("--task", default="passkey", choices=["passkey", "facts", "loss"])
    ap.add_argument("--methods", nargs="+", default=["dense", "truncate", "simba", "oracle"])
    ap.add_argument("--choices", type=int, default=4, help="facts: candidate answers per sample")
    ap.add_argument("--windows", type=int, default=16, help="loss: windows per length")
    ap.add_argument("--protect", type=int, default=128, help="loss: the protected, scored tail")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--batch-tokens", type=int, default=4096, help="passkey: tokens per forward")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", required=True)
    ap.add_argument("--valid", default=str(Path(__file__).resolve().parents[2] / "shared/corpus/valid.txt.xz"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    ap.add_argument("--per-depth", type=int, default=4)
    ap.add_argument("--budget", type=float, default=0.6)
    ap.add_argument("--candidates", nargs="*", help="ranks: the candidates to rank with")
    ap.add_argument("--out", default="/tmp/criteria_study")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    {"ranks": cmd_ranks, "run": cmd_run}[args.command](args)


if __name__ == "__main__":
    main()
