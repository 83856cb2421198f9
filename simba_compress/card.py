"""The model card of a saved folder (its README.md): the Hub's metadata header, then what a reader needs to
know and run: the method, the schedule and its plot, FLOPs and calibration loss against dense (from
report.json when the folder has one), how to load it pruned and dense, and the command that made it."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from .flops import count
from .layers import ScanChunks
from .model import MambaLM
from .pruning import SimbaConfig

KEEP_PLOT = "keep_profile.png"  # calibrate.py writes it after a search; written here otherwise


def keep_profile_png(simba: SimbaConfig, seq_len: int, chunks: ScanChunks | None = None) -> bytes:
    """The schedule as a plot: each layer's keep ratio, and the tokens it runs on at seq_len (a model whose scan
    walks `chunks`, ModelConfig.scan_chunks)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = count_tokens(simba, seq_len, chunks)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(range(simba.n_layer), [t / seq_len for t in tokens], "o-", c="tab:red", label=f"tokens / {seq_len}")
    ax.plot(range(simba.n_layer), simba.keep, ":", c="tab:gray", label="keep ratio (schedule)")
    ax.set_xlabel("layer")
    ax.set_ylabel("share of the prompt a layer runs on")
    ax.set_ylim(0, 1.05)
    ax.set_title(f"keep profile ({simba.criterion}, {simba.extra.get('schedule', 'schedule')})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def count_tokens(simba: SimbaConfig, seq_len: int, chunks: ScanChunks | None = None) -> list[int]:
    import torch

    return simba.counts(torch.tensor([seq_len]), chunks)[:, 0].tolist()


def model_card(model: MambaLM, name: str, files: dict[str, str | bytes]) -> str:
    """README.md for a folder called `name` holding `model` and `files` (report.json, recipe.yaml, plots)."""
    simba, cfg = model.simba, model.config
    source = getattr(model, "source", None)
    report = json.loads(files["report.json"]) if "report.json" in files else None
    arch = _architecture(cfg)
    params = sum(p.numel() for p in model.parameters())
    meta = {
        "base_model": source if _is_hub_id(source) else None,
        "library_name": "transformers",
        "license": source_license(source),
        "pipeline_tag": "text-generation",
        "tags": ["simba-compress", "token-pruning", "mamba2" if cfg.layer == "mamba2" else "mamba"]
        + (["hybrid", cfg.arch] if cfg.hybrid else []),
    }
    lines = ["---", *(_yaml(k, v) for k, v in meta.items() if v is not None), "---", ""]
    what = f"`{source}`" if source else "a Mamba model"
    if simba is None:
        lines += [f"# {name}", "", f"{what} ({arch}, {cfg.n_layer} layers, {params / 1e6:.1f}M parameters) written by "
                  "simba-compress without a pruning schedule: it runs dense.", ""]
        return "\n".join(lines + _loading(cfg, name, pruned=False))
    seq_len = report["flops"]["seq_len"] if report else int(simba.extra.get("seq_len") or 1024)
    ratio = report["flops"]["ratio"] if report else count(cfg, simba, seq_len).ratio
    tuned = bool(report and report.get("finetune"))
    lines += [
        f"# {name}",
        "",
        f"{what} ({arch}, {cfg.n_layer} layers, {params / 1e6:.1f}M parameters) with a token-pruning schedule that "
        f"runs its prompt at **{ratio:.3f} of the dense backbone FLOPs** (at {seq_len} tokens), made by simba-compress. "
        + ("The weights were then fine-tuned with the pruning active (below)." if tuned else
           "The weights are the source's, unchanged: only config.json's `simba` section is new."),
        "",
        "## Method",
        "",
        "Simba (\"Sparsified State-Space Models are Efficient Highway Networks\", TMLR 2025): after each layer, every "
        "prompt token is scored by its global impact on the last position through that layer's own recurrence, and "
        "the next layer runs only on the top share of tokens its keep ratio allows; upper layers keep fewer. A dropped "
        f"token's residual stream is frozen, so every position still has logits. The last {simba.protect_last} "
        "token(s) of a prompt are always kept, and every generated token runs through every layer (only the prompt "
        "is pruned).",
        "",
        "## Schedule",
        "",
        f"![keep profile]({KEEP_PLOT})",
        "",
        f"- criterion `{simba.criterion}`, schedule `{simba.extra.get('schedule', 'explicit')}`"
        + (f", form `{simba.extra['form']}`" if simba.extra.get("form") else "")
        + (f", granularity {simba.granularity}" if simba.granularity > 1 else "")
        + (f", token caps {simba.max_tokens}" if simba.max_tokens else ""),
        f"- keep ratio per layer: {_runs(simba.keep)}",
        f"- tokens per layer at {seq_len}: {_runs(count_tokens(simba, seq_len, cfg.scan_chunks))}",
        f"- backbone FLOP ratio {ratio:.4f} (the score included; the LM head is counted beside it, not in it)",
        *([f"- KV cache of the attention layers after the prompt, at {seq_len} tokens: "
           f"{report['flops']['kv_cache_bytes'] / 2**20:.2f} MiB a sequence against {report['flops']['kv_cache_dense_bytes'] / 2**20:.2f} "
           "MiB dense (bfloat16)"] if report and report["flops"].get("kv_cache_dense_bytes") else []),
        "",
    ]
    lines += _measured(report) + _loading(cfg, name, pruned=True) + _made(report, files, name)
    return "\n".join(lines)


def _measured(report: dict | None) -> list[str]:
    if not report:
        return ["(No report.json: saved from Python without a measurement.)", ""]
    cal = report["calibration"]
    dense, sparse = cal["dense"], cal["sparse"]
    out = [
        "## Calibration loss against dense",
        "",
        f"Next-token loss on the last {cal['protect']} positions (protected from pruning, as a continuation is) of "
        f"{cal['windows']} windows of {cal['seq_len']} tokens of `{cal['data']}` (the calibration text, not a held-out "
        "evaluation):",
        "",
        "| | loss | all-position loss |",
        "|---|---:|---:|",
        f"| dense | {dense['loss']:.4f} | {_num(dense.get('all_position_loss'))} |",
        f"| pruned | {sparse['loss']:.4f} | {_num(sparse.get('all_position_loss'))} |",
        "",
        "The all-position loss is a stress figure: a pruned position is predicted from the layer where it was dropped.",
        "",
    ]
    search = report.get("search")
    if search:
        out += [f"Schedule searched by Optuna ({search['objective']}, {search['trials_complete']} trials); gain over "
                f"the paper's linear schedule at the same budget: {_num(search.get('gain_vs_linear'))}.", ""]
    return out


def _architecture(cfg) -> str:
    ssm = "Mamba-2" if cfg.layer == "mamba2" else "Mamba-1"
    if not cfg.hybrid:
        return ssm
    if cfg.attn_parallel:
        return f"a {ssm} hybrid with attention beside the {ssm} mixer in every layer"
    return f"a {ssm} hybrid with attention at layers {', '.join(map(str, cfg.attn_layers)) or 'none'}"


DENSE_CLASSES = {"granitemoehybrid": "GraniteMoeHybridForCausalLM", "bamba": "BambaForCausalLM",
                 "nemotron_h": "NemotronHForCausalLM", "jamba": "JambaForCausalLM",
                 "falcon_h1": "FalconH1ForCausalLM", "zamba2": "Zamba2ForCausalLM"}  # fmt: skip


def _loading(cfg, name: str, pruned: bool) -> list[str]:
    """How to load the folder `name` (a local path here; its repository id once on the Hub)."""
    dense_class = DENSE_CLASSES.get(cfg.arch) or ("Mamba2ForCausalLM" if cfg.layer == "mamba2" else "MambaForCausalLM")
    out = ["## Use", "", "```bash", "pip install simba-compress", "```", ""]
    if cfg.arch == "mamba_ssm":  # the state-spaces layout: no transformers class reads it
        out += ["Pruned: `sc.load(...)` of simba-compress (the schedule is in `simba.json`). Dense: mamba_ssm's "
                f'`MambaLMHeadModel.from_pretrained("{name}")` (its config.json and pytorch_model.bin).', ""]
        return out
    if pruned:
        out += [
            "Pruned, with simba-compress (CUDA-graph decoding on a GPU"
            + (", each attention layer's KV cache holding the tokens it kept" if cfg.hybrid else "") + "):",
            "",
            "```python",
            "import simba_compress as sc",
            f'model, tok = sc.load("{name}"), sc.load_tokenizer("{name}")',
            'ids = tok("The quick brown fox", return_tensors="pt").input_ids',
            "print(tok.decode(model.generate(ids, max_new_tokens=32)[0]))",
            "```",
            "",
            "Pruned, with transformers (the remote code in `modeling_simba.py` imports simba_compress; batched prompts "
            "are left-padded):",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
            f'model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)',
            f'tok = AutoTokenizer.from_pretrained("{name}", padding_side="left")',
            'pipe = pipeline("text-generation", model=model, tokenizer=tok)',
            "```",
            "",
            f'Dense (the same weights, no pruning): `{dense_class}.from_pretrained("{name}")`, or '
            f'`AutoModelForCausalLM.from_pretrained("{name}")` without `trust_remote_code`.',
            "",
            f"lm-eval: `lm_eval run --model simba --model_args pretrained={name} --tasks ...` (the continuation of each "
            f"request protected from pruning). `--model hf --model_args pretrained={name},trust_remote_code=True` gives "
            "the same scores where a continuation is one token, for rolling loglikelihood and for generation; lm-eval's "
            "hf model does not tell the model where a longer continuation starts, so there it is pruned with the prompt.",
            "",
        ]
    else:
        out += [f'`sc.load("{name}")` or `{dense_class}.from_pretrained("{name}")`.', ""]
    return out


def _made(report: dict | None, files: dict, name: str) -> list[str]:
    out = ["## How it was made", ""]
    version = report.get("simba_compress") if report else None
    if "recipe.yaml" in files:
        out += [f"simba-compress{' ' + version if version else ''}; `recipe.yaml` holds every setting of the run, "
                "and this command makes the folder again:", "", "```bash",
                f"simba-compress --recipe recipe.yaml --output {name}", "```", ""]
    else:
        out += ["Saved from Python (`simba_compress.save`), without a recipe.", ""]
    listed = [f for f in ("report.json", "recipe.yaml", "schedule.json", "trials.csv", "calibration_loss_vs_flops.png",
                          "study.db") if f in files]  # fmt: skip
    if listed:
        out += ["Also in this folder: " + ", ".join(f"`{f}`" for f in listed) + ".", ""]
    return out


def source_license(source: str | None) -> str | None:
    """The license in the source checkpoint's own card (a local folder's README.md, or a hub repo's if it is in the
    local cache), or the project's for the embedded demo model; None when unknown."""
    if source is None:
        return None
    if source == "demo":
        return "apache-2.0"  # the project's own model (LICENSE; data/SOURCES.md)
    from huggingface_hub.repocard import metadata_load

    readme = Path(source).expanduser() / "README.md"
    if not readme.exists() and _is_hub_id(source):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source, "README.md")
        readme = Path(cached) if isinstance(cached, str) else readme
    try:
        license_ = (metadata_load(readme) or {}).get("license") if readme.exists() else None
    except Exception:  # a card whose header does not parse: no license from it
        return None
    return license_ if isinstance(license_, str) else None


def _is_hub_id(source: str | None) -> bool:
    return bool(source) and not Path(source).expanduser().exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None


def _yaml(key: str, value) -> str:
    if isinstance(value, list):
        return f"{key}:\n" + "\n".join(f"- {v}" for v in value)
    return f"{key}: {value}"


def _runs(values: list) -> str:
    """1.0 x 4, 0.75 x 2, ...: a per-layer list as runs of equal values."""
    runs: list[list] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return ", ".join(f"{_num(v)}" + (f" x {n}" if n > 1 else "") for v, n in runs)


def _num(v) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
