#!/usr/bin/env bash
# One device call (~9 minutes on an H200) for the kernel candidates written without a GPU: device tests first, then
# the timings. Each step has its own time limit, so one that hangs or fails does not cost the others; every step's
# output goes to $OUT/<step>.txt (and the benchmarks' JSON/markdown beside it).
#
#   benchmarks/kernel_candidates.sh      (from the repository root, jax-linear-attention's wheel in .jla/, carried)
#
# Steps: the compiled device tests of the causal conv and of the GDN prep by key head; benchmarks/causal_conv.py (our conv kernel vs XLA, plain and
# packed, with tile alternatives); benchmarks/gated_delta_rule_peers.py at 1 x 4096 and 1 x 16384 with the GDN
# launch variants against jax-linear-attention. The train step with the candidates is a separate call:
#   python3 benchmarks/train_step.py --devices 1 --steps 10 --gdn-kernel gpu   (vs --gdn-kernel auto)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/kernel_candidates}
mkdir -p "$OUT"
SITE=/tmp/site
if ls .jla/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .jla/*.whl
fi
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD/src:$PWD"
VARIANTS=${VARIANTS:-api,bv16,bv16_w2,gk128_w8,gv32,wyg8,prep_kh,prep_kh_w4,fusedbwd_w2}

source benchmarks/device_step.sh

step device_tests 150 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider -m device \
  tests/kernels/test_causal_conv.py tests/kernels/test_gated_delta_rule_gpu.py -k "compiled and (conv or prep_kh)"
step causal_conv 90 python3 benchmarks/causal_conv.py --tilings
step causal_conv_packed 60 python3 benchmarks/causal_conv.py --packed
(cd benchmarks && XLA_FLAGS='--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false' \
  step gdn_variants 240 python3 gated_delta_rule_peers.py --shapes 1x4096,1x16384 --check-shapes 1x4096 \
  --trace 1x16384 --no-fla --variants "$VARIANTS" --markdown "$OUT/gdn_variants.md" --json "$OUT/gdn_variants.json")
