"""Text in (files, folders, datasets names), token windows out."""

from __future__ import annotations

import json
import lzma
from pathlib import Path

import torch

from .errors import SimbaError

PACKAGE_DATA = Path(__file__).parent / "data"
DEMO_TEXT = PACKAGE_DATA / "calibration.txt.xz"
TEXT_SUFFIXES = (".txt", ".txt.xz", ".jsonl", ".jsonl.xz")


def _read_file(path: Path) -> list[str]:
    name = path.name
    try:
        raw = lzma.open(path, "rt", encoding="utf-8").read() if name.endswith(".xz") else path.read_text("utf-8")
    except (OSError, lzma.LZMAError, EOFError, UnicodeDecodeError) as e:
        raise SimbaError(f"{path}: cannot read text ({getattr(e, 'strerror', None) or e})") from None
    if name.endswith((".jsonl", ".jsonl.xz")):
        docs = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise SimbaError(f"{path}:{i}: not a JSON line") from None
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise SimbaError(f"{path}:{i}: expected an object with a string 'text' field")
            docs.append(row["text"])
        return docs
    return [raw]


def read_documents(source: str) -> list[str]:
    """Documents from a .txt / .txt.xz / .jsonl(.xz) file, a folder of those, "demo", or a datasets name.

    A datasets name is NAME, NAME:CONFIG or either with @SPLIT (default train); it needs network or a cache.
    """
    if source == "demo":
        return _read_file(DEMO_TEXT)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
        if not files:
            raise SimbaError(f"{path}: no {', '.join(TEXT_SUFFIXES)} files in this folder")
        docs = [d for f in files for d in _read_file(f)]
    elif path.exists():
        if not path.name.endswith(TEXT_SUFFIXES):
            raise SimbaError(f"{path}: unsupported file type; use {', '.join(TEXT_SUFFIXES)}")
        docs = _read_file(path)
    elif "/" in source and not source.startswith((".", "/", "~")) or ":" in source or "@" in source:
        docs = _load_dataset(source)
    else:
        raise SimbaError(f"{source}: no such file or folder")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise SimbaError(f"{source}: contains no text")
    return docs


def _load_dataset(spec: str) -> list[str]:
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SimbaError(f"{spec}: not a local file and the dataset could not be loaded ({first})") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return [str(t) for t in ds[column]]


def tokenize(docs: list[str], tokenizer) -> torch.Tensor:
    """One stream of token ids (1-D long), documents separated by the tokenizer's eos token."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return torch.tensor([t for doc in encoded for t in doc + eos], dtype=torch.long)


def windows(stream: torch.Tensor, length: int, max_windows: int | None = None, source: str = "data") -> torch.Tensor:
    """Non-overlapping windows of `length` tokens, evenly spread over the stream: (n, length)."""
    total = stream.numel() // length
    if total < 1:
        raise SimbaError(f"{source}: {stream.numel()} tokens, shorter than one sequence of {length}")
    n = total if max_windows is None else min(max_windows, total)
    starts = torch.linspace(0, (total - 1) * length, n).round().long() // length * length
    return torch.stack([stream[s : s + length] for s in starts.tolist()])


def load_windows(source: str, tokenizer, length: int, max_windows: int | None = None) -> torch.Tensor:
    """Read, tokenize and cut `source` into windows: the path every command takes from text to tokens."""
    return windows(tokenize(read_documents(source), tokenizer), length, max_windows, source)
