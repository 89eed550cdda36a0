"""torchrun worker that must fail on every rank with a clear error: ulysses 4 x ring 1 on 2 processes.

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 bad_layout_worker.py

The world size is only known after the process group exists (torchrun's env:// init), so this exercises the
path that creates the group, finds the mismatch, tears the group down and raises.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `import hyvideo`

from hyvideo.parallel import init_sequence_parallel  # noqa: E402

if __name__ == "__main__":
    init_sequence_parallel(4, 1, timeout_s=30)
    print("BAD LAYOUT ACCEPTED", flush=True)  # reaching this line is the failure the test looks for
