"""Prompt rewrite units: answer post-processing, the chat-completions client, the local greedy generator."""

from __future__ import annotations

import pytest
import torch

from hyvideo import config
from hyvideo.prompt_rewrite import (
    MASTER_INSTRUCTIONS,
    NORMAL_INSTRUCTIONS,
    ChatCompletionsBackend,
    LocalLLMBackend,
    RewriteError,
    chat_completions_url,
    chat_messages,
    clean_rewrite,
    encode_chat,
    greedy_generate,
    load_lm_head,
    rewrite_prompt,
    rewrite_prompts,
    stop_token_ids,
)
from hyvideo.testing.chat_server import FakeChatServer, expected_rewrite

# --------------------------------------------------------------------------------------------------
# Post-processing on answers shaped like what real servers return
# --------------------------------------------------------------------------------------------------

CLEAN = "A tabby cat walks across a sunlit lawn, realistic style."


@pytest.mark.parametrize("answer", [
    CLEAN,
    f'"{CLEAN}"',
    f"“{CLEAN}”",
    f"Rewritten prompt: {CLEAN}",
    f"**Rewritten Prompt:** {CLEAN}",
    f"**Enhanced prompt:**\n\n\"{CLEAN}\"",
    f"Here is the rewritten prompt:\n\n{CLEAN}",
    f"Sure! Here's an enhanced version of your prompt:\n\n> {CLEAN}".replace("> ", ""),
    f"```\n{CLEAN}\n```",
    f"```text\n{CLEAN}\n```",
    f"<think>\nThe user wants a cat. I should keep 'realistic'.\n</think>\n\n{CLEAN}",
    f"<think></think>\n\nRewritten prompt: \"{CLEAN}\"",  # Qwen3 with thinking switched off
    f"Okay, the user wants a cat video.\n</think>\n\n{CLEAN}",  # opening tag dropped by the server
    f"{CLEAN}\n\nNote: I kept the style word 'realistic' and added the lawn.",
    f"  A tabby cat walks across\na sunlit lawn,   realistic style.  ",
])
def test_clean_rewrite_real_world_answers(answer):
    assert clean_rewrite(answer) == CLEAN


def test_clean_rewrite_keeps_inner_quotes_and_words_that_look_like_labels():
    text = 'A neon sign reading "OPEN" flickers at night; the prompt: cinematic.'
    assert clean_rewrite(text) == text
    harbour = "A description of a foggy harbour at dawn."
    assert clean_rewrite(harbour) == harbour


@pytest.mark.parametrize("answer", ["", "   ", '""', "<think>The user wants a cat so I will", "```\n```",
                                    "Rewritten prompt:", "<think>a</think>\n\n**"])
def test_clean_rewrite_refuses_empty(answer):
    with pytest.raises(RewriteError, match="no rewritten prompt"):
        clean_rewrite(answer)


def test_instructions_state_the_rules():
    for text in (NORMAL_INSTRUCTIONS, MASTER_INSTRUCTIONS):
        assert "Chinese" in text and "English" in text and "one or two words" in text
        assert "style word" in text and "rewritten prompt alone" in text
    assert "aesthetic" in MASTER_INSTRUCTIONS and "aesthetic" not in NORMAL_INSTRUCTIONS
    messages = chat_messages("  一只猫  ", "master")
    assert messages == [{"role": "system", "content": MASTER_INSTRUCTIONS},
                        {"role": "user", "content": "一只猫"}]
    with pytest.raises(ValueError, match="unknown rewrite mode"):
        chat_messages("x", "fancy")


@pytest.mark.parametrize("endpoint, url", [
    ("http://h:8000", "http://h:8000/v1/chat/completions"),
    ("http://h:8000/v1/", "http://h:8000/v1/chat/completions"),
    ("https://api.example.com/v1/chat/completions", "https://api.example.com/v1/chat/completions"),
    ("http://h:11434/api/openai", "http://h:11434/api/openai/v1/chat/completions"),
])
def test_chat_completions_url(endpoint, url):
    assert chat_completions_url(endpoint) == url


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------


def _errors(argv):
    return config.validation_errors(config.build_parser().parse_args(argv))


@pytest.mark.parametrize("argv, needle", [
    (["--rewrite-endpoint", "http://x"], "need --prompt-rewrite"),
    (["--rewrite-fallback"], "need --prompt-rewrite"),
    (["--prompt-rewrite", "normal", "--rewrite-endpoint", "http://x"], "needs --rewrite-model"),
    (["--prompt-rewrite", "normal", "--rewrite-model", "m"], "needs --rewrite-endpoint"),
    (["--prompt-rewrite", "normal", "--rewrite-endpoint", "localhost:8000", "--rewrite-model", "m"],
     "http:// or https://"),
    (["--prompt-rewrite", "normal", "--rewrite-timeout", "0"], "--rewrite-timeout must be > 0"),
    (["--prompt-rewrite", "normal", "--rewrite-retries", "-1"], "--rewrite-retries must be >= 0"),
    (["--prompt-rewrite", "normal", "--rewrite-max-tokens", "0"], "--rewrite-max-tokens must be >= 1"),
])
def test_bad_rewrite_flags(argv, needle):
    assert any(needle in e for e in _errors(argv)), _errors(argv)


def test_rewrite_config_and_api_key_from_environment(monkeypatch):
    assert config.parse_args(["--prompt", "x"]).rewrite.enabled is False
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    argv = ["--prompt", "x", "--prompt-rewrite", "master", "--rewrite-endpoint", "http://h/v1",
            "--rewrite-model", "m", "--rewrite-timeout", "5", "--rewrite-fallback"]
    rewrite = config.parse_args(argv).rewrite
    assert (rewrite.mode, rewrite.model, rewrite.timeout_s, rewrite.fallback) == ("master", "m", 5.0, True)
    assert (rewrite.api_key, rewrite.api_key_env) == ("sk-openai", "OPENAI_API_KEY")
    assert "sk-openai" not in repr(rewrite)
    monkeypatch.setenv("HYVIDEO_REWRITE_API_KEY", "sk-ours")  # ours wins over OPENAI_API_KEY
    assert config.parse_args(argv).rewrite.api_key == "sk-ours"
    from hyvideo.runner import settings_record

    assert "sk-ours" not in str(settings_record(config.parse_args(argv)))


# --------------------------------------------------------------------------------------------------
# The chat-completions back end against a local server
# --------------------------------------------------------------------------------------------------


def test_endpoint_request_and_answer():
    with FakeChatServer() as server:
        backend = ChatCompletionsBackend(endpoint=server.url, model="qwen-test", api_key="sk-1", timeout_s=5)
        result = rewrite_prompt(" 一只猫在草地上走 ", "normal", backend)
    (request,) = server.requests
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == "Bearer sk-1"
    body = request["body"]
    assert body["model"] == "qwen-test" and body["temperature"] == 0 and "max_tokens" not in body
    assert body["messages"] == chat_messages("一只猫在草地上走", "normal")
    assert result.rewritten == expected_rewrite("一只猫在草地上走", "qwen-test", "normal")
    assert result.original == "一只猫在草地上走" and result.mode == "normal" and "qwen-test" in result.backend


def test_endpoint_server_error_is_retried_with_backoff_then_reported():
    waits = []
    with FakeChatServer(status=503) as server:
        backend = ChatCompletionsBackend(endpoint=server.url, model="m", retries=2, timeout_s=5,
                                         sleep=waits.append)
        with pytest.raises(RewriteError, match=r"HTTP 503 \(boom\) \(after 3 tries\)") as info:
            backend.complete(chat_messages("x", "normal"))
    assert waits == [1.0, 2.0] and len(server.requests) == 3
    assert "\n" not in str(info.value) and "--rewrite-fallback" in str(info.value)


@pytest.mark.parametrize("status, needle", [(401, "HYVIDEO_REWRITE_API_KEY"), (404, "--rewrite-model")])
def test_endpoint_client_errors_are_not_retried(status, needle):
    with FakeChatServer(status=status) as server:
        backend = ChatCompletionsBackend(endpoint=server.url, model="m", retries=3, sleep=pytest.fail)
        with pytest.raises(RewriteError, match=needle):
            backend.complete(chat_messages("x", "normal"))
    assert len(server.requests) == 1


@pytest.mark.parametrize("raw", [b"<html>It works!</html>", b'{"choices": []}', b'{"object": "list"}'])
def test_endpoint_garbage_answer(raw):
    with FakeChatServer(raw_body=raw) as server:
        backend = ChatCompletionsBackend(endpoint=server.url, model="m", retries=0)
        with pytest.raises(RewriteError, match="did not answer with a chat completion"):
            backend.complete(chat_messages("x", "normal"))


def test_endpoint_unreachable_and_slow():
    with FakeChatServer() as server:
        url = server.url
    down = ChatCompletionsBackend(endpoint=url, model="m", retries=1, sleep=lambda s: None)
    with pytest.raises(RewriteError, match=r"cannot reach .*connection refused.*after 2 tries"):
        down.complete(chat_messages("x", "normal"))
    with FakeChatServer(delay_s=1.0) as server:
        slow = ChatCompletionsBackend(endpoint=server.url, model="m", retries=0, timeout_s=0.2)
        with pytest.raises(RewriteError, match=r"did not answer within 0.2 s: raise --rewrite-timeout"):
            slow.complete(chat_messages("x", "normal"))


def test_fallback_keeps_the_original_prompt(caplog):
    with FakeChatServer(status=500) as server:
        backend = ChatCompletionsBackend(endpoint=server.url, model="m", retries=0)
        with pytest.raises(RewriteError):
            rewrite_prompts(["a", "b"], "normal", backend)
        results = rewrite_prompts(["a", "b"], "normal", backend, fallback=True)
    assert [r.rewritten for r in results] == ["a", "b"]
    assert all("HTTP 500" in r.fallback_reason for r in results)
    assert "continuing with the original prompt" in caplog.text


# --------------------------------------------------------------------------------------------------
# The local back end: the tiny LLM (random weights) in generation mode
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    from hyvideo.testing.tiny import write_llm
    from hyvideo.text_encoder import TextEncoder

    folder = write_llm(tmp_path_factory.mktemp("llm"))
    return folder, TextEncoder.from_pretrained(folder, dtype=torch.float32)


def test_local_chat_uses_the_llama3_template(tiny_llm):
    _, llm = tiny_llm
    messages = chat_messages("a red ball", "normal")
    ids = encode_chat(llm.tokenizer, messages)[0].tolist()
    text = llm.tokenizer.decode(ids)
    assert ids[0] == llm.tokenizer.bos_token_id and ids.count(llm.tokenizer.bos_token_id) == 1
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           "You rewrite prompts")
    assert text.endswith("<|start_header_id|>user<|end_header_id|>\n\na red ball<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # A tokenizer that carries its own chat template is used as it is.
    llm.tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                                   "{% endfor %}")
    try:
        own = llm.tokenizer.decode(encode_chat(llm.tokenizer, messages)[0])
    finally:
        llm.tokenizer.chat_template = None
    assert own.startswith("<|begin_of_text|>[system]You rewrite") and own.endswith("[user]a red ball")
    assert own.count("<|begin_of_text|>") == 1


def test_local_greedy_generation_matches_transformers_generate(tiny_llm):
    from transformers import LlamaForCausalLM

    folder, llm = tiny_llm
    head = load_lm_head(folder, dtype=torch.float32, device="cpu")
    input_ids = encode_chat(llm.tokenizer, chat_messages("a red ball", "master"))
    ours = greedy_generate(llm.model, head, input_ids, max_new_tokens=6, stop_ids=set())
    reference = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    theirs = reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    assert ours == theirs[0, input_ids.shape[1]:].tolist()
    # Generation stops at a stop token, which is not returned.
    assert greedy_generate(llm.model, head, input_ids, max_new_tokens=6, stop_ids={ours[2]}) == ours[:2]


def test_local_backend_bounded_and_cleaned(tiny_llm, caplog):
    folder, llm = tiny_llm
    head = load_lm_head(folder, dtype=torch.float32, device="cpu")
    backend = LocalLLMBackend(text_encoder=llm, lm_head=head, device=torch.device("cpu"), max_new_tokens=5)
    result = rewrite_prompt("a red ball", "normal", backend)
    # Random weights: gibberish, but at most 5 tokens, stripped to one line, and not the prompt itself.
    assert 0 < len(llm.tokenizer(result.rewritten, add_special_tokens=False)["input_ids"]) <= 5 + 2
    assert result.rewritten == " ".join(result.rewritten.split()) and result.rewritten != "a red ball"
    assert "reached the 5-token limit" in caplog.text
    assert stop_token_ids(llm.tokenizer) >= {128001, 128009}


def test_lm_head_missing_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"tie_word_embeddings": false}')
    with pytest.raises(RewriteError, match="holds no lm_head.weight.*--rewrite-endpoint"):
        load_lm_head(tmp_path, dtype=torch.float32, device="cpu")
