"""Serve HunyuanVideo: a web page at / and an OpenAI-style video API at /v1/videos, over one job queue.

    python gradio_server.py                          # tiny random weights when ckpts/ has none (demo)
    python gradio_server.py --model-base ckpts --video-size 544 960 --infer-steps 50
    torchrun --nproc_per_node=8 gradio_server.py --ulysses-degree 8   # rank 0 serves, all ranks sample

Binds 127.0.0.1:8081 unless --server-name/--server-port (or $SERVER_NAME/$SERVER_PORT) say otherwise; set
$HYVIDEO_SERVER_TOKEN to require a bearer token. The sampling flags of sample_video.py are the defaults of
every job. See README.md ("Web server and API").
"""

from __future__ import annotations

import os
import sys

from hyvideo.config import parse_server_args


def main(argv: list[str] | None = None) -> int:
    configs, server = parse_server_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the original does the same
    from hyvideo.server.main import serve  # heavy imports once the flags are known to be valid

    return serve(configs, server)


if __name__ == "__main__":
    sys.exit(main())
