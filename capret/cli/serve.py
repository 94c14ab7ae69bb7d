"""``capret serve --pipeline DIR [--combiner CKPT] [--host 127.0.0.1] [--port 8000]``: the web demo."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="web page + JSON API: image-to-image and composed queries over a shop gallery",
        description="Serve a query pipeline (capret index build / capret quickstart's qs/pipeline) as a web page "
        "for people and a JSON API (/docs). Binds to 127.0.0.1 unless --host says otherwise.",
    )
    p.add_argument("--pipeline", type=Path, required=True, help="pipeline folder (pipeline.json)")
    p.add_argument("--combiner", type=Path, help="optional Combiner checkpoint for composed queries")
    p.add_argument(
        "--host", default="127.0.0.1", help="interface to bind (default: %(default)s, this machine)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available else cpu)")
    p.add_argument("--max-upload-mb", type=float, default=8.0, help="largest accepted upload (default: 8 MB)")
    p.add_argument("--max-concurrency", type=int, default=2, help="searches run at once (default: 2)")
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from capret.config import ConfigError
    from capret.serve import ServeBackend, create_app, serve

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.max_concurrency < 1:
        raise ConfigError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    backend = ServeBackend.from_pipeline_dir(args.pipeline, combiner=args.combiner, device=args.device)
    app = create_app(
        backend,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_concurrency=args.max_concurrency,
    )
    print(f"capret serve: http://{args.host}:{args.port}/ (API: /docs); Ctrl+C stops")
    serve(app, host=args.host, port=args.port)
    return 0
