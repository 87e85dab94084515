#!/usr/bin/env bash
# The device calls (each under 10 minutes on an H200) for the Mosaic GPU kernels of the gated delta rule and the
# scanned-layers change, all written without a GPU. Each step has its own time limit, so one that hangs (a Mosaic
# barrier that never completes) or fails does not cost the others; every step's output goes to $OUT/<step>.txt.
#
#   benchmarks/mosaic_candidates.sh kernels   # ~6 min: each Mosaic kernel against its Triton kernel, device tests
#   benchmarks/mosaic_candidates.sh peers     # ~9 min: the default launch's device tests; the four shapes with jax-linear-attention and fla (.jla/, .fla/)
#   benchmarks/mosaic_candidates.sh norm      # ~9 min: gpu_norm_grads.py's kernel, the split prep, the bf16 inverse:
#                                             #   device tests, then the four shapes with jla (screening: no fla)
#   benchmarks/mosaic_candidates.sh screen    # ~9.5 min: device tests of the off-by-default kernels (norm kernel,
#                                             #   split prep, two-warpgroup walks, short sequences, Dv 256); the walks
#                                             #   alone; the four shapes with jla (no fla) for the candidates
#   benchmarks/mosaic_candidates.sh final     # ~9 min: the default's and the two-warpgroup walks' device tests, then
#                                             #   the four shapes: the default, walks_2wg, the eighth session's default,
#                                             #   jla and fla (set VARIANTS_FINAL to change ours)
#   benchmarks/mosaic_candidates.sh batches   # ~6 min: walk_warpgroups' rule against either form forced at B = 2, 4, 8
#                                             #   (T 4096, with jla), then the train step at 4 x 4096 with HF + fla
#   benchmarks/mosaic_candidates.sh prefill   # ~6 min: P formed in the prefill walk: device tests, then the four
#                                             #   shapes and 2 / 4 x 4096 with jla (no fla); the forward columns matter
#   benchmarks/mosaic_candidates.sh prescores # ~6 min: P formed in the walks: the prefill device tests, then
#                                             #   the four shapes with jla and fla, prefill variants forward alone
#   benchmarks/mosaic_candidates.sh roles     # ~9.5 min (estimated): the forward walk in roles: its device tests (the transposed
#                                             #   chain's included), then the four shapes and 4 x 4096: the default and
#                                             #   the transposed chain (forward alone) with jla and fla
#   benchmarks/mosaic_candidates.sh scores    # ~8 min (estimated): P by gpu_fused.scores_kernel (4 or 8 warps a key
#                                             #   head): device tests, then the five shapes with jla (no fla)
#   benchmarks/mosaic_candidates.sh qknorm    # ~6 min: the forward's l2 norm in gpu_qk_norm.py's kernel: device tests,
#                                             #   then the five shapes with jla (no fla)
#   benchmarks/mosaic_candidates.sh walknorm  # ~6 min (estimated): a forward alone on the raw q, k (walk_normalizes_qk):
#                                             #   device tests, then the five shapes with jla (no fla)
#   benchmarks/mosaic_candidates.sh scoresnorm # ~9 min (estimated): a forward alone whose P launch normalises q, k
#                                             #   (prefill_scores_norm): device tests, then the five shapes with jla
#   benchmarks/mosaic_candidates.sh scoresfinal # ~9 min (estimated): the default (prefill_scores_norm at B = 1): device
#                                             #   tests, then the five shapes with jla and fla
#   benchmarks/mosaic_candidates.sh train4_qknorm # ~8 min (estimated): the unscanned train step at 4 x 4096, default
#                                             #   launch and qk_norm_kernel=true (no HF)
#   benchmarks/mosaic_candidates.sh train4    # ~9 min: the bench train step at 4 x 4096, unscanned and scanned, and HF
#   benchmarks/mosaic_candidates.sh train     # ~8 min: the bench train step at 8 x 4096, unscanned and scanned, and HF
#
# (from the repository root, with .jla/ and .fla/ carried). The kernels call decides which variants the peers call
# times: a kernel whose device test fails is left out of VARIANTS.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/mosaic_candidates}
mkdir -p "$OUT"
SITE=/tmp/site
for wheels in .jla .fla .testwheels; do
  if ls "$wheels"/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$wheels"/*.whl
  fi
done
export PYTHONUNBUFFERED=1 PYTHONPATH="$SITE:$PWD/src:$PWD:$PWD/benchmarks"
FAST_XLA='--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=false'
VARIANTS=${VARIANTS:-api,triton,mosaic_fwd_walk,blocked32_w1}
# Device tests on four workers where pytest-xdist was carried (.testwheels/): compiling is most of their time.
PARALLEL=()
if python3 -c "import xdist" 2>/dev/null; then
  PARALLEL=(-n 4)
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
fi

source benchmarks/device_step.sh

# A candidate launch: its device tests (pytest -k FILTER), then VARIANTS against jla at the five shapes (no fla);
# FORWARD_ONLY (optional): the variants timed as a forward alone only; SHAPES overrides the five shapes.
candidate() {
  local name=$1 filter=$2 variants=$3 tests_limit=$4 peers_limit=$5 forward_only=${6:-}
  if ! step "${name}_tests" "$tests_limit" env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider \
      "${PARALLEL[@]}" -m device tests/kernels/test_gated_delta_rule_gpu.py -k "$filter"; then
    echo "a $name test failed: check ${name}_tests.txt before trusting the timings"
  fi
  (cd benchmarks && XLA_FLAGS="$FAST_XLA" step "gdn_$name" "$peers_limit" python3 gated_delta_rule_peers.py \
    --variants "$variants" --forward-only "$forward_only" --no-fla --peer-timeout 200 --trace 1x16384 \
    --shapes "${SHAPES:-1x4096,1x16384,1x65536,4x4096,8x4096}" \
    --markdown "$OUT/gdn_$name.md" --json "$OUT/gdn_$name.json")
}

case "${1:-}" in
  kernels)
    step mosaic_bwd 100 python3 benchmarks/gated_delta_rule_mosaic_bwd.py
    step mosaic_walks 100 python3 benchmarks/gated_delta_rule_mosaic_walks.py
    step device_tests 240 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider -m device \
      tests/kernels/test_gated_delta_rule_gpu.py -k "compiled and (default or mosaic)"
    ;;
  peers)
    step default_tests 120 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider -m device \
      tests/kernels/test_gated_delta_rule_gpu.py -k "compiled and default"
    (cd benchmarks && XLA_FLAGS="$FAST_XLA" step gdn_peers 470 python3 gated_delta_rule_peers.py \
      --variants "$VARIANTS" --peer-timeout 370 --markdown "$OUT/gdn_peers.md" --json "$OUT/gdn_peers.json")
    ;;
  norm)
    step norm_tests 190 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider -m device \
      tests/kernels/test_gated_delta_rule_gpu.py -k "compiled and (norm_kernel or prep_split or short_sequences)"
    (cd benchmarks && XLA_FLAGS="$FAST_XLA" step gdn_norm 380 python3 gated_delta_rule_peers.py \
      --variants api,norm_kernel,prep_split,bf16_inv,bf16_inv_split --no-fla --markdown "$OUT/gdn_norm.md" \
      --json "$OUT/gdn_norm.json")
    ;;
  screen)
    # The two-warpgroup walks first, alone: a barrier that never completes hangs only this step, and the timing
    # below then leaves them out.
    screen=${VARIANTS_SCREEN:-api,walks_2wg,prep_split,bf16_inv_split,norm_kernel}
    if ! step walks_2wg_tests 100 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider -m device \
        tests/kernels/test_gated_delta_rule_gpu.py -k "compiled and (walks_2wg or wide_value)"; then
      screen=$(echo "$screen" | tr ',' '\n' | grep -v 2wg | paste -sd, -)
      echo "two-warpgroup walks left out: $screen"
    else
      step walks_alone 100 python3 benchmarks/gated_delta_rule_mosaic_walks.py
    fi
    step screen_tests 130 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider -m device \
      tests/kernels/test_gated_delta_rule_gpu.py \
      -k "compiled and (norm_kernel or prep_split or (short_sequences and not walks_2wg))"
    (cd benchmarks && XLA_FLAGS="$FAST_XLA" step gdn_screen 240 python3 gated_delta_rule_peers.py \
      --variants "$screen" --no-fla --trace 8x4096 --markdown "$OUT/gdn_screen.md" --json "$OUT/gdn_screen.json")
    ;;
  final)
    final=${VARIANTS_FINAL:-api,walks_2wg,eighth}
    step final_tests 170 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" \
      -m device tests/kernels/test_gated_delta_rule_gpu.py -k "compiled and (default or walks_2wg or wide_value)"
    status=$?
    # out of time (a hang, maybe) or a two-warpgroup test failed: time the others only
    if [ "$status" = 124 ] || grep -q "FAILED.*\(walks_2wg\|wide_value\)" "$OUT/final_tests.txt"; then
      final=$(echo "$final" | tr ',' '\n' | grep -v 2wg | paste -sd, -)
      echo "two-warpgroup walks left out: $final"
    fi
    (cd benchmarks && XLA_FLAGS="$FAST_XLA" step gdn_final 400 python3 gated_delta_rule_peers.py \
      --variants "$final" --peer-timeout 330 --trace 8x4096 --markdown "$OUT/gdn_final.md" --json "$OUT/gdn_final.json")
    ;;
  batches)
    (cd benchmarks && XLA_FLAGS="$FAST_XLA" step gdn_batches 120 python3 gated_delta_rule_peers.py \
      --variants api,walks_2wg,walks_1wg --no-fla --shapes 2x4096,4x4096,8x4096 --check-shapes "" --trace "" \
      --markdown "$OUT/gdn_batches.md" --json "$OUT/gdn_batches.json")
    (cd benchmarks && step train_b4 300 python3 train_step.py --batch 4 --scan-layers false,true --steps 6 --warmup 2)
    ;;
  prefill)
    step prefill_tests 150 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" -m device \
      tests/kernels/test_gated_delta_rule_gpu.py -k "compiled and prefill"
    (cd benchmarks && XLA_FLAGS="$FAST_XLA" step gdn_prefill 240 python3 gated_delta_rule_peers.py \
      --variants api,prefill_p --no-fla --shapes 1x4096,1x16384,1x65536,2x4096,4x4096,8x4096 --check-shapes "" \
      --trace 1x16384 --markdown "$OUT/gdn_prefill.md" --json "$OUT/gdn_prefill.json")
    ;;
  prescores)
    step prescores_tests 150 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" \
      -m device tests/kernels/test_gated_delta_rule_gpu.py -k "compiled and prefill"
    (cd benchmarks && XLA_FLAGS="$FAST_XLA" step gdn_prescores 400 python3 gated_delta_rule_peers.py \
      --variants api,prep_p_launch,prefill_p,prefill_p_1wg --forward-only prep_p_launch,prefill_p,prefill_p_1wg \
      --peer-timeout 330 --trace 1x16384 --markdown "$OUT/gdn_prescores.md" --json "$OUT/gdn_prescores.json")
    ;;
  roles)
    roles=${VARIANTS_ROLES:-api,roles_t}
    if ! step roles_tests 200 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" \
        -m device tests/kernels/test_gated_delta_rule_gpu.py -k "compiled and (roles_t or roles_short)"; then
      roles=api
      echo "the transposed chain left out (a failed roles test: check roles_tests.txt before trusting api)"
    fi
    (cd benchmarks && XLA_FLAGS="$FAST_XLA" step gdn_roles 370 python3 gated_delta_rule_peers.py \
      --variants "$roles" --forward-only roles_t --peer-timeout 280 --trace 1x16384 \
      --shapes 1x4096,1x16384,1x65536,4x4096,8x4096 \
      --markdown "$OUT/gdn_roles.md" --json "$OUT/gdn_roles.json")
    ;;
  scores)
    candidate scores "compiled and scores" "${VARIANTS_SCORES:-api,roles_scores4,roles_scores8}" 150 330
    ;;
  qknorm)
    candidate qknorm "compiled and qk_norm" api,qk_norm 150 330
    ;;
  walknorm)
    candidate walknorm "compiled and normalizes" api,walk_norm 200 300
    ;;
  scoresnorm)
    candidate scoresnorm "compiled and normalizes_in_the_scores" \
      "${VARIANTS_SCORESNORM:-api,scores_norm4,scores_norm_t,thirteenth}" 200 330 \
      "${FORWARD_SCORESNORM:-scores_norm4,scores_norm_t,thirteenth}"
    ;;
  scoresfinal)
    # the default with prefill_scores_norm: its device tests, then the five shapes with jla and fla; the thirteenth
    # session's default forward alone
    step scoresfinal_tests 170 env JAX_PLATFORMS=cuda python3 -m pytest -q -p no:cacheprovider "${PARALLEL[@]}" \
      -m device tests/kernels/test_gated_delta_rule_gpu.py -k "compiled and (default or normalizes_in_the_scores)"
    (cd benchmarks && XLA_FLAGS="$FAST_XLA" step gdn_scoresfinal 380 python3 gated_delta_rule_peers.py \
      --variants api,thirteenth --forward-only thirteenth --peer-timeout 300 --trace 1x16384 \
      --shapes 1x4096,1x16384,1x65536,4x4096,8x4096 \
      --markdown "$OUT/gdn_scoresfinal.md" --json "$OUT/gdn_scoresfinal.json")
    ;;
  train4_qknorm)
    # the unscanned step twice in one call: the default launch, then the forward's l2 norm in gpu_qk_norm.py
    (cd benchmarks && step train_b4_default 280 python3 train_step.py --batch 4 --steps 6 --warmup 2 --no-hf)
    (cd benchmarks && step train_b4_qknorm 280 python3 train_step.py --batch 4 --steps 6 --warmup 2 --no-hf \
      --gdn-launch qk_norm_kernel=true)
    ;;
  train4)
    (cd benchmarks && step train_b4 560 python3 train_step.py --batch 4 --scan-layers false,true --steps 6 --warmup 2)
    ;;
  train)
    (cd benchmarks && step train_b8 540 python3 train_step.py --batch 8 --scan-layers false,true --steps 6 \
      --warmup 2)
    ;;
  *)
    echo "usage: $0 kernels|peers|norm|screen|final|batches|prefill|prescores|roles|scores|qknorm|walknorm|scoresnorm|scoresfinal|train4_qknorm|train4|train" >&2
    exit 2
    ;;
esac
