"""HunyuanVideo's two text encoders: the LLaVA-Llama-3 language model (LLM) and CLIP-L.

Both wrap transformers models and reproduce the original tokenization exactly (spec §3.5-3.7):

    llm = TextEncoder.from_pretrained("ckpts/text_encoder", dtype=torch.float16, device=device)
    clip = CLIPTextEncoder.from_pretrained("ckpts/text_encoder_2", dtype=torch.float16, device=device)
    text = llm.encode(["A cat walks on the grass."], data_type="video")
    text.hidden_state, text.attention_mask          # (B, 256, 4096), (B, 256) int64
    clip.encode(["A cat walks on the grass."]).pooled_output    # (B, 768)
"""

from hyvideo.text_encoder.clip import CLIP_MAX_LENGTH, CLIPTextEncoder
from hyvideo.text_encoder.common import (
    DataType,
    TextEncoderOutput,
    clean_prompts,
    count_template_prefix_tokens,
    resolve_prompt_template,
)
from hyvideo.text_encoder.llm import TextEncoder

__all__ = [
    "CLIP_MAX_LENGTH",
    "CLIPTextEncoder",
    "DataType",
    "TextEncoder",
    "TextEncoderOutput",
    "clean_prompts",
    "count_template_prefix_tokens",
    "resolve_prompt_template",
]
