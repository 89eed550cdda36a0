"""torchrun worker: the compiled sequence-parallel DiT equals the eager one (CPU, gloo).

Usage: python -m torch.distributed.run --standalone --nproc_per_node=2 compile_worker.py OUT.pt BACKEND

Every rank builds the same DiT (sp_cases.build_dit), runs one forward eagerly under Ulysses 2, compiles its
blocks with torch.compile backend BACKEND (the sequence-parallel attention runs eagerly between two graphs
per block) and runs the same forward again. Rank 0 saves both outputs and dynamo's graph count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `import hyvideo` / `tests`

from hyvideo.modules.compile import compile_dit_blocks  # noqa: E402
from hyvideo.parallel import destroy, init_sequence_parallel  # noqa: E402
from tests.parallel_workers import sp_cases as cases  # noqa: E402

CASE = "odd_mixed_text"  # 45 image tokens (padded over 2 ranks) and a text key mask


def main() -> None:
    torch.set_num_threads(1)
    out_path, backend = Path(sys.argv[1]), sys.argv[2]
    state = init_sequence_parallel(2, 1, timeout_s=120)
    dit = cases.build_dit()
    dit.enable_sequence_parallel(state)
    inputs = cases.dit_inputs(CASE)
    with torch.no_grad():
        eager = dit(**inputs)
        compiled_blocks = compile_dit_blocks(dit, backend=backend)
        compiled = dit(**inputs)
    if state.is_main:
        stats = dict(torch._dynamo.utils.counters["stats"])
        torch.save({"eager": eager, "compiled": compiled, "unique_graphs": stats.get("unique_graphs", 0),
                    "fullgraph": compiled_blocks.fullgraph}, out_path)
    destroy(state)


if __name__ == "__main__":
    main()
