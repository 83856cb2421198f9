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
    elif is_dataset_name(source):
        docs = list(_load_dataset(source))
    else:
        raise SimbaError(f"{source}: no such file or folder")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise SimbaError(f"{source}: contains no text")
    return docs


def is_dataset_name(source: str) -> bool:
    """Not a local path, but NAME (owner/name), NAME:CONFIG or either with @SPLIT."""
    return "/" in source and not source.startswith((".", "/", "~")) or ":" in source or "@" in source


def _load_dataset(spec: str, streaming: bool = False):
    """The text column of a datasets split, as strings; streaming yields them without loading the split."""
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split or "train", streaming=streaming)
        columns = ds.column_names or list(next(iter(ds)).keys())
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise SimbaError(f"{spec}: not a local file and the dataset could not be loaded ({first})") from None
    column = "text" if "text" in columns else columns[0]
    return (str(row[column]) for row in ds)


def tokenize(docs: list[str], tokenizer) -> torch.Tensor:
    """One stream of token ids (1-D long), documents separated by the tokenizer's eos token."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    encoded = tokenizer(docs, add_special_tokens=False)["input_ids"]
    return torch.tensor([t for doc in encoded for t in doc + eos], dtype=torch.long)


def read_tokens(source: str, tokenizer, max_tokens: int, piece_chars: int = 1 << 20) -> torch.Tensor:
    """Like tokenize(read_documents(source)), but stops after max_tokens: a large corpus is tokenized only as far
    as a run needs it, and a datasets name is streamed instead of downloaded whole. Long documents are
    tokenized in pieces cut at line ends (a token may split differently only at a cut)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens: must be >= 1, got {max_tokens}")
    docs = _load_dataset(source, streaming=True) if _is_remote(source) else read_documents(source)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    parts, n = [], 0
    for doc in docs:
        if not doc.strip():
            continue
        start = 0
        while start < len(doc) and n < max_tokens:
            end = len(doc) if len(doc) - start <= piece_chars else doc.rfind("\n", start, start + piece_chars) + 1
            end = end if end > start else min(len(doc), start + piece_chars)  # no line end in the piece: cut anyway
            ids = tokenizer(doc[start:end], add_special_tokens=False)["input_ids"] + (eos if end == len(doc) else [])
            parts.append(torch.tensor(ids, dtype=torch.long))
            n, start = n + len(ids), end
        if n >= max_tokens:
            break
    if not parts:
        raise SimbaError(f"{source}: contains no text")
    return torch.cat(parts)[:max_tokens]


def _is_remote(source: str) -> bool:
    return source != "demo" and not Path(source).expanduser().exists() and is_dataset_name(source)


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
