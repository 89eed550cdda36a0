"""Image-to-video (HunyuanVideo-I2V) as a mode of hyvideo: buckets, the reference image, LLaVA encoding,
the first-frame conditioning of the sampler. See README "Image-to-video" and shared i2v_spec.md."""

from hyvideo.i2v.image import (
    I2V_RESOLUTIONS,
    bucket_for_image,
    closest_bucket,
    crop_size_list,
    image_to_tensor,
    load_reference_image,
    resize_and_center_crop,
)

__all__ = [
    "I2V_RESOLUTIONS",
    "bucket_for_image",
    "closest_bucket",
    "crop_size_list",
    "image_to_tensor",
    "load_reference_image",
    "resize_and_center_crop",
]
