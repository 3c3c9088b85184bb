#!/usr/bin/env bash
# The GPU check: the GPU-marked tests and the GPU benchmarks on a CUDA device, with their figures.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine (from the repository root or anywhere)
#   bash benchmarks/gpu_check.sh --prepare  # here, before: the ImageNet weights into .gpu/ (git-ignored),
#                                           # to carry to a bare GPU machine (the device tool's carry: [".gpu"])
#
# Sized to finish within 8 minutes on one GPU (each step has its own time limit below), so that
# a GPU machine lent for about 15 minutes, start-up included, leaves room for a re-run. It uses
# .venv/bin/python when that torch sees CUDA, else python3 (a machine with its own CUDA torch),
# and runs netanatomy from src/ (nothing to install). ImageNet weights: the zoo finds them in the
# installed packages or in torch's cache; a folder .gpu/ holding mobilenet_v2-b0353104.pth is
# copied into that cache first (carry it to a bare machine). The GPU tests need no other weight
# file: the device tool carries 64 MiB in all, and the repository is about 50 of them.
# NETANATOMY_DEBUG=1: a failing command prints its traceback (there is no time to re-run it).
# The CPU-only benchmarks (the lesion evaluator's float64 certification, the CPU reference loops
# of NMF, CKA, clustering, banding) are not run here.
# Output: each step's lines, then a summary block; the exit status is non-zero when a step failed.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
  mkdir -p .gpu
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  rm -f .gpu/efficientnet-lite0-57934424.pth   # an earlier --prepare copied it; it no longer fits
  for f in mobilenet_v2-b0353104.pth; do
    src=$(find .venv/lib -name "$f" 2>/dev/null | head -1)
    [ -n "$src" ] && cp "$src" .gpu/ && echo "gpu_check: .gpu/$f"
  done
  # what the device tool sends: tracked and untracked-not-ignored files, and the carried .gpu/
  kib=$( { git ls-files -z --cached --others --exclude-standard; find .gpu -type f -print0; } |
         xargs -0 du -k --apparent-size 2>/dev/null | awk '{s += $1} END {print s}')
  echo "gpu_check: the working tree with .gpu/ is $(( kib / 1024 )) MiB (the device tool's limit: 64 MiB)"
  [ "$kib" -le $(( 64 * 1024 )) ] || { echo "gpu_check: too large to carry" >&2; exit 1; }
  exit 0
fi

PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
  PY=.venv/bin/python
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" NETANATOMY_PROGRESS=0 PYTHONUNBUFFERED=1 NETANATOMY_DEBUG=1
if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check: no CUDA device for $PY (torch $($PY -c 'import torch; print(torch.__version__)' 2>/dev/null))" >&2
  exit 2
fi
if [ -d .gpu ]; then
  cache="$($PY -c 'import torch.hub; print(torch.hub.get_dir())')/checkpoints"
  mkdir -p "$cache" && cp -n .gpu/*.pth "$cache"/ 2>/dev/null || true
fi
$PY - <<'EOF'
import torch
p = torch.cuda.get_device_properties(0)
print(f"gpu_check: torch {torch.__version__}, {p.name}, {p.total_memory / 2**30:.0f} GiB")
EOF

started=$(date +%s)
failed=()
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "=== $name (limit ${limit} s)"
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $name: exit $rc in $(( $(date +%s) - t0 )) s"
  [ $rc -eq 0 ] || failed+=("$name")
  return 0
}

step "GPU tests" 180 $PY -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -o addopts=-ra
step "render batched vs alone (bench_render)" 45 \
  $PY benchmarks/bench_render.py --device cuda --configs 1x28x28,3x64x64 --units 64 --steps 64 --threads 4
step "InceptionV1, every mixed-layer unit (bench_render_inception)" 150 \
  $PY benchmarks/bench_render_inception.py --device cuda --units 128 --steps 32
step "MobileNetV2 at 224 px vs the plain loop (bench_render_imagenet)" 75 \
  $PY benchmarks/bench_render_imagenet.py --device cuda --units 32 --steps 64 --reference-units 2

echo "=== summary: $(( $(date +%s) - started )) s in all"
if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}"
  exit 1
fi
echo "all steps passed"
