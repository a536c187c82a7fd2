#!/usr/bin/env bash
# Section 2h of docs/results.md (issue 24, item 4): alpha 0.5 against alpha 1, each at its own
# learning rate picked on validation, on fresh seeds. Pre-registered there before any run.
# Every run is an ordinary `powergrad sweep` trial; read with `powergrad report --pick lr`.
#
#   studies/best_against_best.sh pick              # both arms x lr {0.2, 0.4} x seeds 0-9
#   studies/best_against_best.sh extend ALPHA      # that arm at lr 0.8, seeds 0-9 (only if it picked 0.4)
#   studies/best_against_best.sh confirm LR1 LR05  # alpha 1 at LR1 and alpha 0.5 at LR05, seeds 10-33
#
# Re-running a stage continues it (the sweep's storage says what is done). Run from a worktree
# at the plan's commit (POWERGRAD_SRC names its src/), records go to RESULTS (default: results/).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
results="${RESULTS:-$here/results}"
python="${PYTHON:-$here/.venv/bin/python}"
export PYTHONPATH="${POWERGRAD_SRC:-$here/src}"
powergrad=("$python" -m powergrad)

# 2c's warmed-up 10k setting (studies/study.py TEN_K + one warm-up epoch), in bf16 with
# channels-last; lr, alpha and seed come from each stage.
setting=(
  digits dataset=imagefolder data_dir=/tmp/cifar10s model=resnet20 augment=cifar
  train_subset=10000 val_fraction=0.02 epochs=10 batch_size=128 optimizer=sgd momentum=0.9
  nesterov=true weight_decay=5e-4 sched=cosine warmup_epochs=1 workers=0
  amp=bf16 channels_last=true
  "description=CIFAR-10 (JPEG) 10k-image subset ResNet-20 10 epochs batch 128 1 warm-up epoch bf16 channels-last (docs/results.md 2h)"
)
name=cifar10-resnet20-10k-warmup-bf16

# Checkpoints, events, plots and the log are not part of a record (as studies/study.py strip).
strip() {
  find "$1" \( -name '*.pt' -o -name train.log \) -delete
  find "$1" -depth -type d \( -name events -o -name plots \) -exec rm -rf {} +
}

case "${1:-}" in
  pick)  # two workers of one thread each: 1.19x the images/s of one 2-thread run (2h)
    "${powergrad[@]}" sweep "${setting[@]}" alpha=1,0.5 lr=0.2,0.4 seed=0 --seeds 10 \
      --workers 2 --out "$results/$name-pick"
    strip "$results/$name-pick" ;;
  extend)
    "${powergrad[@]}" sweep "${setting[@]}" "alpha=$2" lr=0.8 seed=0 --seeds 10 \
      --workers 2 --out "$results/$name-pick-a$2-lr0.8"
    strip "$results/$name-pick-a$2-lr0.8" ;;
  confirm)  # one sweep per arm, side by side, one thread each: the arms advance seed by seed
    OMP_NUM_THREADS=1 "${powergrad[@]}" sweep "${setting[@]}" alpha=1 "lr=$2" seed=10 --seeds 24 \
      --out "$results/$name-confirm-a1" &
    OMP_NUM_THREADS=1 "${powergrad[@]}" sweep "${setting[@]}" alpha=0.5 "lr=$3" seed=10 --seeds 24 \
      --out "$results/$name-confirm-a0.5" &
    wait
    strip "$results/$name-confirm-a1"
    strip "$results/$name-confirm-a0.5" ;;
  *) echo "usage: $0 pick | extend ALPHA | confirm LR_ALPHA1 LR_ALPHA0.5" >&2; exit 2 ;;
esac
