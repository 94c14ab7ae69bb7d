"""Task ``dualstream`` trained through ``capret.tasks.dualstream.run``; started under torchrun by
``test_dualstream_ddp.py`` (and called in-process there for the single-process reference).

Usage: ``python -m torch.distributed.run --nproc_per_node 2 tests/helpers/dualstream_ddp_worker.py CONFIG OUTPUT_DIR P``.
``P`` is the number of identities per *local* batch: the single-process reference takes ``2 P`` so both runs
optimise on the same global batches (the P x K sampler hands whole batches to ranks in order, and its per-sample
seeds fix augmentations and caption dropout independently of the rank).
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch


def main(config_path: str, output_dir: str, p: str | int) -> dict[str, Any]:
    """Train the task of ``config_path`` into ``output_dir`` with ``p`` identities per local batch."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from capret.config import load_config
    from capret.engine.distributed import cleanup_distributed, init_distributed
    from capret.tasks.dualstream import DualStreamConfig, run

    torch.set_num_threads(1)
    config = load_config(
        DualStreamConfig, config_path, [f"trainer.output_dir={output_dir}", f"data.p={int(p)}"]
    )
    # The group is created here with a short collective timeout (train() joins an existing group), so ranks that
    # disagree on their collectives fail within a minute instead of waiting for the default 30.
    ctx = init_distributed("cpu", timeout_s=60.0)
    try:
        return run(config)
    finally:
        cleanup_distributed(ctx)


if __name__ == "__main__":
    main(*sys.argv[1:])
