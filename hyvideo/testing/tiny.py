"""A complete tiny checkpoint tree in the official layout, with random weights and the real tokenizers.

Used by the tests and by the installation check in README: every loader runs its real code on it, but
the weights are random, so the videos it makes are noise.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from hyvideo.constants import DiTConfig

logger = logging.getLogger(__name__)

MARKER_FILE = "TINY_RANDOM_WEIGHTS.txt"

TINY_DIT = DiTConfig(
    hidden_size=64, heads_num=2, mlp_width_ratio=2.0, mm_double_blocks_depth=2, mm_single_blocks_depth=2,
    rope_dim_list=(8, 12, 12), guidance_embed=True, text_states_dim=32, text_states_dim_2=32,
    refiner_depth=1,
)
TINY_VAE = {
    "_class_name": "AutoencoderKLCausal3D",
    "act_fn": "silu",
    "block_out_channels": [8, 16, 32, 32],
    "down_block_types": ["DownEncoderBlockCausal3D"] * 4,
    "up_block_types": ["UpDecoderBlockCausal3D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": 64,
    "sample_tsize": 16,
    "scaling_factor": 0.476986,
    "time_compression_ratio": 4,
    "mid_block_add_attention": True,
}
TINY_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=128320, max_position_embeddings=512,
                  bos_token_id=128000, eos_token_id=128001, pad_token_id=128258)
TINY_CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)

# LLaVA's vision tower at CLIP-336/14 geometry (576 patches) with tiny widths.
TINY_CLIP_VISION = dict(image_size=336, patch_size=14, hidden_size=16, intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=2, projection_dim=16)
# The CLIP-336 preprocessing of llava-llama-3-8b-v1_1-transformers (bicubic, OpenAI mean/std).
CLIP_336_PROCESSOR = dict(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                          do_center_crop=True, resample=3, image_mean=[0.48145466, 0.4578275, 0.40821073],
                          image_std=[0.26862954, 0.26130258, 0.27577711])


def randomize_(module: torch.nn.Module, *, generator: torch.Generator, std: float = 0.05) -> None:
    """Give every parameter random values (the original zero-initialises modulations, which would make
    a tiny random DiT trivially output zeros). Norm weights stay near 1 so activations stay sane."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * std
            is_norm = "norm" in name and name.endswith("weight") and param.ndim == 1
            param.copy_(noise + 1.0 if is_norm else noise)


def write_dit(folder: Path, config: DiTConfig = TINY_DIT, *, seed: int = 0) -> Path:
    from hyvideo.modules import HYVideoDiffusionTransformer

    model = HYVideoDiffusionTransformer(config, dtype=torch.float32)
    randomize_(model, generator=torch.Generator().manual_seed(seed))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "mp_rank_00_model_states.pt"
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    torch.save({"module": state}, path)
    (folder / "dit_config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return path


def write_vae(folder: Path, *, seed: int = 1) -> Path:
    from hyvideo.vae import AutoencoderKLCausal3D, VAEConfig

    vae = AutoencoderKLCausal3D(VAEConfig.from_dict(TINY_VAE))
    randomize_(vae, generator=torch.Generator().manual_seed(seed), std=0.1)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(TINY_VAE, indent=2))
    torch.save(vae.state_dict(), folder / "pytorch_model.pt")
    return folder


def write_llm(folder: Path, *, seed: int = 2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from hyvideo.testing.tokenizers import write_llama3_tokenizer

    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).save_pretrained(folder)
    write_llama3_tokenizer(folder)
    return folder


def write_clip(folder: Path, *, seed: int = 3) -> Path:
    from transformers import CLIPTextConfig, CLIPTextModel

    from hyvideo.testing.tokenizers import write_clip_tokenizer

    torch.manual_seed(seed)
    CLIPTextModel(CLIPTextConfig(**TINY_CLIP)).save_pretrained(folder)
    write_clip_tokenizer(folder)
    return folder


def tiny_llava_config():
    """A LlavaConfig shaped like llava-llama-3-8b (CLIP-336/14 -> 576 tokens, image id 128257) but tiny."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(**TINY_CLIP_VISION)
    text = LlamaConfig(**{**TINY_LLAMA, "max_position_embeddings": 1024})  # 934 expanded tokens
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=128257,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", pad_token_id=128258)


def write_llava(folder: Path, *, seed: int = 4) -> Path:
    """The I2V text encoder folder: tiny LLaVA, the real Llama-3 tokenizer (+ <image>), CLIP-336 processor."""
    from transformers import LlavaForConditionalGeneration

    from hyvideo.i2v.llava import _image_processor_class
    from hyvideo.testing.tokenizers import write_llama3_tokenizer

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(tiny_llava_config())
    randomize_(model, generator=torch.Generator().manual_seed(seed))
    model.save_pretrained(folder)
    write_llama3_tokenizer(folder)
    _image_processor_class()(**CLIP_336_PROCESSOR).save_pretrained(folder)
    return folder


def write_tiny_i2v_checkpoints(root: str | Path) -> Path:
    """Add the tiny I2V tree: hunyuan-video-i2v-720p/{transformers,vae} (token replace), text_encoder_i2v."""
    root = Path(root)
    write_dit(root / "hunyuan-video-i2v-720p" / "transformers",
              TINY_DIT.with_updates(image_condition_type="token_replace"), seed=5)
    write_vae(root / "hunyuan-video-i2v-720p" / "vae")
    write_llava(root / "text_encoder_i2v")
    if not (root / "text_encoder_2").is_dir():
        write_clip(root / "text_encoder_2")
    return root


def write_tiny_checkpoints(root: str | Path, *, i2v: bool = False) -> Path:
    """Write `root/{hunyuan-video-t2v-720p/{transformers,vae}, text_encoder, text_encoder_2}`; with `i2v`
    also the I2V tree (`write_tiny_i2v_checkpoints`)."""
    root = Path(root)
    write_dit(root / "hunyuan-video-t2v-720p" / "transformers")
    write_vae(root / "hunyuan-video-t2v-720p" / "vae")
    write_llm(root / "text_encoder")
    write_clip(root / "text_encoder_2")
    if i2v:
        write_tiny_i2v_checkpoints(root)
    (root / MARKER_FILE).write_text(
        "Tiny random-weight checkpoints written by scripts/make_tiny_ckpts.py for tests and the\n"
        "installation check. Videos sampled with them are noise. Real weights: see ckpts/README.md.\n"
    )
    logger.info("Tiny checkpoint tree written to %s", root)
    return root


def is_tiny_tree(root: str | Path) -> bool:
    return (Path(root) / MARKER_FILE).is_file()
