"""scripts/preprocess_text_encoder_tokenizer_utils.py on a tiny LLaVA-Llama-3 with the real tokenizer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import (
    AutoTokenizer,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

from hyvideo.constants import PROMPT_TEMPLATE
from hyvideo.testing.tokenizers import write_llama3_tokenizer
from hyvideo.text_encoder import TextEncoder
from tests.helpers import rel_err

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "preprocess_text_encoder_tokenizer_utils.py"
PROMPTS = ["A cat walks on the grass, realistic style.", "Two boats drift on a calm lake at dawn."]


def load_script():
    spec = importlib.util.spec_from_file_location("preprocess_text_encoder_tokenizer_utils", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A tiny LLaVA-Llama-3 checkpoint folder (as xtuner's, in miniature) with the real tokenizer."""
    folder = tmp_path_factory.mktemp("ckpts") / "llava-llama-3-8b-v1_1-transformers"
    text = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128320,
        max_position_embeddings=512,
    )
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        image_size=32,
        patch_size=16,
    )
    torch.manual_seed(3)
    llava = LlavaForConditionalGeneration(
        LlavaConfig(text_config=text, vision_config=vision, image_token_index=128257)
    )
    llava.save_pretrained(folder)
    write_llama3_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def converted(script, llava_dir):
    assert script.main(["--input_dir", str(llava_dir)]) == 0
    return llava_dir.parent / "text_encoder"


@pytest.fixture(scope="module")
def llava_tokenizer(llava_dir):
    return AutoTokenizer.from_pretrained(llava_dir, padding_side="right")


def reference_states(llava, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden_states[-3] of the LLaVA's own language model (fp16 weights as saved), cropped by 95."""
    language_model = llava.model.language_model
    with (
        torch.no_grad()
    ):  # the weights as saved in fp16 (buffers untouched: the loader computes them in fp32)
        for p in language_model.parameters():
            p.copy_(p.half().float())
    template = PROMPT_TEMPLATE["dit-llm-encode-video"]
    texts = [template.template.format(p) for p in PROMPTS]
    tokens = tokenizer(texts, padding="max_length", max_length=351, truncation=True, return_tensors="pt")
    with torch.no_grad():
        states = language_model(**tokens, output_hidden_states=True).hidden_states[-3]
    return states[:, 95:], tokens["attention_mask"][:, 95:]


def test_converted_folder_gives_the_llava_language_model_states(converted, llava_dir, llava_tokenizer):
    encoder = TextEncoder.from_pretrained(converted, dtype=torch.float32)
    out = encoder.encode(PROMPTS, data_type="video")
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir, dtype=torch.float32)
    expected, mask = reference_states(llava, llava_tokenizer)
    assert out.hidden_state.shape == expected.shape == (2, 256, 32)
    assert rel_err(out.hidden_state, expected) <= 1e-6
    assert torch.equal(out.attention_mask, mask)
    assert encoder.tokenizer.decode(out.input_ids[0, : int(mask[0].sum())]) == PROMPTS[0] + "<|eot_id|>"


def test_converted_folder_is_a_causal_lm_like_the_original(converted, llava_dir, llava_tokenizer):
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    causal_lm = LlamaForCausalLM.from_pretrained(converted)
    llava = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    assert causal_lm.dtype == torch.float16
    assert torch.equal(causal_lm.lm_head.weight, llava.lm_head.weight.half())
    assert torch.equal(
        causal_lm.model.embed_tokens.weight, llava.model.language_model.embed_tokens.weight.half()
    )
    saved = AutoTokenizer.from_pretrained(converted)
    assert saved(PROMPTS[0])["input_ids"] == llava_tokenizer(PROMPTS[0])["input_ids"]
    assert saved.pad_token == "<pad>"


def test_explicit_output_dir(script, llava_dir, tmp_path):
    out = tmp_path / "somewhere" / "text_encoder"
    assert script.main(["--input_dir", str(llava_dir), "--output_dir", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_legacy_structure_is_returned_as_is(script):
    # transformers 4.x keeps a whole LlamaForCausalLM at `llava.language_model`.
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    causal_lm = LlamaForCausalLM(config)
    assert script.extract_causal_lm(SimpleNamespace(language_model=causal_lm)) is causal_lm


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_missing_input_dir_exits_2(script, tmp_path, capsys):
    assert script.main(["--input_dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in one_line_error(capsys)


def test_folder_without_config_exits_2(script, tmp_path, capsys):
    assert script.main(["--input_dir", str(tmp_path)]) == 2
    assert "no config.json" in one_line_error(capsys)


def test_non_llava_checkpoint_exits_2(script, tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert script.main(["--input_dir", str(tmp_path)]) == 2
    assert "not a LLaVA checkpoint" in one_line_error(capsys)


def test_llava_without_tokenizer_exits_2(script, llava_dir, tmp_path, capsys):
    folder = tmp_path / "llava"
    folder.mkdir()
    (folder / "config.json").write_bytes((llava_dir / "config.json").read_bytes())
    assert script.main(["--input_dir", str(folder)]) == 2
    assert "cannot load the tokenizer" in one_line_error(capsys)
    assert not (tmp_path / "text_encoder").exists()


def test_command_line_exit_status(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--input_dir", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "does not exist" in result.stderr
