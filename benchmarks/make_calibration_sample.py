"""Cut the embedded calibration sample (simba_compress/data/calibration.txt.xz) from ../shared/corpus/train.txt.xz.

64 evenly spaced pieces of about 4 KB, cut at line boundaries, so every source of the corpus is in it.
Run from the repo root: python benchmarks/make_calibration_sample.py
"""

import lzma
from pathlib import Path

SRC = Path(__file__).resolve().parents[1].parent / "shared" / "corpus" / "train.txt.xz"
DST = Path(__file__).resolve().parents[1] / "simba_compress" / "data" / "calibration.txt.xz"
PIECES, PIECE_BYTES = 64, 4096


def main() -> None:
    text = lzma.open(SRC, "rt", encoding="utf-8").read()
    step = len(text) // PIECES
    pieces = []
    for i in range(PIECES):
        start = text.find("\n", i * step) + 1
        end = text.find("\n", start + PIECE_BYTES)
        pieces.append(text[start:end].strip())
    with lzma.open(DST, "wt", encoding="utf-8", preset=9) as f:
        f.write("\n\n".join(pieces) + "\n")
    print(f"{DST}: {sum(map(len, pieces))} characters from {PIECES} pieces of {SRC}")


if __name__ == "__main__":
    main()
