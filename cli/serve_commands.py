"""``nil index serve``: the distractor search service over HTTP (FastAPI on uvicorn)."""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import os
from pathlib import Path

import click

from cli.index_commands import index

CONFIG_ENV = "NIL_SERVE_CONFIG"  # how worker processes (--workers > 1) learn what to serve
MAX_IMAGE_PIXELS = 1 << 25  # an upload decoding to more pixels is refused (a small PNG can expand to gigabytes)


@index.command("serve")
@click.option("--index", "index_dir", required=True, type=click.Path(), help="Index folder to serve.")
@click.option("--checkpoint", default=None, type=click.Path(),
              help="Model that embeds uploaded images [default: the one the index was built with, if recorded].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Interface to listen on; anything but loopback needs a token.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token", default=None, envvar="NIL_TOKEN", show_envvar=True,
              help="Bearer token: needed for every write, and for reads once set. Prefer the environment "
                   "variable (a command line is visible to other users).")
@click.option("--max-batch", default=1024, show_default=True, type=click.IntRange(1),
              help="Most vectors per search or upsert request (more: 413).")
@click.option("--max-k", default=100, show_default=True, type=click.IntRange(1), help="Most neighbours per query.")
@click.option("--max-body-mb", default=32.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest request body, JSON or image (more: 413).")
@click.option("--search-threads", default=None, type=click.IntRange(1),
              help="Searches run at once [default: the number of cores].")
@click.option("--torch-threads", default=1, show_default=True, type=click.IntRange(1),
              help="Intra-op threads of each search (torch and faiss). A batch of 32 gains nothing from more, "
                   "and concurrent requests already use the cores.")
@click.option("--coalesce", default=1024, show_default=True, type=click.IntRange(0),
              help="While every search thread is busy, queued search requests with the same k are answered "
                   "by one index call of up to this many query vectors (0: each request alone). Answers "
                   "are the same either way; under load it saves the per-call overhead.")
@click.option("--loop", type=click.Choice(["auto", "asyncio", "uvloop"]), default="auto", show_default=True,
              help="uvicorn's event loop (auto: uvloop when installed, pip install \"nil[serve]\").")
@click.option("--http", type=click.Choice(["auto", "h11", "httptools"]), default="auto", show_default=True,
              help="uvicorn's HTTP parser (auto: httptools when installed, pip install \"nil[serve]\").")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1),
              help="Worker processes, each with its own copy of the index; more than 1 is read-only.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
def index_serve(index_dir, checkpoint, host, port, token, max_batch, max_k, max_body_mb, search_threads, torch_threads,
                coalesce, loop, http, workers, device):
    """Serve an index folder over HTTP: search by vector or by image, upsert, snapshot.

    Endpoints: GET /healthz, GET /v1/index, POST /v1/search, POST /v1/search/image, POST /v1/upsert,
    POST /v1/snapshot; the schema is at /docs and /openapi.json. Ctrl-C (or SIGTERM) finishes the
    requests in flight, then stops.
    """
    import uvicorn

    import faiss_index
    from faiss_index.service import check_bind

    check_bind(host, token)
    if not faiss_index.is_index_dir(index_dir):
        raise click.ClickException(f"{index_dir} is not an index folder (no manifest.json); build one with "
                                   "`nil index build`.")
    config = {"index_dir": str(Path(index_dir).resolve()), "checkpoint": checkpoint, "device": device,
              "limits": {"max_batch": max_batch, "max_k": max_k, "max_body_bytes": int(max_body_mb * 2**20),
                         "search_threads": search_threads or os.cpu_count() or 1, "coalesce": coalesce},
              "torch_threads": torch_threads, "writable": workers == 1}
    server_log = logging.getLogger("faiss_index.service")
    if server_log.getEffectiveLevel() > logging.INFO:
        server_log.setLevel(logging.INFO)  # the request lines and the startup line are the service's output
    for name, choice in (("uvloop", loop), ("httptools", http)):
        if choice == name and importlib.util.find_spec(name) is None:
            raise click.ClickException(f"{name} is not installed; pip install \"nil[serve]\" or leave the option "
                                       "at auto.")
    common = {"host": host, "port": port, "access_log": False, "timeout_graceful_shutdown": 30,
              "loop": loop, "http": http}
    if workers == 1:
        uvicorn.run(make_app(config, token), **common)
        return
    os.environ[CONFIG_ENV] = json.dumps(config)
    if token:
        os.environ["NIL_TOKEN"] = token
    uvicorn.run("cli.serve_commands:app_from_env", factory=True, workers=workers, **common)


def make_app(config: dict, token: str | None):
    """The service app for a config of ``index_serve`` (loads the index and the checkpoint)."""
    import torch

    import faiss_index
    from faiss_index.service import ServiceLimits, create_app

    torch.set_num_threads(config["torch_threads"])  # faiss follows torch's thread count
    device = config["device"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    index, manifest = faiss_index.load_index(config["index_dir"], device=device)  # checks the device too
    checkpoint = config["checkpoint"] or manifest.get("checkpoint")
    embed = None
    if checkpoint is not None:  # the model side (nil, torchvision) is imported only to embed images
        from faiss_index import sha256_file
        from nil.errors import NilError

        if not Path(checkpoint).is_file():
            raise NilError(f"checkpoint {checkpoint} does not exist" + ("" if config["checkpoint"] else
                           " (recorded in the index manifest; pass --checkpoint)"))
        if manifest.get("checkpoint_sha256") and sha256_file(checkpoint) != manifest["checkpoint_sha256"]:
            raise NilError(f"checkpoint {checkpoint} is not the one this index was built with")
        embed = image_embedder(checkpoint, index.device)
        if embed.dim != index.dim:
            raise NilError(f"checkpoint {checkpoint} embeds into {embed.dim} dimensions but the index holds "
                           f"{index.dim}-dimensional vectors")
    keys = faiss_index.stored_keys(config["index_dir"], len(index))
    return create_app(index, manifest, config["index_dir"], keys=keys,
                      embed=embed, token=token, limits=ServiceLimits(**config["limits"]), writable=config["writable"])


def app_from_env():
    """uvicorn's factory for each worker process of ``--workers N``."""
    # a spawned worker does not run `main`, which configures logging: the request lines need a handler
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("faiss_index.service").setLevel(logging.INFO)
    return make_app(json.loads(os.environ[CONFIG_ENV]), os.environ.get("NIL_TOKEN") or None)


def image_embedder(checkpoint: str | Path, device):
    """image bytes -> (z (D,) float32, predicted class), with the checkpoint's model and eval transform.

    A file that is not a readable image raises ValueError (the service answers 422).
    """
    from PIL import Image

    from nil.embedding import ImageEmbedder

    embedder = ImageEmbedder(checkpoint, device)

    def embed(data: bytes):
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"the image has {im.width}x{im.height} pixels; at most {MAX_IMAGE_PIXELS} "
                                     "are accepted.")
                arr = embedder.pixels(im)
        except ValueError:
            raise
        except Exception as exc:  # PIL raises many types for broken files (OSError, SyntaxError, ...)
            raise ValueError(f"not a readable image ({type(exc).__name__}: {exc}).") from None
        return embedder(arr)

    embed.dim = embedder.dim
    return embed
