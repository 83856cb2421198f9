"""Read Mamba (and hybrid) checkpoints into one in-memory model, and write/read the compressed output folder
atomically.

Layouts read (layouts.py translates each): the original state-spaces layout (state-spaces/mamba-*, mamba2attn-*,
mamba_ssm's save_pretrained: config.json with d_model / n_layer / ssm_cfg (/ attn_layer_idx, attn_cfg,
d_intermediate), pytorch_model.bin, keys `backbone.embedding.weight`, vocab padded to pad_vocab_size_multiple);
transformers' MambaForCausalLM and Mamba2ForCausalLM; transformers' hybrids GraniteMoeHybridForCausalLM,
BambaForCausalLM, NemotronHForCausalLM, JambaForCausalLM, FalconH1ForCausalLM and Zamba2ForCausalLM
(model.safetensors, sharded or not, or pytorch_model.bin).
The output folder is written in the transformers layout of its family plus a `simba` section in config.json, so
transformers loads it dense and simba_compress loads it sparse; a state-spaces hybrid (no transformers class)
is written in the state-spaces layout, its schedule in simba.json (mamba_ssm's MambaConfig takes no other key).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import SimbaError
from .layers import ModelConfig
from .layouts import config_json, from_model, read_config, to_model
from .model import MambaLM
from .pruning import SimbaConfig

PACKAGE_DATA = Path(__file__).parent / "data"
DEMO_MODEL = PACKAGE_DATA / "demo-model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
SIMBA_FILE = "simba.json"  # the schedule of a folder in the state-spaces layout (its config.json is MambaConfig's)
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
# what a hub download fetches: a checkpoint's config, weights and tokenizer, or a tokenizer alone
CHECKPOINT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "*.json", "*.txt", "README.md"]
TOKENIZER_PATTERNS = ["*.json", "*.txt", "*.model"]


@dataclass
class Checkpoint:
    """A resolved checkpoint folder and what its config says."""

    path: Path
    layout: str  # layouts.LAYOUTS: "original", "transformers", or a transformers hybrid's model_type
    config: ModelConfig
    simba: SimbaConfig | None
    source_dtype: torch.dtype
    raw: dict | None = None  # config.json as read (its keys this project does not use are written back on save)


def resolve(model: str, patterns: list[str] = CHECKPOINT_PATTERNS) -> Path:
    """A local folder, "demo" (the embedded checkpoint), or a hub id whose `patterns` are fetched into the cache."""
    if model == "demo":
        return DEMO_MODEL
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SimbaError(f"{path}: not a folder; a model is a checkpoint folder or a hub id")
        return path
    if model.count("/") != 1 or model.startswith((".", "/", "~")):
        raise SimbaError(f"{model}: no such folder (and not a hub id of the form owner/name)")
    return _download(model, patterns)


def _download(repo_id: str, patterns: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not (fully) cached: fall through to the network
        pass
    if constants.HF_HUB_OFFLINE:
        raise SimbaError(f"{repo_id}: not in the local hub cache and HF_HUB_OFFLINE is set; download it first")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
    except Exception as e:  # one attempt, no retry loop: report what went wrong
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SimbaError(f"{repo_id}: not in the local hub cache and could not be downloaded ({reason[:200]})") from e


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SimbaError(f"{path.parent}: not a Mamba checkpoint (no config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SimbaError(f"{path}: not valid JSON ({e})") from None


def read_checkpoint(path: Path) -> Checkpoint:
    """Parse config.json into a ModelConfig, recognising the layout; raises SimbaError naming the file."""
    file = path / "config.json"
    cfg = _read_json(file)
    if not isinstance(cfg, dict):
        raise SimbaError(f"{file}: expected a JSON object")
    layout, config, simba = parse_config(cfg, file)
    if simba is None and (path / SIMBA_FILE).is_file():  # the state-spaces layout keeps its schedule beside
        simba = _simba_section(_read_json(path / SIMBA_FILE).get("simba"), path / SIMBA_FILE, config)
    dtype = getattr(torch, str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", ""), None)
    return Checkpoint(path, layout, config, simba, dtype if isinstance(dtype, torch.dtype) else torch.float32, cfg)


def parse_config(cfg: dict, file: Path | str) -> tuple[str, ModelConfig, SimbaConfig | None]:
    """(layout, model shape, pruning schedule or None) from a config.json's content; errors name `file`. Also what
    the transformers remote code (hf.py) builds its model from, with a loaded config's to_dict()."""
    file = Path(file)
    layout, mc = read_config(cfg, file)
    try:
        config = ModelConfig(**mc)
    except (ValueError, TypeError) as e:
        raise SimbaError(f"{file}: {e}") from None
    return layout, config, _simba_section(cfg.get("simba"), file, config)


def _simba_section(section, file: Path, config: ModelConfig) -> SimbaConfig | None:
    if section is None:
        return None
    try:
        simba = SimbaConfig.from_dict(section)
    except (ValueError, TypeError, AttributeError) as e:
        raise SimbaError(f"{file}: bad 'simba' section: {e}") from None
    if simba.n_layer != config.n_layer:
        raise SimbaError(f"{file}: 'simba.keep' has {simba.n_layer} entries for {config.n_layer} layers")
    return simba


def _load_file(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise SimbaError(f"{file}: cannot read weights, the file is corrupt or truncated ({first})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SimbaError(f"{file}: not a state dict of tensors")
    return sd


def _file_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """The tensors' shapes a weights file holds, read from its header (safetensors) or memory-mapped (pickle),
    without reading the tensors: the same errors as _load_file for a file that cannot be read."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:  # checks the header against the file's length
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise SimbaError(f"{file}: cannot read weights, the file is corrupt or truncated ({first})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise SimbaError(f"{file}: not a state dict of tensors")
    return {k: tuple(v.shape) for k, v in sd.items()}


def read_weights(path: Path, reader=_load_file) -> tuple[dict, Path]:
    """All tensors of a checkpoint folder (single file or sharded with an index), or what `reader` reads of
    each file (_file_shapes: their shapes)."""
    for name in WEIGHT_FILES:
        file = path / name
        if not file.exists():
            continue
        if name.endswith(".index.json"):
            index = _read_json(file).get("weight_map")
            if not isinstance(index, dict):
                raise SimbaError(f"{file}: no 'weight_map'")
            sd = {}
            for shard in sorted(set(index.values())):
                if not (path / shard).exists():
                    raise SimbaError(f"{file}: shard {shard} is missing")
                sd.update(reader(path / shard))
            return sd, file
        return reader(file), file
    raise SimbaError(f"{path}: no weights file (looked for {', '.join(WEIGHT_FILES)})")


def load(model: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> MambaLM:
    """Load a Mamba checkpoint (either layout, or a simba_compress output folder) as a MambaLM.

    A compressed folder comes back sparse (model.simba set); a dense checkpoint comes back dense.
    """
    ckpt = read_checkpoint(resolve(str(model)))
    sd, file = read_weights(ckpt.path)
    sd = to_model(sd, ckpt.config, ckpt.layout)
    if ckpt.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
    _check_shapes(ckpt, {k: tuple(v.shape) for k, v in sd.items()}, file)
    with torch.device("meta"):
        lm = MambaLM(ckpt.config, ckpt.simba)
    source_dtype = next(iter(sd.values())).dtype
    lm.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    if ckpt.config.tie_embeddings:
        lm.lm_head.weight = lm.backbone.embeddings.weight
    lm.source_dtype = source_dtype
    lm.source = str(model)
    lm.source_config = ckpt.raw
    return lm.to(device).eval()


def _check_shapes(ckpt: Checkpoint, shapes: dict[str, tuple[int, ...]], file: Path) -> int:
    """Every tensor ckpt's config implies is in `shapes` (those of `file`, embedding renamed, a tied head
    dropped) with its shape, and nothing else; returns the parameter count."""
    with torch.device("meta"):
        lm = MambaLM(ckpt.config)
    expected = {k: tuple(v.shape) for k, v in lm.state_dict().items()}
    if ckpt.config.tie_embeddings:
        expected.pop("lm_head.weight")
    for k, shape in expected.items():
        if k not in shapes:
            raise SimbaError(f"{file}: missing tensor '{k}' that {ckpt.path / 'config.json'} implies")
        if shapes[k] != shape:
            raise SimbaError(f"{file}: '{k}' has shape {shapes[k]} but {ckpt.path / 'config.json'} implies {shape}")
    extra = sorted(set(shapes) - set(expected))
    if extra:
        raise SimbaError(f"{file}: unexpected tensors for this model, e.g. '{extra[0]}' ({len(extra)} in all)")
    return sum(math.prod(s) for s in shapes.values())


def check_weights(ckpt: Checkpoint) -> tuple[Path, int]:
    """Check, without loading them, that the checkpoint's weights can be read and hold every tensor its config
    implies with its shape (as load() would); (the weights file, the parameter count)."""
    shapes, file = read_weights(ckpt.path, _file_shapes)
    # the layout's names and fused tensors as load() sees them: to_model on empty tensors of those shapes
    meta = to_model({k: torch.empty(v, device="meta") for k, v in shapes.items()}, ckpt.config, ckpt.layout)
    shapes = {k: tuple(v.shape) for k, v in meta.items()}
    if ckpt.config.tie_embeddings:
        shapes.pop("lm_head.weight", None)
    return file, _check_shapes(ckpt, shapes, file)


def load_tokenizer(model: str | os.PathLike, tokenizer: str | None = None):
    """The tokenizer saved beside a checkpoint, or `tokenizer` (a folder or hub id) when given."""
    from transformers import AutoTokenizer

    src = tokenizer or str(model)
    path = resolve(src, TOKENIZER_PATTERNS)  # a tokenizer-only hub repo: no weights are fetched
    if not any((path / f).exists() for f in TOKENIZER_FILES):
        raise SimbaError(f"{path}: no tokenizer files (tokenizer.json, ...); give a tokenizer (a folder or hub id)")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SimbaError(f"{src}: cannot load the tokenizer ({first})") from None


# config.json keys the writer sets itself, or that describe another version of the folder
WRITER_KEYS = ("simba", "simba_compress_version", "torch_dtype", "dtype", "transformers_version", "architectures",
               "auto_map")


def hf_config(model_or_config) -> dict:
    """config.json of a model (or ModelConfig) in the layout it is written in (layouts.config_json), over the keys of
    the config it was read from that this project does not use (token ids, max_position_embeddings, ...)."""
    config = model_or_config if isinstance(model_or_config, ModelConfig) else model_or_config.config
    source = {} if isinstance(model_or_config, ModelConfig) else getattr(model_or_config, "source_config", None) or {}
    written = config_json(config)
    if config.arch == "mamba_ssm" or not source or source.get("model_type") != written.get("model_type"):
        return written
    return {k: v for k, v in source.items() if k not in WRITER_KEYS} | written


def save(
    model: MambaLM,
    output: str | os.PathLike,
    *,
    tokenizer=None,
    files: dict[str, str | bytes] | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write model (+ simba section), tokenizer and extra files (text or bytes) into `output`, atomically.

    Beside them: README.md, the model card (card.py; a README.md in `files` replaces it), and for a pruned model the
    transformers remote code (hf.py: modeling_simba.py and config.json's auto_map; every layout but the state-spaces
    hybrid's, which mamba_ssm reads), so the folder
    is a Hub repository as it stands. Weights in safetensors (a state-spaces hybrid: pytorch_model.bin and
    simba.json, the files mamba_ssm reads). Every file gets the mode an ordinary write gives it (safetensors alone
    writes 0600).
    Everything is written into a temporary sibling folder that is renamed into place only when complete.
    An existing `output` is kept unless overwrite=True; then it is swapped out only after the new one is whole.
    """
    from safetensors.torch import save_file

    from . import __version__
    from .card import KEEP_PLOT, keep_profile_png, model_card

    out = Path(output).expanduser().resolve()
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        dtype = dtype or getattr(model, "source_dtype", torch.float32)
        cfg = hf_config(model)
        sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()}
        state_spaces = model.config.arch == "mamba_ssm"
        if model.config.tie_embeddings and not state_spaces:  # mamba_ssm's load_state_dict wants the tied head too
            sd.pop("lm_head.weight")
        sd = from_model(sd, model.config)
        files = dict(files or {})
        if model.simba is not None and KEEP_PLOT not in files:  # a search draws its own, beside the linear schedule
            seq_len = int(model.simba.extra.get("seq_len") or 1024)
            files[KEEP_PLOT] = keep_profile_png(model.simba, seq_len, model.config.scan_chunks)
        if state_spaces:  # mamba_ssm's from_pretrained reads pytorch_model.bin and builds MambaConfig(**config.json)
            torch.save(sd, tmp / "pytorch_model.bin")
            simba = {"simba": None if model.simba is None else model.simba.to_dict(), "simba_compress_version": __version__,
                     "torch_dtype": str(dtype).replace("torch.", "")}  # fmt: skip
            (tmp / SIMBA_FILE).write_text(json.dumps(simba, indent=2) + "\n")
        else:
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            cfg["torch_dtype"] = str(dtype).replace("torch.", "")
            if model.simba is not None:
                from .hf import REMOTE_CLASSES, REMOTE_CODE, auto_map

                cfg["simba"] = model.simba.to_dict()
                if cfg["model_type"] in REMOTE_CLASSES:  # every model_type a pruned folder is written in, today
                    cfg["auto_map"] = auto_map(cfg["model_type"])
                    files[REMOTE_CODE.name] = REMOTE_CODE.read_text()
            cfg["simba_compress_version"] = __version__
            if tokenizer is not None:  # generate's defaults (eos stops a row) come from config.json
                for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
                    if getattr(tokenizer, key, None) is not None:
                        cfg[key] = getattr(tokenizer, key)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        files.setdefault("README.md", model_card(model, out.name, files))
        for name, content in files.items():
            if isinstance(content, bytes):
                (tmp / name).write_bytes(content)
            else:
                (tmp / name).write_text(content)
        mode = (tmp / "config.json").stat().st_mode & 0o777  # what the umask gives an ordinary file
        folder_mode = mode | ((mode & 0o444) >> 2)  # searchable where readable (mkdtemp made tmp 0700)
        for path in [tmp, *tmp.rglob("*")]:
            os.chmod(path, folder_mode if path.is_dir() else mode)
        if out.exists():
            old = out.parent / f".{out.name}.replaced-{os.getpid()}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_output(out: Path, overwrite: bool, ask: str = "overwrite=True") -> None:
    """Refuse an output that exists (unless overwrite) or is not a folder, before any long work starts; the
    refusal says how to ask for it (the CLI: --overwrite)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise SimbaError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SimbaError(f"{out}: already exists; pass {ask} to replace it")
