"""gradio_server.py's flags: safe defaults, the original's SERVER_NAME/SERVER_PORT, the token from the
environment only, one-line errors, and the choice between real weights, the tiny tree and an error."""

from __future__ import annotations

import pytest

from hyvideo.config import DEFAULT_SERVER_NAME, parse_args, parse_server_args
from hyvideo.server.main import check_port_free, choose_weights
from hyvideo.testing.tiny import write_tiny_checkpoints


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("SERVER_NAME", "SERVER_PORT", "HYVIDEO_SERVER_TOKEN", "MODEL_BASE", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


def test_defaults_bind_localhost_without_auth():
    configs, server = parse_server_args([])
    assert (server.host, server.port, server.token) == (DEFAULT_SERVER_NAME, 8081, None)
    assert str(configs.runtime.save_path) == "gradio_outputs" and not server.model_base_given


def test_environment_and_flags(monkeypatch):
    monkeypatch.setenv("SERVER_NAME", "0.0.0.0")
    monkeypatch.setenv("SERVER_PORT", "9000")
    monkeypatch.setenv("HYVIDEO_SERVER_TOKEN", " t0ken ")
    configs, server = parse_server_args(["--infer-steps", "30", "--max-steps", "40", "--model-base", "x"])
    assert (server.host, server.port, server.token, server.limits.max_steps) == ("0.0.0.0", 9000, "t0ken", 40)
    assert configs.sampling.infer_steps == 30 and server.model_base_given
    assert parse_server_args(["--server-port", "9001"])[1].port == 9001  # the flag wins


@pytest.mark.parametrize(("argv", "env", "message"), [
    (["--max-queue", "0"], {}, "--max-queue must be >= 1"),
    (["--server-port", "70000"], {}, "--server-port must be between 1 and 65535"),
    ([], {"SERVER_PORT": "eighty"}, "SERVER_PORT='eighty' is not a port number"),
    (["--infer-steps", "0"], {}, "--infer-steps must be >= 1"),
])
def test_bad_values_exit_2_with_one_line(monkeypatch, capsys, argv, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        parse_server_args(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_the_cli_has_no_server_flags():
    with pytest.raises(SystemExit):
        parse_args(["--prompt", "x", "--server-port", "1"])


def test_weights_choice(tmp_path, monkeypatch):
    tiny = write_tiny_checkpoints(tmp_path / "tiny")
    configs, server = parse_server_args(["--model-base", str(tiny)])
    chosen, is_tiny = choose_weights(configs, server)  # explicit tiny tree: banner, small fp32 defaults
    assert is_tiny and chosen.model.model_base == tiny and chosen.model.vae_precision == "fp32"
    assert (chosen.sampling.height, chosen.sampling.video_length) == (128, 17)
    configs, server = parse_server_args(["--model-base", str(tmp_path / "missing")])
    chosen, is_tiny = choose_weights(configs, server)  # explicit but empty: the loader's error later
    assert not is_tiny and chosen.model.model_base == tmp_path / "missing"


def test_busy_port_is_a_one_line_error():
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ValueError, match="choose another --server-port"):
            check_port_free("127.0.0.1", busy.getsockname()[1])
