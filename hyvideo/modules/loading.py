"""Reading DiT checkpoints (official .pt, safetensors, diffusers format) and loading them strictly.

The model is built on the meta device and the checkpoint tensors are assigned to it
(`load_state_dict(strict=True, assign=True)`), so a 13B model never exists twice in memory. Keys and shapes
are checked before anything is assigned: a mismatching checkpoint leaves the model untouched.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..constants import DiTConfig
from .mmap_reader import is_mmap_refused, load_noreserve
from .models import HYVideoDiffusionTransformer

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

# --------------------------------------------------------------------------------------------------
# Official <-> diffusers key mapping
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KeyRule:
    """One official module <-> one or more diffusers modules; `{n}` stands for a block index."""

    official: str
    diffusers: tuple[str, ...]
    # "copy"; "qkv": 3 equal row chunks; "linear1": rows [H, H, H, rest]; "swap": the two row halves swapped
    kind: str = "copy"


_REF = "txt_in.individual_token_refiner.blocks.{n}"
_DREF = "context_embedder.token_refiner.refiner_blocks.{n}"
_DB, _DDB = "double_blocks.{n}", "transformer_blocks.{n}"
_SB, _DSB = "single_blocks.{n}", "single_transformer_blocks.{n}"

_KEY_RULES: tuple[_KeyRule, ...] = (
    _KeyRule("img_in.proj", ("x_embedder.proj",)),
    _KeyRule("time_in.mlp.0", ("time_text_embed.timestep_embedder.linear_1",)),
    _KeyRule("time_in.mlp.2", ("time_text_embed.timestep_embedder.linear_2",)),
    _KeyRule("guidance_in.mlp.0", ("time_text_embed.guidance_embedder.linear_1",)),
    _KeyRule("guidance_in.mlp.2", ("time_text_embed.guidance_embedder.linear_2",)),
    _KeyRule("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",)),
    _KeyRule("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",)),
    _KeyRule("txt_in.input_embedder", ("context_embedder.proj_in",)),
    _KeyRule("txt_in.t_embedder.mlp.0", ("context_embedder.time_text_embed.timestep_embedder.linear_1",)),
    _KeyRule("txt_in.t_embedder.mlp.2", ("context_embedder.time_text_embed.timestep_embedder.linear_2",)),
    _KeyRule("txt_in.c_embedder.linear_1", ("context_embedder.time_text_embed.text_embedder.linear_1",)),
    _KeyRule("txt_in.c_embedder.linear_2", ("context_embedder.time_text_embed.text_embedder.linear_2",)),
    _KeyRule(f"{_REF}.norm1", (f"{_DREF}.norm1",)),
    _KeyRule(f"{_REF}.norm2", (f"{_DREF}.norm2",)),
    _KeyRule(f"{_REF}.self_attn_qkv", tuple(f"{_DREF}.attn.to_{p}" for p in "qkv"), "qkv"),
    _KeyRule(f"{_REF}.self_attn_proj", (f"{_DREF}.attn.to_out.0",)),
    _KeyRule(f"{_REF}.mlp.fc1", (f"{_DREF}.ff.net.0.proj",)),
    _KeyRule(f"{_REF}.mlp.fc2", (f"{_DREF}.ff.net.2",)),
    _KeyRule(f"{_REF}.adaLN_modulation.1", (f"{_DREF}.norm_out.linear",)),
    _KeyRule(f"{_DB}.img_mod.linear", (f"{_DDB}.norm1.linear",)),
    _KeyRule(f"{_DB}.txt_mod.linear", (f"{_DDB}.norm1_context.linear",)),
    _KeyRule(f"{_DB}.img_attn_qkv", tuple(f"{_DDB}.attn.to_{p}" for p in "qkv"), "qkv"),
    _KeyRule(f"{_DB}.txt_attn_qkv", tuple(f"{_DDB}.attn.add_{p}_proj" for p in "qkv"), "qkv"),
    _KeyRule(f"{_DB}.img_attn_q_norm", (f"{_DDB}.attn.norm_q",)),
    _KeyRule(f"{_DB}.img_attn_k_norm", (f"{_DDB}.attn.norm_k",)),
    _KeyRule(f"{_DB}.txt_attn_q_norm", (f"{_DDB}.attn.norm_added_q",)),
    _KeyRule(f"{_DB}.txt_attn_k_norm", (f"{_DDB}.attn.norm_added_k",)),
    _KeyRule(f"{_DB}.img_attn_proj", (f"{_DDB}.attn.to_out.0",)),
    _KeyRule(f"{_DB}.txt_attn_proj", (f"{_DDB}.attn.to_add_out",)),
    _KeyRule(f"{_DB}.img_mlp.fc1", (f"{_DDB}.ff.net.0.proj",)),
    _KeyRule(f"{_DB}.img_mlp.fc2", (f"{_DDB}.ff.net.2",)),
    _KeyRule(f"{_DB}.txt_mlp.fc1", (f"{_DDB}.ff_context.net.0.proj",)),
    _KeyRule(f"{_DB}.txt_mlp.fc2", (f"{_DDB}.ff_context.net.2",)),
    _KeyRule(f"{_SB}.linear1", (*(f"{_DSB}.attn.to_{p}" for p in "qkv"), f"{_DSB}.proj_mlp"), "linear1"),
    _KeyRule(f"{_SB}.linear2", (f"{_DSB}.proj_out",)),
    _KeyRule(f"{_SB}.q_norm", (f"{_DSB}.attn.norm_q",)),
    _KeyRule(f"{_SB}.k_norm", (f"{_DSB}.attn.norm_k",)),
    _KeyRule(f"{_SB}.modulation.linear", (f"{_DSB}.norm.linear",)),
    _KeyRule("final_layer.linear", ("proj_out",)),
    # Parity: official (shift, scale) rows; diffusers' AdaLayerNormContinuous reads (scale, shift).
    _KeyRule("final_layer.adaLN_modulation.1", ("norm_out.linear",), "swap"),
)


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(r"(?P<n>\d+)".join(re.escape(part) for part in template.split("{n}")) + "$")


_OFFICIAL_RES = [(_template_regex(rule.official), rule) for rule in _KEY_RULES]
_DIFFUSERS_RES = [
    (_template_regex(name), rule, index) for rule in _KEY_RULES for index, name in enumerate(rule.diffusers)
]


def _split(tensor: torch.Tensor, kind: str, hidden_size: int) -> list[torch.Tensor]:
    if kind == "copy":
        return [tensor]
    if kind == "qkv":
        return list(tensor.chunk(3, dim=0))
    if kind == "linear1":
        return list(tensor.split([hidden_size] * 3 + [tensor.shape[0] - 3 * hidden_size], dim=0))
    shift, scale = tensor.chunk(2, dim=0)  # "swap"
    return [torch.cat((scale, shift), dim=0)]


def _merge(parts: list[torch.Tensor], kind: str) -> torch.Tensor:
    if kind == "copy":
        return parts[0]
    if kind == "swap":
        scale, shift = parts[0].chunk(2, dim=0)
        return torch.cat((shift, scale), dim=0)
    return torch.cat(parts, dim=0)


def _infer_hidden_size(state_dict: Mapping[str, torch.Tensor], key: str) -> int:
    if key not in state_dict:
        raise ValueError(f"cannot infer the hidden size: the state dict has no {key!r}; pass hidden_size")
    return int(state_dict[key].shape[0])


def is_diffusers_state_dict(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True when the keys are those of diffusers' HunyuanVideoTransformer3DModel."""
    prefixes = ("x_embedder.", "transformer_blocks.", "single_transformer_blocks.", "context_embedder.")
    return any(key.startswith(prefixes) for key in state_dict)


def _block_index(match: re.Match[str]) -> str:
    return match.groupdict().get("n") or ""


def diffusers_names_of(official_module: str) -> tuple[str, tuple[str, ...]] | None:
    """(split kind, diffusers module names) of an official module name, or None when it has no rule.

    The kind is "copy", "qkv" (3 equal row chunks), "linear1" (rows [H, H, H, rest]) or "swap" (the two row
    halves swapped); the names are in row order. Used to map LoRAs saved with diffusers names.
    """
    for regex, rule in _OFFICIAL_RES:
        match = regex.match(official_module)
        if match is not None:
            return rule.kind, tuple(n.replace("{n}", _block_index(match)) for n in rule.diffusers)
    return None


def convert_official_to_diffusers(
    state_dict: Mapping[str, torch.Tensor], hidden_size: int | None = None
) -> StateDict:
    """Official key names/layout -> diffusers HunyuanVideoTransformer3DModel (split tensors are copies).

    Args:
        state_dict: official DiT state dict.
        hidden_size: D, needed to split single-block `linear1`; inferred from `img_in.proj.weight` when None.
    """
    hidden = hidden_size or _infer_hidden_size(state_dict, "img_in.proj.weight")
    out: StateDict = {}
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        found = next(((r, m) for regex, r in _OFFICIAL_RES if (m := regex.match(module))), None)
        if found is None:
            raise ValueError(f"no diffusers name for the official key {key!r}")
        rule, match = found
        parts = _split(tensor, rule.kind, hidden)
        for name, part in zip(rule.diffusers, parts, strict=True):
            name = name.replace("{n}", _block_index(match))
            out[f"{name}.{param}"] = part.clone() if len(parts) > 1 else part
    return out


def convert_diffusers_to_official(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """diffusers HunyuanVideoTransformer3DModel keys -> official keys (q/k/v and linear1 parts re-fused)."""
    pending: dict[str, tuple[_KeyRule, list[torch.Tensor | None]]] = {}
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        found = next(((r, i, m) for regex, r, i in _DIFFUSERS_RES if (m := regex.match(module))), None)
        if found is None:
            raise ValueError(f"no official name for the diffusers key {key!r}")
        rule, index, match = found
        official = rule.official.replace("{n}", _block_index(match)) + "." + param
        _, parts = pending.setdefault(official, (rule, [None] * len(rule.diffusers)))
        parts[index] = tensor
    out: StateDict = {}
    for official, (rule, parts) in pending.items():
        missing = [name for name, part in zip(rule.diffusers, parts, strict=True) if part is None]
        if missing:
            raise ValueError(f"diffusers checkpoint lacks {missing} needed to build {official!r}")
        out[official] = _merge(parts, rule.kind)
    return out


# --------------------------------------------------------------------------------------------------
# diffusers' config.json -> DiTConfig
# --------------------------------------------------------------------------------------------------

DIFFUSERS_DIT_CLASS = "HunyuanVideoTransformer3DModel"
# diffusers' constructor defaults, for fields an older config.json may lack.
_DIFFUSERS_DEFAULTS = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1,
    qk_norm="rms_norm", guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768,
    rope_theta=256.0, rope_axes_dim=(16, 56, 56), image_condition_type=None,
)


def is_diffusers_dit_config(values: Mapping) -> bool:
    return isinstance(values, Mapping) and values.get("_class_name") == DIFFUSERS_DIT_CLASS


def dit_config_from_diffusers(values: Mapping, source: str = "config.json") -> DiTConfig:
    """The DiTConfig of a diffusers HunyuanVideoTransformer3DModel config.json (its constructor fields)."""
    unknown = sorted(k for k in values if not k.startswith("_") and k not in _DIFFUSERS_DEFAULTS)
    if unknown:
        raise ValueError(f"{source}: fields this loader does not know: {unknown}")
    v = {**_DIFFUSERS_DEFAULTS, **{k: values[k] for k in values if not k.startswith("_")}}
    if v["image_condition_type"] not in (None, "token_replace", "latent_concat"):
        raise ValueError(f"{source}: unknown image-to-video image_condition_type {v['image_condition_type']!r} "
                         "(known: token_replace, latent_concat)")
    if v["qk_norm"] != "rms_norm":
        raise ValueError(f"{source}: qk_norm {v['qk_norm']!r} is not supported (HunyuanVideo: 'rms_norm')")
    heads, head_dim = int(v["num_attention_heads"]), int(v["attention_head_dim"])
    return DiTConfig(
        hidden_size=heads * head_dim, heads_num=heads, mlp_width_ratio=float(v["mlp_ratio"]),
        mm_double_blocks_depth=int(v["num_layers"]), mm_single_blocks_depth=int(v["num_single_layers"]),
        rope_dim_list=tuple(int(n) for n in v["rope_axes_dim"]), rope_theta=float(v["rope_theta"]),
        patch_size=(int(v["patch_size_t"]), int(v["patch_size"]), int(v["patch_size"])),
        in_channels=int(v["in_channels"]), out_channels=int(v["out_channels"]), qk_norm=True,
        qk_norm_type="rms", guidance_embed=bool(v["guidance_embeds"]),
        text_states_dim=int(v["text_embed_dim"]), text_states_dim_2=int(v["pooled_projection_dim"]),
        refiner_depth=int(v["num_refiner_layers"]), image_condition_type=v["image_condition_type"],
    )


def find_diffusers_dit_config(path: str | os.PathLike) -> Path | None:
    """diffusers' transformer config.json for weights at `path` (a folder, its transformer/, or a file's)."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / "config.json", folder / "transformer" / "config.json"):
        if candidate.is_file():
            try:
                values = json.loads(candidate.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if is_diffusers_dit_config(values):
                return candidate
    return None


# --------------------------------------------------------------------------------------------------
# Reading checkpoints
# --------------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("module", "ema")
_DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
_DIFFUSERS_SINGLE = "diffusion_pytorch_model.safetensors"


def _read_torch_file(path: Path) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if is_mmap_refused(err):
            # A file larger than RAM + swap (the full bf16 DiT on a 24 GiB host): reading it whole would be
            # killed for memory, so map it without the swap reservation instead (see mmap_reader.py).
            return load_noreserve(path)
        if "mmap" not in str(err):
            raise
        # Files written by the legacy (pre-zip) serializer cannot be memory-mapped.
        return torch.load(path, map_location="cpu", weights_only=True)


def _read_safetensors(path: Path) -> StateDict:
    from safetensors.torch import load_file

    return load_file(str(path), device="cpu")


class MissingLoadKeyError(KeyError, ValueError):
    """The checkpoint has no entry for --load-key (a KeyError for old callers, a user error for the CLI)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def _unwrap(obj: object, load_key: str, path: Path) -> StateDict:
    """Take `obj[load_key]` from a {"module": ..., "ema": ...} wrapper; check it is a flat tensor dict."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state dict (a dict of tensors)")
    if any(key in obj for key in _WRAPPER_KEYS):
        if load_key not in obj:
            raise MissingLoadKeyError(
                f"{path} has no {load_key!r} entry; available keys: {sorted(map(str, obj))}. "
                "Choose one with load_key (--load-key)."
            )
        obj = obj[load_key]
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}[{load_key!r}] is a {type(obj).__name__}, expected a state dict")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise ValueError(f"{path} is not a flat state dict: entries that are not tensors: {not_tensors[:10]}")
    return dict(obj)


def _read_file(path: Path, load_key: str) -> StateDict:
    try:
        if path.suffix == ".safetensors":
            return _read_safetensors(path)
        obj = _read_torch_file(path)
    except Exception as err:  # garbage fails in many ways (IndexError, UnpicklingError, SafetensorError..)
        raise ValueError(f"could not read the DiT checkpoint {path}: {type(err).__name__}: {err}") from err
    return _unwrap(obj, load_key, path)


def _diffusers_shards(directory: Path) -> list[Path] | None:
    index = directory / _DIFFUSERS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    single = directory / _DIFFUSERS_SINGLE
    return [single] if single.is_file() else None


def _read_directory(directory: Path, load_key: str) -> StateDict:
    for candidate in (directory, directory / "transformer"):
        shards = _diffusers_shards(candidate) if candidate.is_dir() else None
        if shards:
            state_dict: StateDict = {}
            for shard in shards:
                if not shard.is_file():
                    raise FileNotFoundError(f"{shard} is listed in {_DIFFUSERS_INDEX} but does not exist")
                state_dict.update(_read_file(shard, load_key))
            return state_dict
    model_states = sorted(directory.glob("*_model_states.pt"))
    if model_states:
        if len(model_states) > 1:
            logger.warning("several *_model_states.pt in %s; using %s", directory, model_states[0].name)
        return _read_file(model_states[0], load_key)
    found = sorted(p.name for p in directory.iterdir())
    raise ValueError(
        f"no DiT checkpoint in {directory}: expected a '*_model_states.pt' file or diffusers "
        f"'{_DIFFUSERS_SINGLE}' (or its sharded index); found {found[:20]}"
    )


def load_dit_state_dict(path: str | os.PathLike, load_key: str = "module") -> StateDict:
    """Read DiT weights as a flat dict with the official key names (tensors on the CPU, dtypes as stored).

    Args:
        path: one of
            * a `.pt`/`.pth` file: a flat state dict, or a dict with "module"/"ema" entries (the release);
            * a directory holding `*_model_states.pt` (e.g. `ckpts/hunyuan-video-t2v-720p/transformers`);
            * a `.safetensors` file;
            * diffusers weights: a file with diffusers key names, or a directory (or its `transformer/`
              subfolder) with `diffusion_pytorch_model.safetensors` or its sharded index. These are converted.
        load_key: which entry of a wrapped checkpoint to use ("module" or "ema").
    Raises:
        FileNotFoundError, ValueError (unreadable or not a state dict), KeyError (no `load_key` entry).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"DiT checkpoint {path} does not exist")
    state_dict = _read_directory(path, load_key) if path.is_dir() else _read_file(path, load_key)
    if is_diffusers_state_dict(state_dict):
        logger.info("converting diffusers-format DiT weights from %s", path)
        state_dict = convert_diffusers_to_official(state_dict)
    return state_dict


# --------------------------------------------------------------------------------------------------
# Checking and assigning
# --------------------------------------------------------------------------------------------------


def check_not_fp8(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """ValueError when the checkpoint stores float8 tensors: they need --use-fp8 (and its scale map).

    An error rather than switching fp8 on: the fp8 loader needs the `*_fp8_map.pt` scales that belong to this
    exact file, and silently changing how the weights are read would hide a mixed-up --dit-weight.
    """
    fp8 = [key for key, tensor in state_dict.items() if tensor.dtype in _FLOAT8_DTYPES]
    if fp8:
        raise ValueError(f"{path} is an fp8 checkpoint ({len(fp8)} float8 tensors, e.g. {fp8[0]}): add "
                         "--use-fp8 to load it with its *_fp8_map.pt scales")


_FLOAT8_DTYPES = frozenset(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
    if hasattr(torch, name)
)


def _format_examples(items: list[str], limit: int = 10) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def check_dit_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError listing missing / unexpected keys and shape mismatches; silent when they all agree."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    lines = [f"the DiT state dict does not match the model ({len(expected)} tensors expected):"]
    if missing:
        lines.append(f"  {len(missing)} missing keys: {_format_examples(missing)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} unexpected keys: {_format_examples(unexpected)}")
    if shapes:
        lines.append(f"  {len(shapes)} shape mismatches: {_format_examples(shapes)}")
    if any(k.startswith("guidance_in.") for k in missing + unexpected):
        lines.append("  guidance_in differs: HYVideo-T/2-cfgdistill has it, HYVideo-T/2 does not (--model).")
    raise ValueError("\n".join(lines))


def load_dit_weights(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Check, cast and assign `state_dict` into `model` (strict). Nothing is changed if the check fails.

    Each tensor is cast to the dtype of the parameter it replaces (so FinalLayer.linear stays float32) and
    moved to `device` (default: the parameter's device, or the CPU for a model on the meta device).
    """
    check_dit_state_dict(model, state_dict)
    cast: StateDict = {}
    for key, current in model.state_dict().items():
        target = device if device is not None else ("cpu" if current.is_meta else current.device)
        cast[key] = state_dict[key].to(device=target, dtype=current.dtype)
    model.load_state_dict(cast, strict=True, assign=True)
    return model


def build_dit(
    config: DiTConfig,
    state_dict: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str | None = None,
    attention_backend: str = "auto",
) -> HYVideoDiffusionTransformer:
    """Build the DiT on the meta device and assign `state_dict` (official keys) to it, in eval mode.

    Args:
        config: architecture (e.g. HUNYUAN_VIDEO_CONFIG["HYVideo-T/2-cfgdistill"]).
        state_dict: official-key weights, e.g. from `load_dit_state_dict`.
        dtype: parameter dtype (FinalLayer.linear stays float32); None = float32.
        device: where the weights go (default CPU).
        attention_backend: "auto", "flash", "sdpa", "vanilla" or a registered name.
    """
    model = HYVideoDiffusionTransformer(
        config, dtype=dtype, device="meta", attention_backend=attention_backend
    )
    load_dit_weights(model, state_dict, device=device if device is not None else "cpu")
    return model.eval()


def load_dit(
    config: DiTConfig,
    path: str | os.PathLike,
    *,
    load_key: str = "module",
    dtype: torch.dtype | None = torch.bfloat16,
    device: torch.device | str | None = None,
    attention_backend: str = "auto",
) -> HYVideoDiffusionTransformer:
    """`load_dit_state_dict(path, load_key)` then `build_dit(...)`; see both for the arguments.

    An fp8 checkpoint is refused: without its scale map the fp8 values would be read as plain weights.
    """
    state_dict = load_dit_state_dict(path, load_key)
    check_not_fp8(state_dict, path)
    model = build_dit(config, state_dict, dtype=dtype, device=device, attention_backend=attention_backend)
    logger.info("loaded DiT weights from %s (%d tensors)", path, len(state_dict))
    return model
