#!/usr/bin/env bash
# The main job on the built-in tiny model (CPU, a minute or two): build tiny FLUX.1-Fill + SigLIP
# folders, synthesise a Latin + Chinese dataset, check the deployment, train with EMA, export the
# official layout, and evaluate the trained adapter against its EMA weights in an HTML report.
# Everything goes to runs/demo/ (override with DEMO_DIR=...).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=.venv/bin/python
D="${DEMO_DIR:-runs/demo}"
mkdir -p "$D"

$PY -m train.models.tiny --out "$D/models"
$PY -m train.data.synthesize --out "$D/data" --num 16 --resolution 64 --lang en,zh --seed 0
$PY verify_deployment.py --pretrained_model_name_or_path "$D/models/flux-fill" --siglip_path "$D/models/siglip" \
  --train_data_json "$D/data/data.jsonl" --output_dir "$D/train" --min_free_gb 1

$PY -m train.train \
  --pretrained_model_name_or_path "$D/models/flux-fill" --siglip_path "$D/models/siglip" \
  --train_data_json "$D/data/data.jsonl" --output_dir "$D/train" \
  --resolution 64 --num_tokens 8 --max_sequence_length 32 --reference_strip_height 16 \
  --train_batch_size 2 --gradient_accumulation_steps 2 --learning_rate 1e-3 --lr_scheduler cosine \
  --max_train_steps 20 --checkpointing_steps 10 --checkpoints_total_limit 2 \
  --use_ema --ema_decay 0.99 --seed 0 --resume_from_checkpoint latest

$PY -m train.export --checkpoint "$D/train/checkpoint-20" --out "$D/calligrapher.bin"
$PY -m train.evaluate \
  --pretrained_model_name_or_path "$D/models/flux-fill" --siglip_path "$D/models/siglip" \
  --ip_adapter_path "$D/train/checkpoint-20" --label live \
  --ip_adapter_path "$D/train/checkpoint-20@ema" --label ema \
  --data "$D/data/data.jsonl" --limit 4 --output_dir "$D/eval" \
  --resolution 64 --max_sequence_length 32 --num_inference_steps 4 --guidance_scale 30
echo "demo finished: TensorBoard logs in $D/train/logs, report in $D/eval/report.html"
