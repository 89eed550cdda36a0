#!/usr/bin/env bash
# Several GPUs: sequence parallelism over torch.distributed (no xfuser needed). No arithmetic: give no
# --ulysses-degree / --ring-degree and the layout is chosen from the process count (Ulysses as wide as the
# 24 heads and one node allow, the rest on ring attention; logged with its reason). Only rank 0 writes.
#
#   NGPU=4 bash scripts/run_sample_video_multigpu.sh                 # one node, 4 GPUs
#   NGPU=4 SHARD=1 bash scripts/run_sample_video_multigpu.sh         # 4 x 24 GB cards: shard the DiT weights
#   NGPU=8 CFG=1 CFG_SCALE=2 bash scripts/run_sample_video_multigpu.sh  # real CFG: branches on 4 + 4 GPUs
#
# When to add --shard-weights: when the whole DiT does not fit each GPU beside the activations (bf16 DiT
# 23.9 GiB; fp8 12.3 GiB). It keeps 1/N of the weights per GPU (FSDP2) and gathers each block just before it
# runs: N=4 -> 6.0 GiB bf16 / 3.1 GiB fp8 per GPU, for ~(N-1)/N x the weights all-gathered per step. Leave it
# off when the model fits: it only adds communication.
# --cfg-parallel (needs --cfg-scale > 1 and an even GPU count) halves each GPU's work for real CFG.
# Explicit --ulysses-degree U --ring-degree R still work (U x R [x 2 with --cfg-parallel] = GPUs).
#
# Several nodes: run the same command on every node with torchrun's rendezvous flags, e.g. two nodes of 8:
#   torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST0:29500 sample_video.py ...
# Ulysses stays inside a node, the ring (and the CFG halves) cross nodes; the seed and noise come from global
# rank 0, which alone writes the video.
export TOKENIZERS_PARALLELISM=false
NGPU=${NGPU:-8}
EXTRA=()
[[ -n "${SHARD:-}" ]] && EXTRA+=(--shard-weights)
[[ -n "${CFG:-}" ]] && EXTRA+=(--cfg-parallel --cfg-scale "${CFG_SCALE:-2.0}")

torchrun --nproc_per_node="$NGPU" sample_video.py \
    --video-size 1280 720 \
    --video-length 129 \
    --infer-steps 50 \
    --prompt "A cat walks on the grass, realistic style." \
    --seed 42 \
    --embedded-cfg-scale 6.0 \
    --flow-shift 7.0 \
    --flow-reverse \
    --save-path ./results \
    "${EXTRA[@]}"
