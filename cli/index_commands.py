"""``nil index``: build, query and inspect distractor indexes."""

from __future__ import annotations

import json

import click

from cli.options import INDEX_PARAM
from nil.config import FORMATS, SPLITS


@click.group()
def index():
    """Build, query and inspect distractor indexes (nearest other-class search)."""


@index.command("build")
@click.option("--out", required=True, type=click.Path(), help="Index folder to write (replaced atomically).")
@click.option("--checkpoint", default=None, type=click.Path(), help="Model whose embeddings are indexed.")
@click.option("--data", default=None, type=click.Path(), help="Data to embed [default: the checkpoint's training data].")
@click.option("--format", "fmt", default=None, type=click.Choice(FORMATS))
@click.option("--split", default="train", show_default=True, type=click.Choice(SPLITS))
@click.option("--embeddings", default=None, type=click.Path(),
              help="Index precomputed embeddings instead: a zarr group with vectors, labels, ids (and keys).")
@click.option("--index", "kind", default="flat", show_default=True,
              help="Index kind: exact, flat, ivf, ivfpq, hnsw, cagra.")
@click.option("--param", "params", multiple=True, type=INDEX_PARAM,
              help="Override an index parameter (nlist, nprobe, m, nbits, efSearch, rerank, store_dtype); repeatable.")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--progress/--no-progress", default=True)
def index_build(out, checkpoint, data, fmt, split, embeddings, kind, params, batch_size, device, progress):
    """Embed a dataset with a checkpoint (or read embeddings) and write an index folder.

    Under `torchrun --nproc-per-node N -m cli index build --checkpoint ...` the processes embed
    disjoint blocks of rows in parallel; rank 0 writes the structure and the manifest last.
    """
    from nil.distributed import is_main
    from nil.indexing import build_index

    stats = build_index(out, checkpoint=checkpoint, data=data, embeddings=embeddings, kind=kind, split=split,
                        fmt=fmt, batch_size=batch_size, device=device, progress=progress,
                        params=dict(params))
    if not is_main():  # under torchrun, rank 0 alone reports
        return
    click.echo(f"indexed {stats['count']} vectors of dimension {stats['dim']} ({stats['kind']}) into {out}")



@index.command("query")
@click.option("--index", "index_dir", required=True, type=click.Path(), help="Index folder.")
@click.option("--k", default=5, show_default=True, help="Neighbours per query.")
@click.option("--ids", default=None, help="Comma-separated sample ids stored in the index, e.g. 3,17.")
@click.option("--image", default=None, type=click.Path(), help="An image file to embed and query with.")
@click.option("--label", default=None, type=int, help="--image: its class [default: the model's prediction].")
@click.option("--checkpoint", default=None, type=click.Path(), help="--image: model [default: the index's].")
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def index_query(index_dir, k, ids, image, label, checkpoint, device, as_json):
    """Print each query's nearest neighbours of another class: id, label, distance, key."""
    from nil.indexing import query_index

    id_list = None
    if ids is not None:
        try:
            id_list = [int(s) for s in ids.split(",") if s.strip()]
        except ValueError:
            raise click.BadParameter("ids must be comma-separated integers", param_hint="--ids") from None
    result = query_index(index_dir, k, ids=id_list, image=image, label=label, checkpoint=checkpoint, device=device)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for r in result["results"]:
        click.echo(f"query {r['query_id'] if r['query_id'] is not None else image} (label {r['query_label']}):")
        if not r["neighbors"]:
            click.echo("  no sample of another class in the index")
        for n in r["neighbors"]:
            click.echo(f"  id {n['id']:>8}  label {n['label']:>3}  distance {n['distance']:.4f}  {n['key']}")


@index.command("stats")
@click.argument("index_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def index_stats(index_dir, as_json):
    """Counts per class, kind, parameters and memory footprint of an index folder."""
    import faiss_index

    stats = faiss_index.index_stats(index_dir)
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    click.echo(f"kind   {stats['kind']}  params {json.dumps(stats['params'])}")
    click.echo(f"count  {stats['count']}  dim {stats['dim']}  bytes {stats['bytes']}")
    for c, n in enumerate(stats["counts"]):
        click.echo(f"  class {c}: {n}")


@index.command("verify")
@click.argument("index_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def index_verify(index_dir, as_json):
    """Check every file of an index folder against its manifest's checksums, then load it.

    Prints one line per file (ok, missing, corrupt, unlisted) and exits with status 1 on any problem.
    """
    import faiss_index

    report = faiss_index.verify_index(index_dir)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for f in report["files"]:
            click.echo(f"{f['status']:>9}  {f['path']}")
        click.echo(f"index {index_dir}: " + ("ok" if report["ok"] else f"FAILED: {report['error']}"))
    if not report["ok"]:
        raise SystemExit(1)
