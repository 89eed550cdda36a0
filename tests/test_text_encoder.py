"""Text encoders: the real Llama-3 / CLIP tokenizers with tiny random-weight models (float32, CPU)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from hyvideo.constants import PROMPT_TEMPLATE, PromptTemplate
from hyvideo.testing.tokenizers import write_clip_tokenizer, write_llama3_tokenizer
from hyvideo.text_encoder import (
    CLIPTextEncoder,
    TextEncoder,
    count_template_prefix_tokens,
)
from tests.helpers import rel_err

PROMPT = "A cat walks on the grass, realistic style."
PROMPT_2 = "A golden retriever runs along a beach at sunset, waves crash behind it, cinematic lighting."
# machine_facts §5.1 / §5.2 (Llama-3 ids without BOS; CLIP ids with start and end tokens)
LLAMA_PROMPT_IDS = [32, 8415, 23291, 389, 279, 16763, 11, 26569, 1742, 13]
CLIP_PROMPT_IDS = [49406, 320, 2368, 8192, 525, 518, 5922, 267, 16157, 1844, 269, 49407]
BOS, EOT, CLIP_EOS = 128000, 128009, 49407

LLAMA_LAYERS = 4


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LLAMA_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128320,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
    )


def tiny_clip_config() -> CLIPConfig:
    text = dict(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        eos_token_id=2,  # as in openai/clip-vit-large-patch14: pooled at the argmax id (the first end token)
    )
    vision = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=16,
    )
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return write_llama3_tokenizer(root / "llama3"), write_clip_tokenizer(root / "clip")


@pytest.fixture(scope="module")
def llama_tokenizer(tokenizer_dirs):
    return AutoTokenizer.from_pretrained(tokenizer_dirs[0], padding_side="right")


@pytest.fixture(scope="module")
def llm_folder(tmp_path_factory):
    """A `text_encoder/` folder as the original preprocessing writes it: a LlamaForCausalLM + tokenizer."""
    folder = tmp_path_factory.mktemp("text_encoder")
    torch.manual_seed(1)
    causal_lm = LlamaForCausalLM(tiny_llama_config()).eval()
    causal_lm.save_pretrained(folder)
    write_llama3_tokenizer(folder)
    return folder, causal_lm


@pytest.fixture(scope="module")
def llm(llm_folder) -> TextEncoder:
    return TextEncoder.from_pretrained(llm_folder[0], dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A `text_encoder_2/` folder like openai/clip-vit-large-patch14: a whole CLIPModel + tokenizer."""
    folder = tmp_path_factory.mktemp("text_encoder_2")
    torch.manual_seed(2)
    clip_model = CLIPModel(tiny_clip_config()).eval()
    clip_model.save_pretrained(folder)
    write_clip_tokenizer(folder)
    return folder, clip_model


@pytest.fixture(scope="module")
def clip(clip_folder) -> CLIPTextEncoder:
    return CLIPTextEncoder.from_pretrained(clip_folder[0], dtype=torch.float32, device="cpu")


def with_skip(llm: TextEncoder, skip: int | None, apply_final_norm: bool = False) -> TextEncoder:
    return TextEncoder(
        llm.model, llm.tokenizer, hidden_state_skip_layer=skip, apply_final_norm=apply_final_norm
    )


def layer_output(model, index: int, run):
    """Output of decoder layer `index` (0-based) captured by a forward hook while `run()` executes."""
    captured = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = model.layers[index].register_forward_hook(hook)
    try:
        result = run()
    finally:
        handle.remove()
    return captured[0], result


# --------------------------------------------------------------------------------------------------
# Tokenization
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["dit-llm-encode-video", "dit-llm-encode"])
def test_template_prefix_with_bos_has_crop_start_tokens(llama_tokenizer, name):
    template = PROMPT_TEMPLATE[name]
    ids = llama_tokenizer(template.template.format(PROMPT))["input_ids"]
    user = llama_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    starts = [i for i in range(len(ids)) if ids[i : i + len(user)] == user]
    assert ids[0] == BOS
    assert starts == [template.crop_start]
    assert ids[template.crop_start + len(user) :] == [EOT]
    assert count_template_prefix_tokens(llama_tokenizer, name) == template.crop_start


def test_llama_ids_of_the_user_text(llama_tokenizer):
    assert llama_tokenizer(PROMPT, add_special_tokens=False)["input_ids"] == LLAMA_PROMPT_IDS
    assert llama_tokenizer.pad_token_id == 128258


def test_clip_ids_are_the_published_ones(clip, tokenizer_dirs):
    ids = clip.tokenize(PROMPT)["input_ids"][0].tolist()
    assert ids == CLIP_PROMPT_IDS + [CLIP_EOS] * (77 - len(CLIP_PROMPT_IDS))
    assert CLIPTokenizer.from_pretrained(tokenizer_dirs[1])(PROMPT)["input_ids"] == CLIP_PROMPT_IDS
    assert AutoTokenizer.from_pretrained(tokenizer_dirs[1])(PROMPT)["input_ids"] == CLIP_PROMPT_IDS


@pytest.mark.parametrize("data_type", ["video", "image"])
def test_both_templates_use_351_positions(llm, data_type):
    # Parity: the image template (crop 36) keeps the video budget 256 + 95 (spec §10.5 item 8).
    template = llm.template_for(data_type)
    prefix = llm.tokenizer(template.template[: template.template.index("{}")])["input_ids"]
    tokens = llm.tokenize([PROMPT, PROMPT_2], data_type=data_type)
    assert tokens["input_ids"].shape == (2, 351)
    assert tokens["input_ids"][0, : len(prefix)].tolist() == prefix
    n_real = template.crop_start + len(LLAMA_PROMPT_IDS) + 1
    assert tokens["attention_mask"][0].tolist() == [1] * n_real + [0] * (351 - n_real)
    assert tokens["input_ids"][0, n_real:].eq(128258).all()


# --------------------------------------------------------------------------------------------------
# Hidden state selection and crop
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [1, 2, 3])
def test_state_is_skip_layers_before_the_last(llm, skip):
    encoder = with_skip(llm, skip)
    state, out = layer_output(llm.model, LLAMA_LAYERS - 1 - skip, lambda: encoder.encode([PROMPT, PROMPT_2]))
    assert out.hidden_state.shape == (2, 256, 32)
    assert rel_err(out.hidden_state, state[:, 95:]) == 0.0


def test_skip_zero_is_the_final_normed_state(llm):
    encoder = with_skip(llm, 0)
    state, out = layer_output(llm.model, LLAMA_LAYERS - 1, lambda: encoder.encode(PROMPT))
    assert rel_err(out.hidden_state, llm.model.norm(state)[:, 95:]) < 1e-6
    assert rel_err(out.hidden_state, with_skip(llm, None).encode(PROMPT).hidden_state) == 0.0


def test_apply_final_norm_normalizes_the_skipped_state(llm):
    encoder = with_skip(llm, 2, apply_final_norm=True)
    state, out = layer_output(llm.model, LLAMA_LAYERS - 3, lambda: encoder.encode(PROMPT))
    assert rel_err(out.hidden_state, llm.model.norm(state)[:, 95:]) < 1e-6
    assert rel_err(out.hidden_state, llm.encode(PROMPT).hidden_state) > 1e-2


@pytest.mark.parametrize(("data_type", "crop", "length"), [("video", 95, 256), ("image", 36, 315)])
def test_crop_lines_up_with_the_mask(llm, data_type, crop, length):
    out = llm.encode([PROMPT, PROMPT_2], data_type=data_type)
    assert out.hidden_state.shape == (2, length, 32) and llm.output_length(data_type) == length
    assert out.attention_mask.shape == out.input_ids.shape == (2, length)
    assert out.attention_mask.dtype == torch.int64
    for i, prompt in enumerate([PROMPT, PROMPT_2]):
        mask = out.attention_mask[i]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # right padded
        assert llm.tokenizer.decode(out.input_ids[i, :n]) == prompt + "<|eot_id|>"
    # Whole forward by hand: the template prefix is what the crop removes.
    template = llm.template_for(data_type).template
    tokens = llm.tokenizer(
        [template.format(PROMPT)], padding="max_length", max_length=351, return_tensors="pt"
    )
    with torch.no_grad():
        full = llm.model(**tokens, output_hidden_states=True).hidden_states[-3]
    assert rel_err(out.hidden_state[:1], full[:, crop:]) < 1e-6


def test_prompts_are_stripped(llm, clip):
    padded = f"  {PROMPT} \n"
    assert torch.equal(llm.encode(padded).hidden_state, llm.encode(PROMPT).hidden_state)
    assert torch.equal(clip.encode(padded).pooled_output, clip.encode(PROMPT).pooled_output)


def test_custom_template_object(llm):
    template = PromptTemplate("<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>", crop_start=5)
    encoder = TextEncoder(llm.model, llm.tokenizer, text_len=16, prompt_template_video=template)
    out = encoder.encode(PROMPT)
    assert out.hidden_state.shape == (1, 16, 32)
    assert out.input_ids[0, :10].tolist() == LLAMA_PROMPT_IDS


# --------------------------------------------------------------------------------------------------
# Parity with diffusers
# --------------------------------------------------------------------------------------------------


def test_matches_diffusers_encode_prompt(llm, clip):
    from diffusers import HunyuanVideoPipeline
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    assert DEFAULT_PROMPT_TEMPLATE["template"] == PROMPT_TEMPLATE["dit-llm-encode-video"].template
    pipe = HunyuanVideoPipeline(
        text_encoder=llm.model,
        tokenizer=llm.tokenizer,
        transformer=None,
        vae=None,
        scheduler=None,
        text_encoder_2=clip.model,
        tokenizer_2=clip.tokenizer,
    )
    prompts = [PROMPT, PROMPT_2]
    with torch.no_grad():
        embeds, pooled, mask = pipe.encode_prompt(prompts, device=torch.device("cpu"), dtype=torch.float32)
    ours = llm.encode(prompts, data_type="video")
    ours_clip = clip.encode(prompts)
    assert ours.hidden_state.shape == embeds.shape == (2, 256, 32)
    assert rel_err(ours.hidden_state, embeds) <= 1e-6
    assert torch.equal(ours.attention_mask, mask)
    assert ours_clip.pooled_output.shape == pooled.shape == (2, 32)
    assert rel_err(ours_clip.pooled_output, pooled) <= 1e-6


def test_clip_pooled_is_the_normed_state_at_the_first_end_token(clip):
    out = clip.encode([PROMPT, PROMPT_2])
    ends = (out.input_ids == CLIP_EOS).int().argmax(-1)
    assert ends[0].item() == len(CLIP_PROMPT_IDS) - 1
    expected = out.hidden_state[torch.arange(2), ends]
    assert rel_err(out.pooled_output, expected) == 0.0
    assert out.hidden_state.shape == (2, 77, 32)


# --------------------------------------------------------------------------------------------------
# Bad and long prompts
# --------------------------------------------------------------------------------------------------


def test_long_llm_prompt_warns_with_the_dropped_count(llm, caplog):
    prompt = " ".join(["cat"] * 300)
    n_tokens = len(
        llm.tokenizer(PROMPT_TEMPLATE["dit-llm-encode-video"].template.format(prompt))["input_ids"]
    )
    assert n_tokens == 95 + 300 + 1
    with caplog.at_level(logging.WARNING, logger="hyvideo.text_encoder"):
        out = llm.encode([PROMPT, prompt])
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and "Prompt 1" in messages[0]
    assert "the last 45 token(s) were dropped" in messages[0]
    assert out.attention_mask[1].all() and out.input_ids[1, -1].item() != EOT


def test_long_clip_prompt_warns_with_the_dropped_count(clip, caplog):
    prompt = " ".join(["dog"] * 100)
    with caplog.at_level(logging.WARNING, logger="hyvideo.text_encoder"):
        out = clip.encode(prompt)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and "the last 25 token(s) were dropped" in messages[0]
    assert out.input_ids[0, -1].item() == CLIP_EOS and out.attention_mask.all()


def test_warning_starts_one_token_past_the_limit(llm, clip, caplog):
    fits = " ".join(["cat"] * 255)  # 255 words + <|eot_id|> = 256 tokens after the template
    with caplog.at_level(logging.WARNING, logger="hyvideo.text_encoder"):
        out = llm.encode(fits)
        clip.encode(" ".join(["dog"] * 75))  # 75 words + start and end = 77 tokens
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert out.input_ids[0, -1].item() == EOT
    with caplog.at_level(logging.WARNING, logger="hyvideo.text_encoder"):
        out = llm.encode(fits + " cat")
        clip.encode(" ".join(["dog"] * 76))
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 2 and all("the last 1 token(s) were dropped" in m for m in messages)
    assert out.input_ids[0, -1].item() == 8415  # " cat": only the closing <|eot_id|> was cut


@pytest.mark.parametrize("bad", ["", "   \n\t", [PROMPT, " "], []])
def test_empty_prompt_is_a_value_error(llm, clip, bad):
    with pytest.raises(ValueError, match="empty|No prompt"):
        llm.encode(bad)
    with pytest.raises(ValueError, match="empty|No prompt"):
        clip.encode(bad)


def test_bad_arguments(llm):
    with pytest.raises(ValueError, match="data_type"):
        llm.encode(PROMPT, data_type="image_video")
    with pytest.raises(ValueError, match="hidden_state_skip_layer"):
        with_skip(llm, LLAMA_LAYERS)
    with pytest.raises(ValueError, match="Unknown prompt template"):
        TextEncoder(llm.model, llm.tokenizer, prompt_template="dit-llm-encode-audio")


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def test_loads_the_base_model_of_a_causal_lm_folder(llm, llm_folder):
    expected = llm_folder[1].model.state_dict()
    loaded = llm.model.state_dict()
    assert type(llm.model).__name__ == "LlamaModel"
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert not any(p.requires_grad for p in llm.model.parameters()) and not llm.model.training


def test_loads_the_clip_text_tower_of_a_clip_model_folder(clip, clip_folder):
    expected = clip_folder[1].text_model.state_dict()
    loaded = clip.model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_loads_like_the_original_fp32_load_then_cast(llm_folder):
    # The original loads in fp32 and calls .to(dtype), which also rounds the RoPE frequencies (a buffer).
    from transformers import AutoModel

    low = TextEncoder.from_pretrained(llm_folder[0], dtype="bf16")
    assert low.dtype == torch.bfloat16
    original = AutoModel.from_pretrained(llm_folder[0]).to(torch.bfloat16)
    assert torch.equal(low.model.rotary_emb.inv_freq, original.rotary_emb.inv_freq)
    tokens = low.tokenize([PROMPT, PROMPT_2])
    with torch.no_grad():
        expected = original(**tokens, output_hidden_states=True).hidden_states[-3][:, 95:]
    out = low.encode([PROMPT, PROMPT_2])
    assert out.hidden_state.dtype == torch.bfloat16
    assert torch.equal(out.hidden_state, expected)


def test_clip_dtype_argument(clip_folder):
    clip16 = CLIPTextEncoder.from_pretrained(clip_folder[0], dtype=torch.float16)
    assert clip16.dtype == torch.float16
    assert clip16.encode(PROMPT).pooled_output.dtype == torch.float16


@pytest.mark.parametrize("cls", [TextEncoder, CLIPTextEncoder])
def test_missing_folder_is_a_clear_error(tmp_path, cls):
    missing = tmp_path / "ckpts" / "text_encoder"
    with pytest.raises(FileNotFoundError) as info:
        cls.from_pretrained(missing)
    assert str(missing) in str(info.value) and "ckpts/README.md" in str(info.value)
    missing.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="config.json.*ckpts/README.md"):
        cls.from_pretrained(missing)


def test_llava_folder_points_at_the_preprocessing_script(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(ValueError, match="preprocess_text_encoder_tokenizer_utils.py"):
        TextEncoder.from_pretrained(tmp_path)


def test_missing_weights_are_an_error(tmp_path, llm_folder):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    for f in llm_folder[0].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = LLAMA_LAYERS + 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lacks .* weights"):
        TextEncoder.from_pretrained(folder, dtype=torch.float32)


def test_clip_vocabulary_is_shipped_and_needs_no_network(tmp_path, monkeypatch):
    import subprocess

    import hyvideo.testing.tokenizers as assets

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"a subprocess was started: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)
    path = assets.clip_bpe_file(cache_dir=tmp_path)
    assert assets._sha256(path.read_bytes()) == assets.CLIP_SHA256
    assert (assets.CLIP_BPE_SHIPPED.parent / "LICENSE-CLIP-BPE.txt").read_text().startswith("MIT License")


def test_altered_clip_vocabulary_is_a_clear_error(tmp_path, monkeypatch):
    import hyvideo.testing.tokenizers as assets

    altered = tmp_path / "bpe.txt.gz"
    altered.write_bytes(b"not the vocabulary")
    monkeypatch.setattr(assets, "CLIP_BPE_SHIPPED", altered)
    with pytest.raises(RuntimeError, match="sha256.*restore it from the repository"):
        assets.clip_bpe_file(cache_dir=tmp_path / "cache")


def test_block_offload_streams_the_llm_layers_bit_exactly(llm, clip):
    """--use-cpu-offload (mode block) streams the LLM's decoder layers; the encoding is unchanged."""
    from hyvideo.lowmem.offload import LLM_BLOCKS, apply_offload

    resident = llm.encode([PROMPT, PROMPT_2])
    dit = torch.nn.Module()
    dit.double_blocks, dit.single_blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)]), torch.nn.ModuleList()
    plan = apply_offload({"text_encoder": llm, "text_encoder_2": clip, "transformer": dit}, mode="block",
                         device="cpu", pin_memory=False)
    try:
        assert "text_encoder" in plan.offloaders and "text_encoder" not in plan.staged
        offloader = plan.offloaders["text_encoder"]
        layers = list(llm.model.get_submodule(LLM_BLOCKS[0].removeprefix("model.")))
        assert offloader.units == layers and not any(offloader.is_onloaded(m) for m in layers)
        with plan.stage("text_encoder", "text_encoder_2"):
            streamed = llm.encode([PROMPT, PROMPT_2])
    finally:
        plan.remove()
    assert torch.equal(streamed.hidden_state, resident.hidden_state)
    assert torch.equal(streamed.attention_mask, resident.attention_mask)
