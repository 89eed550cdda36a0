"""Write a tiny random-weight checkpoint tree in the official layout (for tests and the install check).

    python scripts/make_tiny_ckpts.py ckpts-tiny
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hyvideo.testing.tiny import write_tiny_checkpoints  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="folder to write (created if missing)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    write_tiny_checkpoints(args.root, i2v=True)  # the T2V and the I2V (image-to-video) trees
    return 0


if __name__ == "__main__":
    sys.exit(main())
