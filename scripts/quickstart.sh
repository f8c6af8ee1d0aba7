#!/usr/bin/env bash
# The main job on the embedded default: fine-tune SmolLM2-135M-Instruct in NF4 + LoRA on the sample data
# (titlegen/sample/trn.json), then describe the sample titles (titlegen/sample/titles.csv). Time: README figures.
source "$(dirname "$0")/_env.sh"
python scripts/fetch_quickstart_model.py
python -m titlegen fit --config configs/quickstart.yaml "$@"
run_dir=$(ls -td checkpoints/quickstart/version_* | head -n 1)
python -m titlegen predict --config configs/quickstart.yaml --ckpt_path "$run_dir/adapter" \
  --output "$run_dir/predictions.csv"
cat <<MSG

done.
  TensorBoard logs : $run_dir   (view: tensorboard --logdir checkpoints/quickstart)
  adapter          : $run_dir/adapter
  predictions      : $run_dir/predictions.csv
MSG
