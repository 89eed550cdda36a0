"""sample_video.py --prompt-rewrite end to end on the tiny tree, with a chat server on 127.0.0.1."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from hyvideo.prompt_rewrite import MASTER_INSTRUCTIONS
from hyvideo.testing.chat_server import FakeChatServer, expected_rewrite
from hyvideo.utils.file_utils import load_latents
from tests.parallel_workers.launch import REPO, tail, torchrun
from tests.test_sample_video import SMALL, run, tiny_tree  # noqa: F401 - tiny_tree is a fixture


def sidecars(folder: Path) -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("*.json"))]


def files(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.exists() else []


def test_endpoint_rewrite_reaches_encoder_and_sidecar(tiny_tree, tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setenv("HYVIDEO_REWRITE_API_KEY", "sk-secret-123")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n一只狗在雪地里奔跑\n", encoding="utf-8")
    out = tmp_path / "rewritten"
    with FakeChatServer() as server, caplog.at_level("INFO"):
        code, err = run(["--model-base", str(tiny_tree), "--prompt-file", str(prompts), "--seed", "7",
                         "--save-path", str(out), "--save-latents", "--prompt-rewrite", "master",
                         "--rewrite-endpoint", server.url, "--rewrite-model", "tiny-rewriter", *SMALL],
                        capsys)
    assert code == 0, err
    # What we sent: one request per line, the Master instructions, the user's prompt, the model name, the key.
    assert [r["body"]["messages"][1]["content"] for r in server.requests] == ["a cat", "一只狗在雪地里奔跑"]
    assert all(r["body"]["messages"][0]["content"] == MASTER_INSTRUCTIONS for r in server.requests)
    assert all(r["body"]["model"] == "tiny-rewriter" for r in server.requests)
    assert server.requests[0]["headers"]["Authorization"] == "Bearer sk-secret-123"
    records = sidecars(out)
    assert len(records) == 2
    by_original = {r["prompt_rewrite"]["original_prompt"]: r for r in records}
    cat = by_original["a cat"]
    wanted = expected_rewrite("a cat", "tiny-rewriter", "master")
    assert cat["prompt"] == wanted and cat["prompt_rewrite"]["rewritten_prompt"] == wanted
    assert cat["prompt_rewrite"]["mode"] == "master" and "tiny-rewriter" in cat["prompt_rewrite"]["backend"]
    assert f"Prompt 1/2: {wanted}" in caplog.text  # the log shows the encoded prompt
    assert all("sk-secret-123" not in p.read_text(encoding="utf-8") for p in out.glob("*.json"))
    # Files are named after the user's prompt.
    assert any(p.name.endswith("_seed7_a cat.mp4") for p in out.glob("*.mp4"))
    # The encoder got the rewritten text: the same latents as asking for it directly.
    direct = tmp_path / "direct"
    code, err = run(["--model-base", str(tiny_tree), "--prompt", wanted, "--seed", "7", "--save-path",
                     str(direct), "--save-latents", *SMALL], capsys)
    assert code == 0, err
    (direct_latents,) = direct.glob("*.safetensors")
    (rewritten_latents,) = (p for p in out.glob("*.safetensors") if p.name.endswith("_a cat.safetensors"))
    np.testing.assert_array_equal(load_latents(direct_latents)[0].numpy(),
                                  load_latents(rewritten_latents)[0].numpy())


def test_server_down_exits_2_one_line_nothing_written(tiny_tree, tmp_path, capsys):
    with FakeChatServer() as server:
        url = server.url  # closed on leaving: nothing listens there any more
    out = tmp_path / "never"
    code, err = run(["--model-base", str(tiny_tree), "--prompt", "a cat", "--save-path", str(out),
                     "--prompt-rewrite", "normal", "--rewrite-endpoint", url, "--rewrite-model", "m",
                     "--rewrite-retries", "0", *SMALL], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot reach" in err and "connection refused" in err and "--rewrite-fallback" in err
    assert files(out) == []


def test_slow_server_times_out(tiny_tree, tmp_path, capsys):
    out = tmp_path / "never"
    with FakeChatServer(delay_s=1.5) as server:
        code, err = run(["--model-base", str(tiny_tree), "--prompt", "a cat", "--save-path", str(out),
                         "--prompt-rewrite", "normal", "--rewrite-endpoint", server.url,
                         "--rewrite-model", "m", "--rewrite-timeout", "0.3", "--rewrite-retries", "0", *SMALL],
                        capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "did not answer within 0.3 s" in err and "--rewrite-timeout" in err
    assert files(out) == []


def test_fallback_continues_with_the_original_prompt(tiny_tree, tmp_path, capsys, caplog):
    out = tmp_path / "fallback"
    with FakeChatServer(raw_body=b"<html>not an API</html>") as server, caplog.at_level("WARNING"):
        code, err = run(["--model-base", str(tiny_tree), "--prompt", "a cat", "--seed", "1", "--save-path",
                         str(out), "--prompt-rewrite", "normal", "--rewrite-endpoint", server.url,
                         "--rewrite-model", "m", "--rewrite-fallback", *SMALL], capsys)
    assert code == 0, err
    (record,) = sidecars(out)
    assert record["prompt"] == "a cat" and record["prompt_rewrite"]["rewritten_prompt"] == "a cat"
    assert "chat completion" in record["prompt_rewrite"]["fallback_reason"]
    assert "continuing with the original prompt" in caplog.text


def test_local_llm_rewrites_when_no_endpoint(tiny_tree, tmp_path, capsys, caplog):
    out = tmp_path / "local"
    with caplog.at_level("INFO"):
        code, err = run(["--model-base", str(tiny_tree), "--prompt", "a cat", "--seed", "1", "--save-path",
                         str(out), "--prompt-rewrite", "normal", "--rewrite-max-tokens", "6", *SMALL], capsys)
    assert code == 0, err
    (record,) = sidecars(out)
    rewrite = record["prompt_rewrite"]
    # Random weights write gibberish; what matters is that it was generated, cleaned and encoded.
    assert rewrite["backend"].startswith("local LLM") and rewrite["original_prompt"] == "a cat"
    assert record["prompt"] == rewrite["rewritten_prompt"] != "a cat"
    assert record["prompt"] == " ".join(record["prompt"].split())
    assert f"Prompt 1/1: {record['prompt']}" in caplog.text
    assert record["settings"]["rewrite"]["max_tokens"] == 6


@pytest.mark.multigpu
def test_torchrun_rank0_rewrites_and_shares(tiny_tree, tmp_path):
    out = tmp_path / "parallel"
    with FakeChatServer() as server:
        proc, _ = torchrun(2, REPO / "sample_video.py", "--model-base", str(tiny_tree), "--prompt", "a cat",
                           "--seed", "3", "--save-path", str(out), "--ulysses-degree", "2",
                           "--prompt-rewrite", "normal", "--rewrite-endpoint", server.url,
                           "--rewrite-model", "m", *SMALL)
    assert proc.returncode == 0, tail(proc)
    assert len(server.requests) == 1  # only rank 0 asked
    (record,) = sidecars(out)
    assert record["prompt"] == expected_rewrite("a cat", "m", "normal")
    # A failure decided on rank 0 is reported once, and every rank stops with status 2.
    with FakeChatServer(status=404) as server:
        proc, _ = torchrun(2, REPO / "sample_video.py", "--model-base", str(tiny_tree), "--prompt", "a cat",
                           "--save-path", str(tmp_path / "never"), "--ulysses-degree", "2",
                           "--prompt-rewrite", "normal", "--rewrite-endpoint", server.url,
                           "--rewrite-model", "m", *SMALL)
    logs = proc.stdout + proc.stderr
    assert proc.returncode != 0 and logs.count("answered HTTP 404") == 1, tail(proc)
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", logs)
    assert "2" in codes and set(codes) <= {"2", "-15"}, codes
    assert files(tmp_path / "never") == []
