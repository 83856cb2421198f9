"""Where the benchmarks and tests find the pretrained proxy checkpoints, one lookup for all of them.

The four Mamba-1 proxies live in ../shared/models (read-only; where they come from: README, Pretrained proxies). Proxies this project trains itself on
the GPU machine (benchmarks/train_proxy.py: the Mamba-2 and the hybrid proxy; benchmarks/passkey_proxy.py: the
passkey fine-tunes) are about 28 MB each, too large for the repository, so they are kept in a cache folder that
every script agrees on. A name is looked up, in order, in:

    $SIMBA_PROXIES/<name>                       (a folder of your choice)
    ../shared/models/<name>                     (beside the repository, as CI has it)
    ~/.cache/simba-compress/proxies/<name>      (where the GPU runs' proxies are unpacked: unpack_proxy() below)

A checkpoint that is missing is None: benchmarks stop with the command that rebuilds it, tests skip and say why.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_MODELS = REPO.parent / "shared" / "models"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "simba-compress" / "proxies"

# name -> the command that builds it (on a GPU machine; see each script's docstring)
REBUILD = {
    "mamba2-proxy-d320-l16": "benchmarks/train_proxy.py --kind mamba2 (benchmarks/gpu_proxies.sh)",
    "hybrid-proxy-d320-l16": "benchmarks/train_proxy.py --kind hybrid (benchmarks/gpu_proxies.sh)",
    "mamba-proxy-d320-l16-passkey": "benchmarks/passkey_proxy.py --base ../shared/models/mamba-proxy-d320-l16 --train "
                                    "../shared/corpus/train.txt.xz --valid ../shared/corpus/valid.txt.xz --out "
                                    "OUT/mamba-proxy-d320-l16-passkey (benchmarks/gpu_proxies.sh, PASSKEY_OUT=1)",
    # the passkey proxy that also recalls facts (simba_compress/facts.py: the second long-context probe, issue 23)
    "mamba-proxy-d320-l16-recall": "benchmarks/passkey_proxy.py --base ../shared/models/mamba-proxy-d320-l16 --train "
                                   "../shared/corpus/train.txt.xz --valid ../shared/corpus/valid.txt.xz --facts 8 "
                                   "--out OUT/mamba-proxy-d320-l16-recall",
}


def search_path() -> list[Path]:
    roots = [Path(p) for p in os.environ.get("SIMBA_PROXIES", "").split(os.pathsep) if p]
    return roots + [SHARED_MODELS, CACHE]


def find(name: str) -> Path | None:
    """The folder of proxy `name` (it holds a config.json), or None where no root has it."""
    for root in search_path():
        folder = root / name
        if (folder / "config.json").is_file():
            return folder
    return None


def require(name: str) -> Path:
    """find(name), or SystemExit naming where it was looked for and how to build it (for the benchmarks)."""
    folder = find(name)
    if folder is None:
        where = ", ".join(str(r) for r in search_path())
        how = REBUILD.get(name, "its training script")
        raise SystemExit(f"proxy {name!r} not found in {where}; build it with {how} and unpack it into {CACHE}")
    return folder


def unpack_proxy(parts: list[Path], dest_root: Path = CACHE) -> Path:
    """Join a proxy that came back from the GPU machine as tar pieces (NAME.tar.part-aa, -ab, ...: the machine
    returns files of at most 16 MB) and unpack it under dest_root. Returns the proxy's folder."""
    import io
    import tarfile

    parts = sorted(parts)
    data = b"".join(p.read_bytes() for p in parts)
    dest_root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = {m.name.split("/")[0] for m in tar.getmembers()}
        if len(names) != 1:
            raise ValueError(f"{parts[0]}: expected one top folder, found {sorted(names)}")
        tar.extractall(dest_root, filter="data")
    return dest_root / names.pop()


if __name__ == "__main__":  # python benchmarks/proxies.py PART... : unpack; no argument: list what is found
    import sys

    if len(sys.argv) > 1:
        print(unpack_proxy([Path(p) for p in sys.argv[1:]]))
    else:
        for name in sorted({p.name for r in search_path() if r.is_dir() for p in r.iterdir() if p.is_dir()} | set(REBUILD)):
            print(f"{name:34s} {find(name) or 'missing'}")
