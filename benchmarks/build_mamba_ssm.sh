#!/usr/bin/env bash
# Build mamba_ssm (or causal_conv1d: same setup.py layout) from its sdist for sm_90 (H100/H200) only, offline,
# into a wheel, and install it into the current Python.
#   MAMBA sdist: pip download --no-deps --no-build-isolation --no-binary :all: mamba-ssm==2.3.2.post1
#   (with MAMBA_SKIP_CUDA_BUILD=TRUE for the download only), then on the GPU machine:
#   bash benchmarks/build_mamba_ssm.sh path/to/mamba_ssm-2.3.2.post1.tar.gz
set -euo pipefail
sdist=$(realpath "$1")
work=$(mktemp -d)
tar xzf "$sdist" -C "$work"
cd "$work"/*/
# one architecture instead of nine: the build takes minutes instead of most of an hour
python3 - <<'PY'
import re
s = open("setup.py").read()
s = s.replace("    # HACK: The compiler flag", '    cc_flag = [f for f in cc_flag if not f.startswith(("-gencode", "arch="))] + ["-gencode", "arch=compute_90,code=sm_90"]\n\n    # HACK: The compiler flag', 1)
open("setup.py", "w").write(s)
PY
# a wheel first (WHEEL_DIR, default ./wheels of the sdist's folder), then installed: a later machine of the same
# image installs the wheel in seconds instead of building again
wheels=${WHEEL_DIR:-$work/wheels}
mkdir -p "$wheels"
MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=9.0 \
  python3 -m pip wheel --no-index --no-build-isolation --no-deps -w "$wheels" . 2>&1 | tail -3
python3 -m pip install --no-index --no-deps "$wheels"/"$(basename "$sdist" | cut -d- -f1)"-*.whl 2>&1 | tail -1
case "$(basename "$sdist")" in
  causal_conv1d*) python3 -c "import torch, causal_conv1d_cuda, causal_conv1d; print('causal_conv1d', causal_conv1d.__version__, 'built')" ;;
  *) python3 -c "import torch, selective_scan_cuda, mamba_ssm; print('mamba_ssm', mamba_ssm.__version__, 'built')" ;;
esac
