#!/usr/bin/env bash
# One command from a fresh clone to a video:
#   bash scripts/quickstart.sh "A cat walks on the grass, realistic style."
# Creates (or reuses) .venv and installs what is needed. With the official weights under ckpts/ it samples
# a real 544x960, 129-frame video. Without them it is an INSTALLATION CHECK: it writes a tiny random-weight
# checkpoint tree (.cache/ckpts-tiny) and samples a small video through the real code -- the output is noise.
# Image-to-video: I2V_IMAGE=cat.png bash scripts/quickstart.sh "A cat turns its head."
set -euo pipefail
cd "$(dirname "$0")/.."
prompt="${1:-A cat walks on the grass, realistic style.}"
shift || true
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0 2>&1 | { grep -v "^WARNING: Location" || true; }
fi
.venv/bin/pip install -q -r requirements.txt -r requirements-test.txt 2>&1 | { grep -v "^WARNING: Location" || true; }

i2v=()
if [ -n "${I2V_IMAGE:-}" ]; then
  i2v=(--i2v-mode --i2v-image-path "$I2V_IMAGE")
  if [ -f ckpts/hunyuan-video-i2v-720p/transformers/mp_rank_00_model_states.pt ]; then
    exec .venv/bin/python sample_video.py --prompt "$prompt" "${i2v[@]}" --i2v-resolution 720p \
      --video-length 129 --infer-steps 50 --seed 0 --save-path ./results "$@"
  fi
elif [ -f ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states.pt ]; then
  exec .venv/bin/python sample_video.py --prompt "$prompt" --video-size 544 960 --video-length 129 \
    --infer-steps 50 --seed 42 --save-path ./results "$@"
fi

tiny=.cache/ckpts-tiny
if [ ! -f "$tiny/TINY_RANDOM_WEIGHTS.txt" ]; then
  .venv/bin/python scripts/make_tiny_ckpts.py "$tiny"
elif [ ${#i2v[@]} -gt 0 ] && [ ! -d "$tiny/text_encoder_i2v" ]; then  # a tree from before I2V
  .venv/bin/python -c "from hyvideo.testing.tiny import write_tiny_i2v_checkpoints as w; w('$tiny')"
fi
echo "=== INSTALLATION CHECK: no weights in ckpts/ (see ckpts/README.md), using tiny RANDOM weights."
echo "=== The pipeline, loaders and video writer are real; the video is noise."
if [ ${#i2v[@]} -gt 0 ]; then  # the image decides the size: its 360p bucket
  exec .venv/bin/python sample_video.py --model-base "$tiny" --prompt "$prompt" "${i2v[@]}" \
    --i2v-resolution 360p --video-length 5 --infer-steps 4 --seed 42 --save-path ./results/installation-check \
    --vae-precision fp32 --text-encoder-precision fp32 --text-encoder-precision-2 fp32 "$@"
fi
.venv/bin/python sample_video.py --model-base "$tiny" --prompt "$prompt" --video-size 128 128 \
  --video-length 17 --infer-steps 10 --seed 42 --save-path ./results/installation-check \
  --vae-precision fp32 --text-encoder-precision fp32 --text-encoder-precision-2 fp32 "$@"
