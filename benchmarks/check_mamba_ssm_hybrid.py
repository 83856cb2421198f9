"""The state-spaces hybrid layout against mamba_ssm's own MambaLMHeadModel, on a CPU through Triton's interpreter.

mamba_ssm only imports with its CUDA extension, so on a CPU this runs it under TRITON_INTERPRET=1 with a stub for the
extension (the Mamba-2 and attention layers never call it):

    TRITON_INTERPRET=1 PYTHONPATH=/path/to/mamba_ssm_source:/path/to/stub python benchmarks/check_mamba_ssm_hybrid.py \
        [--folder /tmp/tp/hybrid-proxy-d320-l16] [--out benchmarks/results/cpu/check_mamba_ssm_hybrid]

(the stub folder holds an empty module selective_scan_cuda, and a sitecustomize module that lets mamba_ssm's Triton
kernels run on CPU tensors in the interpreter: torch.cuda.device as a no-op, one autotune config.) On a GPU with
mamba_ssm installed it runs as it is.

Checks, each printing the largest logit difference against the logits' scale:
1. a real folder written by mamba_ssm (benchmarks/train_proxy.py's): loaded by simba_compress.load, dense logits
   against mamba_ssm's forward of the same file;
2. random hybrids built by mamba_ssm itself (attention with GQA, the causal conv over qkv, biases, d_intermediate
   GatedMLPs; rotary needs flash_attn, which is absent here: rotary_emb_dim 0), written with its save_pretrained;
3. the output folder: simba_compress.save of a pruned model of (2), read back by mamba_ssm's from_pretrained dense;
4. decoding: mamba_ssm's decode loop (greedy) against ours on the same prompt, and against the teacher-forced
   forward. Without flash_attn, mamba_ssm's MHA decodes through F.scaled_dot_product_attention(is_causal=True) with
   one query against the cache, which SDPA aligns to the first key (the new token sees only the first cached one):
   mamba_ssm's own hybrid decode is wrong there. Rerun with that call not causal for one query, it is also compared,
   and the decode steps' logits against the forward's (with d_conv > 0 mamba_ssm's MHA keeps the conv's outputs, not
   its inputs, as the decode's conv state after a prefill: its source, mamba_ssm/modules/mha.py, reads so; the step logits show
   whether it matters).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import env  # benchmarks/env.py

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simba_compress import SimbaConfig, load, save  # noqa: E402


def mamba_ssm_model(cfg: dict, seed: int):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.modules.mamba2 import Mamba2

    torch.manual_seed(seed)
    model = MambaLMHeadModel(MambaConfig(**cfg)).eval()
    for m in model.modules():
        if isinstance(m, Mamba2):
            m.use_mem_eff_path = False  # the fused path needs causal_conv1d's CUDA conv
    with torch.no_grad():  # trained-like ranges, nonzero biases, norms away from 1
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("norm2.weight") or "norm_f" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.2)
    return model


def mamba_ssm_from_folder(folder: Path):
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    from mamba_ssm.modules.mamba2 import Mamba2

    cfg = json.loads((folder / "config.json").read_text())
    model = MambaLMHeadModel(MambaConfig(**cfg)).eval()
    model.load_state_dict({k: v.float() for k, v in torch.load(folder / "pytorch_model.bin", weights_only=True).items()})
    for m in model.modules():
        if isinstance(m, Mamba2):
            m.use_mem_eff_path = False
    return model


def mamba_ssm_step_logits(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """mamba_ssm's decode-step logits for ids[:, prompt:], one token at a time after a prefill of ids[:, :prompt]."""
    from mamba_ssm.utils.generation import InferenceParams

    params = InferenceParams(max_seqlen=ids.shape[1], max_batch_size=ids.shape[0])
    model(ids[:, :prompt], inference_params=params, num_last_tokens=1)
    params.seqlen_offset = prompt
    out = []
    for t in range(prompt, ids.shape[1]):
        out.append(model(ids[:, t : t + 1], inference_params=params, num_last_tokens=1).logits[:, -1])
        params.seqlen_offset += 1
    return torch.stack(out, 1)


def our_step_logits(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    states = model(ids[:, :prompt], simba=None, return_states=True).states
    out = []
    for t in range(prompt, ids.shape[1]):
        logits, states = model.step(ids[:, t], states)
        out.append(logits)
    return torch.stack(out, 1)


def mamba_ssm_greedy(model, ids: torch.Tensor, new: int) -> list[int]:
    """mamba_ssm's decode loop (mamba_ssm/utils/generation.py decode, without its CUDA timing events): the prompt, then one token
    at a time through its inference cache."""
    from mamba_ssm.utils.generation import InferenceParams

    params = InferenceParams(max_seqlen=ids.shape[1] + new, max_batch_size=ids.shape[0])
    logits = model(ids, inference_params=params, num_last_tokens=1).logits[:, -1]
    out = []
    for _ in range(new):
        token = logits.argmax(-1)
        out.append(int(token[0]))
        params.seqlen_offset += 1 if out[1:] else ids.shape[1]
        position = torch.full((ids.shape[0], 1), params.seqlen_offset, dtype=torch.long)
        logits = model(token[:, None], inference_params=params, position_ids=position, num_last_tokens=1).logits[:, -1]
    return out


@contextlib.contextmanager
def one_query_not_causal():
    """mamba_ssm's MHA decode with SDPA's is_causal off for a single query (what flash_attn_with_kvcache computes:
    the new token attends every cached key), to tell its SDPA fallback's alignment from other differences."""
    import mamba_ssm.modules.mha as mha

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def patched(q, k, v, is_causal=False, **kw):
        return sdpa(q, k, v, is_causal=is_causal and q.shape[-2] > 1, **kw)

    mha.F.scaled_dot_product_attention = patched
    try:
        yield
    finally:
        mha.F.scaled_dot_product_attention = sdpa


def diff(a: torch.Tensor, b: torch.Tensor) -> dict:
    return {"max_abs_diff": float((a - b).abs().max()), "scale": float(b.abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", default="/tmp/tp/hybrid-proxy-d320-l16", help="a hybrid folder written by mamba_ssm")
    ap.add_argument("--out", default=None, help="write the results to OUT with .json and .md appended")
    args = ap.parse_args()
    t0 = time.time()
    results: dict = {"command": "python " + shlex.join(sys.argv), "versions": env.versions("torch", "triton", "mamba_ssm")}
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        folder = Path(args.folder)
        if (folder / "config.json").exists():
            ref, ours = mamba_ssm_from_folder(folder), load(folder)
            results["real_folder"] = {"folder": str(folder), **diff(ours(ids, simba=None).logits, ref(ids).logits)}
        cases = {
            "gqa_conv_mlp_biases": {"attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "head_dim": 16, "d_conv": 4,
                                                 "qkv_proj_bias": True, "out_proj_bias": True, "causal": True},
                                    "d_intermediate": 96},
            "mha_no_conv": {"attn_cfg": {"num_heads": 2, "head_dim": 32, "causal": True, "qkv_proj_bias": False,
                                         "out_proj_bias": False}, "d_intermediate": 0},
        }  # fmt: skip
        for name, case in cases.items():
            cfg = {"d_model": 64, "n_layer": 4, "vocab_size": 256, "attn_layer_idx": [1, 3], "rms_norm": True,
                   "ssm_cfg": {"layer": "Mamba2", "d_state": 16, "headdim": 16, "chunk_size": 32},
                   "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8, "tie_embeddings": True,
                   **case}  # fmt: skip
            ref = mamba_ssm_model(cfg, seed=1)
            with tempfile.TemporaryDirectory() as tmp:
                ref.save_pretrained(tmp + "/ref")
                ours = load(tmp + "/ref")
                row = {"forward": diff(ours(ids, simba=None).logits, ref(ids).logits)}
                # the output folder, pruned, read back by mamba_ssm dense
                ours.simba = SimbaConfig([1.0, 1.0, 0.5, 0.5], protect_last=4)
                save(ours, tmp + "/out")
                back = mamba_ssm_from_folder(Path(tmp + "/out"))
                row["output_folder_read_by_mamba_ssm"] = diff(back(ids).logits, ours(ids, simba=None).logits)
                row["output_folder_reloads_pruned"] = load(tmp + "/out").simba == ours.simba
                new = 6
                ours.simba = None
                mine = ours.generate(ids[:1, :24], max_new_tokens=new)[0, 24:].tolist()
                theirs = mamba_ssm_greedy(ref, ids[:1, :24], new)
                with one_query_not_causal():
                    fixed = mamba_ssm_greedy(ref, ids[:1, :24], new)
                    steps = mamba_ssm_step_logits(ref, ids[:, :32], 24)
                full = ours(ids[:, :32], simba=None).logits[:, 24:]
                row["step_logits"] = {"ours_vs_forward": diff(our_step_logits(ours, ids[:, :32], 24), full),
                                      "mamba_ssm_one_query_not_causal_vs_forward": diff(steps, full)}  # fmt: skip
                teacher = ours(torch.tensor([ids[0, :24].tolist() + mine[:-1]])).logits[0, 23:].argmax(-1).tolist()
                row["generate"] = {"ours": mine, "mamba_ssm": theirs, "ours_equals_teacher_forced_forward": mine == teacher,
                                   "mamba_ssm_equals_ours": mine == theirs, "mamba_ssm_one_query_not_causal": fixed,
                                   "mamba_ssm_one_query_not_causal_equals_ours": mine == fixed}  # fmt: skip
            results[name] = row
    results["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(results, indent=1))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        lines = ["# simba_compress against mamba_ssm's own hybrid model (state-spaces layout)", "",
                 f"Command: `{results['command']}`; versions {results['versions']}; Triton interpreter on the CPU.", "",
                 "| case | check | max abs diff | logit scale |", "|---|---|---:|---:|"]  # fmt: skip
        for name, row in results.items():
            if isinstance(row, dict) and "forward" in row:
                for check in ("forward", "output_folder_read_by_mamba_ssm"):
                    lines.append(f"| {name} | {check} | {row[check]['max_abs_diff']:.2e} | {row[check]['scale']:.3f} |")
            elif name == "real_folder":
                lines.append(f"| {row['folder']} | forward | {row['max_abs_diff']:.2e} | {row['scale']:.3f} |")
        lines += ["", "Decode steps (8 tokens after a prefill of 24, teacher-forced) against the forward's logits of the same "
                  "tokens, max abs diff:", ""]
        for name, row in results.items():
            if isinstance(row, dict) and "step_logits" in row:
                st = row["step_logits"]
                lines.append(f"- {name}: ours {st['ours_vs_forward']['max_abs_diff']:.2e}; mamba_ssm (its SDPA decode not "
                             f"causal for one query) {st['mamba_ssm_one_query_not_causal_vs_forward']['max_abs_diff']:.2e}")
        lines += ["", "Greedy decoding, 6 new tokens after 24 prompt tokens:", ""]
        for name, row in results.items():
            if isinstance(row, dict) and "generate" in row:
                g = row["generate"]
                lines.append(f"- {name}: ours {g['ours']} (equals the teacher-forced forward: {g['ours_equals_teacher_forced_forward']}); "
                             f"mamba_ssm {g['mamba_ssm']} (equal: {g['mamba_ssm_equals_ours']}); mamba_ssm with its SDPA "
                             f"decode not causal for one query {g['mamba_ssm_one_query_not_causal']} "
                             f"(equal: {g['mamba_ssm_one_query_not_causal_equals_ours']})")
        out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
