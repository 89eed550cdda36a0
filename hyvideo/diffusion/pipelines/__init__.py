"""The HunyuanVideo sampling pipeline."""

from .pipeline_hunyuan_video import HunyuanVideoPipeline, HunyuanVideoPipelineOutput, TextConditions

__all__ = ["HunyuanVideoPipeline", "HunyuanVideoPipelineOutput", "TextConditions"]
