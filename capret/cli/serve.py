"""``capret serve --pipeline DIR | --checkpoint M --gallery DIR [--combiner CKPT] [--host 127.0.0.1] [--port 8000]``.

With ``--checkpoint``/``--gallery`` the gallery is indexed first (``capret index build``, template captions,
resumable) into ``--workdir`` (default: a folder under ``$CAPRET_CACHE``, ``~/.cache/capret``), and a pipeline
folder naming it is written there; later runs reuse it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from capret.cli.common import add_device_flag, host, port, positive_float, positive_int

# capret.serve imports FastAPI, which `capret --help` (it builds every subcommand's parser) need not load
if TYPE_CHECKING:
    from capret.serve.web import ServeLimits


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="web page + JSON API: image-to-image and composed queries over a shop gallery",
        description="Serve a query pipeline (capret index build / capret quickstart's qs/pipeline) as a web page "
        "for people and a JSON API (/docs). Binds to 127.0.0.1 unless --host says otherwise.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--pipeline", type=Path, help="pipeline folder (pipeline.json)")
    source.add_argument("--checkpoint", type=Path, help="trained dual-stream model (with --gallery)")
    source.add_argument("--catalogue", help="a catalogue folder or URI (capret catalogue create) to search")
    p.add_argument(
        "--allow-writes",
        action="store_true",
        help="with --catalogue: add the write endpoints (add, remove), which need --token",
    )
    p.add_argument(
        "--token", default=None, help="bearer token of the write endpoints (default: $CAPRET_SERVE_TOKEN)"
    )
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="with --catalogue: serve item photos without checking them against their rows' SHA-256",
    )
    p.add_argument("--gallery", type=Path, help="folder (or text file) of shop photos, with --checkpoint")
    p.add_argument(
        "--workdir", type=Path, help="where --checkpoint/--gallery builds its index (default: cache)"
    )
    p.add_argument("--combiner", type=Path, help="optional Combiner checkpoint for composed queries")
    p.add_argument(
        "--host",
        type=host,
        default="127.0.0.1",
        help="interface to bind (default: %(default)s, this machine)",
    )
    p.add_argument("--port", type=port, default=8000, help="port (default: %(default)s)")
    add_device_flag(p)
    p.add_argument(
        "--max-upload-mb", type=positive_float, default=8.0, help="largest accepted upload (default: 8 MB)"
    )
    p.add_argument(
        "--max-concurrency", type=positive_int, default=2, help="searches run at once (default: 2)"
    )
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        default=40_000_000,
        help="largest decoded image, width x height, read from its header (default: %(default)s)",
    )
    p.add_argument(
        "--pixel-budget",
        type=positive_int,
        default=None,
        help="decoded pixels of all running searches together; beyond it a request gets 503 at once "
        "(default: --max-pixels, one maximal image at a time)",
    )
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="also answer requests whose Host header is NAME (a reverse proxy's public name; repeatable; '*' "
        "turns the check off). Default: the bound address, and every loopback alias when bound to loopback",
    )
    p.set_defaults(run=run)
    return p


def run(args: argparse.Namespace) -> int:
    from capret.config import ConfigError
    from capret.serve import ServeBackend, create_app, serve

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.max_concurrency < 1:
        raise ConfigError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.pixel_budget is not None and args.pixel_budget < args.max_pixels:
        raise ConfigError(
            f"--pixel-budget ({args.pixel_budget}) must be >= --max-pixels ({args.max_pixels}): a maximal image "
            "must fit alone"
        )
    if args.catalogue is not None:
        return _serve_catalogue(args)
    if args.allow_writes:
        raise ConfigError("--allow-writes is for --catalogue (a pipeline's gallery is read-only)")
    if args.no_verify:
        raise ConfigError("--no-verify is for --catalogue (a pipeline's gallery is always verified)")
    pipeline = args.pipeline if args.pipeline is not None else _pipeline_from_gallery(args)
    backend = ServeBackend.from_pipeline_dir(pipeline, combiner=args.combiner, device=args.device)
    app = create_app(backend, **_limits(args))
    print(f"capret serve: http://{args.host}:{args.port}/ (API: /docs); Ctrl+C stops")
    serve(app, host=args.host, port=args.port)
    return 0


def _limits(args: argparse.Namespace) -> ServeLimits:
    """The upload, admission and host limits both apps take, from the flags they share."""
    return {
        "max_upload_bytes": int(args.max_upload_mb * 1024 * 1024),
        "max_concurrency": args.max_concurrency,
        "max_pixels": args.max_pixels,
        "pixel_budget": args.pixel_budget,
        "host": args.host,
        "allowed_hosts": args.allowed_host,
    }


def _pipeline_from_gallery(args: argparse.Namespace) -> Path:
    """Index ``--gallery`` with ``--checkpoint`` (resumable) and write a pipeline folder naming both."""
    import hashlib
    import os

    from capret.cli.main import main as capret_main
    from capret.config import ConfigError
    from capret.inference.query.pipeline import PipelineConfig

    if args.gallery is None:
        raise ConfigError("--checkpoint needs --gallery DIR (the shop photos to search)")
    checkpoint, gallery = args.checkpoint.resolve(), args.gallery.resolve()
    workdir = args.workdir
    if workdir is None:
        digest = hashlib.sha256(f"{checkpoint}\n{gallery}".encode()).hexdigest()[:16]
        cache = Path(os.environ.get("CAPRET_CACHE") or Path.home() / ".cache" / "capret")
        workdir = cache / "serve" / digest
    index = workdir / "gallery"
    argv = ["index", "build", "--checkpoint", str(checkpoint), "--images", str(gallery), "--out", str(index)]
    code = capret_main([*argv, "--captions", "template"])
    if code != 0:
        raise ConfigError(
            f"indexing {gallery} with {checkpoint} failed (exit code {code}); see the message above"
        )
    PipelineConfig(model=str(checkpoint), gallery="../gallery", captioner={"backend": "template"}).save(
        workdir / "pipeline"
    )
    return workdir / "pipeline"


def _serve_catalogue(args: argparse.Namespace) -> int:
    """``--catalogue``: the catalogue page and API (:mod:`capret.serve.catalogue`); writes only when asked."""
    import os

    from capret.config import ConfigError
    from capret.serve import serve
    from capret.serve.catalogue import CatalogueBackend, create_catalogue_app

    token = args.token or os.environ.get("CAPRET_SERVE_TOKEN") or None
    if args.allow_writes and not token:
        raise ConfigError("--allow-writes needs a token: --token T or CAPRET_SERVE_TOKEN")
    if args.no_verify:
        print("warning: --no-verify: item photos are served without checking their SHA-256", file=sys.stderr)
    backend = CatalogueBackend.open(args.catalogue, device=args.device, verify=not args.no_verify)
    app = create_catalogue_app(
        backend,
        **_limits(args),
        allow_writes=args.allow_writes,
        token=token,
    )
    writes = "writes enabled (bearer token)" if args.allow_writes else "read-only"
    print(
        f"capret serve: catalogue {args.catalogue} at http://{args.host}:{args.port}/ ({writes}); Ctrl+C stops"
    )
    serve(app, host=args.host, port=args.port)
    return 0
