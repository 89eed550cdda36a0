"""Prompt rewriting before encoding (the paper's Normal / Master modes), with two back ends.

The HunyuanVideo paper rewrites user prompts with a large LLM so that they read like the training captions
(English, subject - action - scene - shot - style, no jargon). The original repository only ships two
instruction texts; here the instructions are our own wording of the same rules, and the rewriting runs on

* an OpenAI-compatible `/v1/chat/completions` server (vLLM, SGLang, llama.cpp, Ollama, a hosted API),
  through the standard library's urllib: one JSON POST needs no client package, and we keep full control of
  timeouts, retries and error messages (the `openai` client retries and raises its own exceptions); or
* the LLaVA-Llama-3 language model that is already loaded as the text encoder, in generation mode (its chat
  template, greedy decoding, bounded length), with only its LM head loaded beside it: no second model.

Interface: `rewrite_prompt(prompt, mode, backend) -> RewriteResult`; `rewrite_prompts` adds the
--rewrite-fallback policy for a list. The runner calls it once, before any prompt is encoded.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

logger = logging.getLogger(__name__)

REWRITE_MODES = ("normal", "master")
API_KEY_ENV_VARS = ("HYVIDEO_REWRITE_API_KEY", "OPENAI_API_KEY")  # read by hyvideo/config/, in this order
DEFAULT_LOCAL_MAX_NEW_TOKENS = 256  # the text encoder keeps 256 prompt tokens; more would be cut anyway
RETRY_BASE_DELAY_S = 1.0  # backoff: 1 s, 2 s, 4 s, ...
FALLBACK_HINT = "add --rewrite-fallback to continue with the original prompt"

_SHARED_RULES = """\
You rewrite prompts for a text-to-video generation model. Turn the user's prompt into one fluent English \
description of the video, written like a video caption: first the main subject and what it is doing, then \
the surroundings, then the shot and camera if the prompt mentions them, then the style and mood.
Rules:
1. Keep every piece of information in the prompt: subjects, numbers, colours, actions, places, shot and \
camera terms, and every style word (such as realistic, anime, cinematic, black and white, oil painting). \
Drop nothing and contradict nothing.
2. If the prompt is written in Chinese or any language other than English, translate it faithfully into \
English.
3. If the prompt has only one or two words, expand it into a short, concrete visual description of a scene \
that shows it.
4. Replace jargon, slang and abstract wording with plain words that describe what is seen. Do not add new \
subjects or a story."""

_ANSWER_RULE = """\
Answer in English only, with the rewritten prompt alone: no title, no quotation marks, no explanation, \
no list."""

NORMAL_INSTRUCTIONS = f"""{_SHARED_RULES}
5. Stay close to the length of the prompt; only a very short prompt grows.
{_ANSWER_RULE}"""

MASTER_INSTRUCTIONS = f"""{_SHARED_RULES}
5. Then enrich it with detailed visual and aesthetic description that fits the prompt and its style: \
lighting (direction, quality, time of day), colour palette, composition and framing, camera angle and \
movement, lens and depth of field, textures and materials, and atmosphere. Keep it to one paragraph of at \
most about 120 words.
{_ANSWER_RULE}"""

INSTRUCTIONS = {"normal": NORMAL_INSTRUCTIONS, "master": MASTER_INSTRUCTIONS}


class RewriteError(ValueError):
    """Rewriting failed (server unreachable, bad answer, ...); the message is one line for the user."""


# --------------------------------------------------------------------------------------------------
# Configuration and results
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewriteConfig:
    """--prompt-rewrite and its --rewrite-* flags; mode None means no rewriting (the default)."""

    mode: str | None = None
    endpoint: str | None = None  # base URL or full .../v1/chat/completions; None: the loaded LLM
    model: str | None = None
    timeout_s: float = 60.0
    retries: int = 2
    max_tokens: int | None = None  # None: the server's default, DEFAULT_LOCAL_MAX_NEW_TOKENS locally
    fallback: bool = False
    api_key_env: str | None = None  # the variable the key came from (recorded; the key itself is not)
    # Never written anywhere: the runner drops it from the sidecar's settings.
    api_key: str | None = field(default=None, repr=False, compare=False)

    @property
    def enabled(self) -> bool:
        return self.mode is not None

    @property
    def uses_endpoint(self) -> bool:
        return self.endpoint is not None


@dataclass(frozen=True)
class RewriteResult:
    """One prompt before and after rewriting; `fallback_reason` is set when the original was kept."""

    original: str
    rewritten: str
    mode: str
    backend: str
    fallback_reason: str | None = None

    def as_record(self) -> dict:
        """What the sidecar records under "prompt_rewrite"."""
        record = {"original_prompt": self.original, "mode": self.mode, "backend": self.backend,
                  "rewritten_prompt": self.rewritten}
        if self.fallback_reason is not None:
            record["fallback_reason"] = self.fallback_reason
        return record


class RewriteBackend(Protocol):
    """Something that answers a system + user chat with one text."""

    name: str

    def complete(self, messages: list[dict[str, str]]) -> str: ...


@dataclass
class UnavailableBackend:
    """A back end that could not be set up: every rewrite raises its error (for --rewrite-fallback)."""

    name: str
    error: RewriteError

    def complete(self, messages: list[dict[str, str]]) -> str:
        raise self.error


def chat_messages(prompt: str, mode: str) -> list[dict[str, str]]:
    """The chat sent to the rewriting model: our instructions for `mode`, then the user's prompt."""
    if mode not in INSTRUCTIONS:
        raise ValueError(f"unknown rewrite mode {mode!r}: use one of {', '.join(REWRITE_MODES)}")
    return [{"role": "system", "content": INSTRUCTIONS[mode]}, {"role": "user", "content": prompt.strip()}]


def rewrite_prompt(prompt: str, mode: str, backend: RewriteBackend) -> RewriteResult:
    """Rewrite one prompt; RewriteError (one line) when the back end fails or answers nothing usable."""
    answer = backend.complete(chat_messages(prompt, mode))
    try:
        rewritten = clean_rewrite(answer)
    except RewriteError as exc:
        raise RewriteError(f"prompt rewrite ({backend.name}): {exc}") from None
    return RewriteResult(original=prompt.strip(), rewritten=rewritten, mode=mode, backend=backend.name)


def rewrite_prompts(
    prompts: Sequence[str], mode: str, backend: RewriteBackend, *, fallback: bool = False
) -> list[RewriteResult]:
    """Rewrite every prompt; with `fallback` a failure keeps that prompt as it was (logged as a warning)."""
    results = []
    for prompt in prompts:
        try:
            result = rewrite_prompt(prompt, mode, backend)
        except RewriteError as exc:
            if not fallback:
                raise
            logger.warning("%s; continuing with the original prompt (--rewrite-fallback)", exc)
            result = RewriteResult(original=prompt.strip(), rewritten=prompt.strip(), mode=mode,
                                   backend=backend.name, fallback_reason=str(exc))
        else:
            logger.info("Rewritten prompt (%s, %s): %s", mode, backend.name, result.rewritten)
        results.append(result)
    return results


# --------------------------------------------------------------------------------------------------
# Post-processing of the model's answer
# --------------------------------------------------------------------------------------------------

_THINK_BLOCK = re.compile(r"<(think|thinking|reasoning)>.*?</\1>", re.IGNORECASE | re.DOTALL)
_THINK_OPEN = re.compile(r"<(think|thinking|reasoning)>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"</(?:think|thinking|reasoning)>", re.IGNORECASE)
_FENCE = re.compile(r"^```[\w-]*[ \t]*\n?(.*?)\n?```$", re.DOTALL)
_LEAD_IN = re.compile(  # "Here is the rewritten prompt:", "Sure! Here's an enhanced version:"
    r"^(?:sure|okay|ok|certainly|of course)?[!,.\s]*here(?:'s| is)\b[^\n:]{0,80}:\s*", re.IGNORECASE
)
_LABEL = re.compile(  # "Rewritten prompt:", "**Enhanced Prompt:**", "Prompt -", "Output:"
    r"^\**\s*(?:(?:rewritten|revised|improved|enhanced|expanded|final|new|english|optimi[sz]ed|refined)\s+)?"
    r"(?:prompt|description|video description|caption|version|output|answer|result)\s*\**\s*[:：\-]\s*\**\s*",
    re.IGNORECASE,
)
_TRAILING_NOTE = re.compile(  # a last paragraph "Note: I kept ..." / "(Explanation: ...)"
    r"\n\s*\n\s*\(?\**(?:note|notes|explanation|changes)\b.*$", re.IGNORECASE | re.DOTALL
)
_QUOTE_PAIRS = (('"', '"'), ("'", "'"), ("“", "”"), ("‘", "’"), ("«", "»"), ("「", "」"), ("『", "』"),
                ("`", "`"), ("**", "**"), ("*", "*"))


def clean_rewrite(answer: str) -> str:
    """The rewritten prompt alone, from a model's answer; RewriteError when nothing is left.

    Removes reasoning blocks (<think>...</think>, also an unclosed start or a lone closing tag), a markdown
    code fence, lead-ins and labels ("Here is the rewritten prompt:", "**Rewritten prompt:**"), a trailing
    note paragraph, surrounding quotes or bold markers, and joins lines into one.
    """
    if not isinstance(answer, str):
        raise RewriteError(f"the answer is not text ({type(answer).__name__})")
    text = _THINK_BLOCK.sub("", answer)
    closing = list(_THINK_CLOSE.finditer(text))
    if closing:  # some servers drop the opening tag: everything before the last closing one is reasoning
        text = text[closing[-1].end():]
    opened = _THINK_OPEN.search(text)
    if opened:  # reasoning that never finished (the token limit hit it): nothing after it is an answer
        text = text[: opened.start()]
    text = _TRAILING_NOTE.sub("", text.strip())
    previous = None
    while text != previous:
        previous = text
        text = text.strip()
        fenced = _FENCE.match(text)
        if fenced:
            text = fenced.group(1)
        text = _LABEL.sub("", _LEAD_IN.sub("", text)).strip()
        text = _strip_quote_pair(text)
    text = " ".join(text.split())
    if not text:
        raise RewriteError("the answer holds no rewritten prompt (empty after removing reasoning, "
                           f"labels and quotes; the answer began {answer.strip()[:60]!r})")
    return text


def _strip_quote_pair(text: str) -> str:
    """Remove one pair of quotes (or bold markers) around the whole text, not around a quoted word in it."""
    for left, right in _QUOTE_PAIRS:
        if len(text) < len(left) + len(right) or not (text.startswith(left) and text.endswith(right)):
            continue
        inner = text[len(left): len(text) - len(right)]
        if left not in inner and right not in inner:
            return inner.strip()
    return text


# --------------------------------------------------------------------------------------------------
# Back end 1: an OpenAI-compatible chat-completions server
# --------------------------------------------------------------------------------------------------


def chat_completions_url(endpoint: str) -> str:
    """Accept a base URL ("http://host:8000", ".../v1") or the full ".../v1/chat/completions"."""
    url = endpoint.strip().rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return f"{url}/chat/completions" if url.endswith("/v1") else f"{url}/v1/chat/completions"


class _Retryable(Exception):
    """A failure worth another try (unreachable, timeout, HTTP 429/5xx); its message is one line."""


@dataclass
class ChatCompletionsBackend:
    """POSTs the chat to an OpenAI-compatible server; greedy (temperature 0) for repeatable rewrites."""

    endpoint: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 60.0
    retries: int = 2
    max_tokens: int | None = None
    sleep: Callable[[float], None] = time.sleep  # tests pass a recorder instead of waiting

    @property
    def url(self) -> str:
        return chat_completions_url(self.endpoint)

    @property
    def name(self) -> str:
        return f"endpoint {self.url} (model {self.model})"

    def complete(self, messages: list[dict[str, str]]) -> str:
        body = {"model": self.model, "messages": messages, "temperature": 0, "stream": False}
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        for attempt in range(self.retries + 1):
            try:
                return self._post_once(json.dumps(body).encode("utf-8"))
            except _Retryable as exc:
                if attempt == self.retries:
                    tries = f" (after {attempt + 1} tries)" if attempt else ""
                    raise RewriteError(f"prompt rewrite: {exc}{tries}; {FALLBACK_HINT}") from None
                delay = RETRY_BASE_DELAY_S * 2**attempt
                logger.warning("prompt rewrite: %s; retrying in %.0f s", exc, delay)
                self.sleep(delay)
        raise AssertionError("unreachable")

    def _post_once(self, payload: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=payload, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise self._http_error(exc) from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(self._timeout_message()) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(self._timeout_message()) from None
            raise _Retryable(f"cannot reach {self.url} ({_reason(exc.reason)}): start the server or fix "
                             "--rewrite-endpoint") from None
        except (ConnectionError, OSError) as exc:
            raise _Retryable(f"cannot reach {self.url} ({_reason(exc)}): start the server or fix "
                             "--rewrite-endpoint") from None
        return self._answer_text(raw)

    def _timeout_message(self) -> str:
        return (f"{self.url} did not answer within {self.timeout_s:g} s: raise --rewrite-timeout or use a "
                "faster server")

    def _http_error(self, exc: urllib.error.HTTPError) -> Exception:
        detail = _error_detail(exc)
        if exc.code == 429 or exc.code >= 500:
            return _Retryable(f"{self.url} answered HTTP {exc.code}{detail}")
        hint = {401: f"set the API key in ${API_KEY_ENV_VARS[0]} (or ${API_KEY_ENV_VARS[1]})",
                403: f"check the API key in ${API_KEY_ENV_VARS[0]}",
                404: "check --rewrite-endpoint (the server's base URL) and --rewrite-model (a model it "
                     "serves)"}
        fix = hint.get(exc.code, "check --rewrite-endpoint and --rewrite-model")
        return RewriteError(f"prompt rewrite: {self.url} answered HTTP {exc.code}{detail}: {fix}; "
                            f"{FALLBACK_HINT}")

    def _answer_text(self, raw: bytes) -> str:
        try:
            reply = json.loads(raw.decode("utf-8"))
            content = reply["choices"][0]["message"]["content"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, IndexError, TypeError):
            start = raw[:60].decode("utf-8", errors="replace")
            raise RewriteError(f"prompt rewrite: {self.url} did not answer with a chat completion (the "
                               f"answer began {start!r}): is it an OpenAI-compatible server?; "
                               f"{FALLBACK_HINT}") from None
        if not isinstance(content, str):
            raise RewriteError(f"prompt rewrite: {self.url} answered a message without text content; "
                               f"{FALLBACK_HINT}")
        return content


def _reason(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    text = getattr(reason, "strerror", None) or str(reason)
    return " ".join(str(text).split()) or type(reason).__name__


def _error_detail(exc: urllib.error.HTTPError) -> str:
    """The server's own error message, if its body says one (OpenAI shape or plain text), shortened."""
    try:
        body = exc.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    try:
        parsed = json.loads(body)
        error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
        message = error.get("message", "") if isinstance(error, dict) else str(error)
    except json.JSONDecodeError:
        message = body
    message = " ".join(str(message).split())[:160]
    return f" ({message})" if message else ""


# --------------------------------------------------------------------------------------------------
# Back end 2: the loaded LLM text encoder, in generation mode
# --------------------------------------------------------------------------------------------------

LLAMA3_STOP_TOKENS = ("<|eot_id|>", "<|end_of_text|>")


def llama3_chat_text(messages: list[dict[str, str]]) -> str:
    """The Llama-3 chat format (the one the encoder templates use), ending where the assistant answers."""
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>"
                    for m in messages)
    return f"{turns}<|start_header_id|>assistant<|end_header_id|>\n\n"


def chat_prompt_text(tokenizer, messages: list[dict[str, str]]) -> str:
    """The tokenizer's own chat template when it has one, else the Llama-3 format."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return llama3_chat_text(messages)


def load_lm_head(folder: str | Path, *, dtype, device):
    """The LM head (vocab x hidden) of the causal LM saved in the text encoder folder, as an nn.Linear.

    The text encoder is loaded as a base model (no head); the folder written by the preprocessing script
    holds the whole LlamaForCausalLM, so only `lm_head.weight` is read (or the tied input embeddings).
    """
    import torch
    from safetensors import safe_open

    folder = Path(folder)
    weight = _find_tensor(folder, "lm_head.weight")
    if weight is None:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        if config.get("tie_word_embeddings"):
            weight = _find_tensor(folder, "model.embed_tokens.weight")
    if weight is None:
        raise RewriteError(f"prompt rewrite: {folder} holds no lm_head.weight, so the loaded LLM cannot "
                           "generate: re-run scripts/preprocess_text_encoder_tokenizer_utils.py or use "
                           f"--rewrite-endpoint; {FALLBACK_HINT}")
    file, key = weight
    with safe_open(str(file), framework="pt") as handle:
        tensor = handle.get_tensor(key)
    head = torch.nn.Linear(tensor.shape[1], tensor.shape[0], bias=False, device="meta")
    head.weight = torch.nn.Parameter(tensor.to(device=device, dtype=dtype), requires_grad=False)
    return head


def _find_tensor(folder: Path, key: str) -> tuple[Path, str] | None:
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        return (folder / weight_map[key], key) if key in weight_map else None
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            if key in handle.keys():
                return file, key
    return None


def encode_chat(tokenizer, messages: list[dict[str, str]]):
    """Token ids (1, L) of the chat, ready for generation; BOS once (added here unless the text has it)."""
    text = chat_prompt_text(tokenizer, messages)
    has_bos = tokenizer.bos_token is not None and text.startswith(tokenizer.bos_token)
    return tokenizer(text, add_special_tokens=not has_bos, return_tensors="pt")["input_ids"]


def stop_token_ids(tokenizer) -> set[int]:
    """End of turn and end of text (Llama-3), plus the tokenizer's EOS."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    return ids | {vocab[t] for t in LLAMA3_STOP_TOKENS if t in vocab}


def greedy_generate(model, lm_head, input_ids, *, max_new_tokens: int, stop_ids: set[int]) -> list[int]:
    """Greedy decoding with a KV cache on a base LM (returns hidden states) + its head.

    Args:
        model: a transformers base model (LlamaModel) whose `last_hidden_state` is final-normed.
        lm_head: hidden -> vocabulary logits.
        input_ids: (1, L) prompt tokens on the model's device.
    Returns: the new token ids, at most `max_new_tokens`, without the stop token.
    """
    import torch

    # transformers 5.x renamed `past_key_values` to `cache` (the old name warns until it is removed).
    cache_keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    generated: list[int] = []
    step_ids, cache = input_ids, None
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            past = {cache_keyword: cache} if cache is not None else {}
            out = model(input_ids=step_ids, use_cache=True, **past)
            cache = getattr(out, cache_keyword)  # (the KV cache, grown by this step)
            next_id = int(lm_head(out.last_hidden_state[:, -1]).argmax(dim=-1)[0])  # (1, V) -> token
            if next_id in stop_ids:
                break
            generated.append(next_id)
            step_ids = torch.tensor([[next_id]], device=input_ids.device)
    return generated


@dataclass
class LocalLLMBackend:
    """Generates with the loaded LLM text encoder (hyvideo.text_encoder.TextEncoder) and its LM head."""

    text_encoder: object  # TextEncoder: `.model` (LlamaModel) and `.tokenizer`
    lm_head: object
    device: object
    max_new_tokens: int = DEFAULT_LOCAL_MAX_NEW_TOKENS
    name: str = "local LLM text encoder (greedy)"

    def complete(self, messages: list[dict[str, str]]) -> str:
        tokenizer = self.text_encoder.tokenizer
        input_ids = encode_chat(tokenizer, messages).to(self.device)
        new_ids = greedy_generate(self.text_encoder.model, self.lm_head, input_ids,
                                  max_new_tokens=self.max_new_tokens, stop_ids=stop_token_ids(tokenizer))
        if len(new_ids) == self.max_new_tokens:
            logger.warning("prompt rewrite: the local LLM reached the %d-token limit (--rewrite-max-tokens); "
                           "the rewritten prompt may be cut short", self.max_new_tokens)
        return tokenizer.decode(new_ids, skip_special_tokens=True)
