#!/usr/bin/env bash
# fp8 DiT weights (about 10 GB less GPU memory). Needs mp_rank_00_model_states_fp8.pt and its _fp8_map.pt;
# make your own pair from bf16 weights with scripts/convert_to_fp8.py.
DIT_CKPT_PATH=${DIT_CKPT_PATH:-ckpts/hunyuan-video-t2v-720p/transformers/mp_rank_00_model_states_fp8.pt}
python3 sample_video.py \
    --dit-weight "${DIT_CKPT_PATH}" \
    --video-size 720 1280 \
    --video-length 129 \
    --infer-steps 50 \
    --prompt "A cat walks on the grass, realistic style." \
    --seed 42 \
    --embedded-cfg-scale 6.0 \
    --flow-shift 7.0 \
    --flow-reverse \
    --use-cpu-offload \
    --use-fp8 \
    --save-path ./results
