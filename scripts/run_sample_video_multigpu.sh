#!/usr/bin/env bash
# Several GPUs on one node: sequence parallelism over torch.distributed (no xfuser needed).
# The image tokens are split over the GPUs: Ulysses splits the attention heads (the degree must divide
# 24), ring attention passes key/value blocks around; ulysses-degree x ring-degree must equal the number
# of processes. Every GPU holds the whole model (add --use-cpu-offload and/or --use-fp8 on smaller cards:
# both work together with sequence parallelism), the VAE tiles are decoded in
# parallel, and only rank 0 writes the video.
#
# Layouts of the original's README (nproc = ulysses x ring), e.g. for 1280x720 or 720x1280, 129 frames:
#   8 GPUs: 8x1, 4x2, 2x4, 1x8       6 GPUs: 6x1, 3x2, 2x3, 1x6 (no longer limited to sizes that split evenly)
#   5 GPUs: 1x5                      4 GPUs: 4x1, 2x2, 1x4
#   3 GPUs: 3x1, 1x3                 2 GPUs: 2x1, 1x2
# Ulysses moves less data than ring (see README); prefer the largest Ulysses degree that divides 24.
# Across nodes use torchrun's usual --nnodes / --rdzv-endpoint flags with the same arguments.
export TOKENIZERS_PARALLELISM=false

torchrun --nproc_per_node=8 sample_video.py \
    --video-size 1280 720 \
    --video-length 129 \
    --infer-steps 50 \
    --prompt "A cat walks on the grass, realistic style." \
    --seed 42 \
    --embedded-cfg-scale 6.0 \
    --flow-shift 7.0 \
    --flow-reverse \
    --ulysses-degree 8 \
    --ring-degree 1 \
    --save-path ./results
