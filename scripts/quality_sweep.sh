#!/usr/bin/env bash
# Fine-tune with several settings and score each against the untuned base: fit on TRAIN, then `evaluate`.
# This is how the quickstart's learning rate was chosen (README, "Measured figures").
#   TRAIN=../shared/data/amazon_titles_train.jsonl bash scripts/quality_sweep.sh scripts/quality_sweep.spec [PARALLEL]
# Spec lines: name;fit overrides;evaluate overrides (several sets separated by |, each one more report).
# Every run uses configs/quickstart.yaml plus its overrides; one JSON line per run goes to stdout and to
# $SWEEP_DIR/results.jsonl (val/loss at each validation, ROUGE-L, EOS-stop, loops, length ratio, paired CI).
# EVAL_ARGS is added to every evaluate (e.g. "--data.eval_batch_size 192" on a GPU).
# On a GPU the runs take a minute or two each and several fit side by side; on 2 CPU cores ~20 minutes each.
set -uo pipefail
cd "$(dirname "$0")/.."
: "${TRAIN:?set TRAIN to the training rows}"
# Without EVAL, evaluate scores the validation split of TRAIN (rows the fit never trained on): choose settings
# there, and keep a real held-out file (EVAL) for the final figure only.
export SWEEP_DIR=${SWEEP_DIR:-checkpoints/sweep} TRAIN EVAL=${EVAL:-} HF_HUB_OFFLINE=1
mkdir -p "$SWEEP_DIR"
one() {
  IFS=';' read -r name fitargs evalsets <<< "$1"
  local run=$SWEEP_DIR/$name; rm -rf "$run"; mkdir -p "$run"
  # shellcheck disable=SC2086  # the overrides are meant to split into words
  python -m titlegen fit --config configs/quickstart.yaml --data.path "$TRAIN" --trainer.default_root_dir "$run" \
    --trainer.enable_progress_bar false $fitargs > "$run/fit.log" 2>&1 \
    || { echo "{\"name\": \"$name\", \"error\": \"fit failed, see $run/fit.log\"}"; return; }
  local i=0 sets; IFS='|' read -ra sets <<< "$evalsets"; [ ${#sets[@]} -eq 0 ] && sets=("")
  for e in "${sets[@]}"; do
    # shellcheck disable=SC2086
    python -m titlegen evaluate --config configs/quickstart.yaml $fitargs --ckpt_path "$run/version_0/adapter" \
      --data.path "$TRAIN" ${EVAL:+--data.eval_path "$EVAL"} --trainer.enable_progress_bar false ${EVAL_ARGS:-} $e \
      --report_dir "$run/eval$i" \
      > "$run/eval$i.log" 2>&1 || echo "{\"name\": \"$name\", \"error\": \"evaluate failed, see $run/eval$i.log\"}"
    i=$((i + 1))
  done
  python scripts/sweep_summary.py "$name" "$run"
}
export -f one
grep -v '^#' "$1" | grep . | tr '\n' '\0' | xargs -0 -P "${2:-1}" -I{} bash -c 'one "$@"' _ {} \
  | tee -a "$SWEEP_DIR/results.jsonl"
