"""The commands of ``nil``: each parses options into a config and calls the library."""

from __future__ import annotations

import json
from pathlib import Path

import click

from cli.options import INDEX_PARAM
from cli.tables import metrics_table
from nil.config import (ANNS, DISTRACTORS, FORMATS, LOGS, LOSSES, METRICS, MODELS, NORMALIZES, ON_BAD_IMAGE, PRECISIONS,
                        SCHEDULES, SPLITS, TERM_SPACES, TERM_WEIGHTINGS, VARIANTS, TrainConfig)

DEFAULT = TrainConfig()  # `nil train`'s defaults live in one place: the config



def _data_options(f):
    """Options shared by every command that reads a dataset."""
    options = [
        click.option("--data", "data", default=None, type=click.Path(),
                     help="A MedMNIST .npz, a class-per-folder image tree, a CSV manifest or a zarr patch store."),
        click.option("--format", "fmt", type=click.Choice(FORMATS), default=None,
                     help="Force the reader instead of detecting it from the path."),
        click.option("--csv-path-col", default=None, help="CSV: column with image paths (auto: image, id_code, path, ...)."),
        click.option("--csv-label-col", default=None, help="CSV: column with the label (auto: label, diagnosis, ...)."),
        click.option("--csv-label-cols", default=None,
                     help="CSV: comma-separated one-hot columns, ISIC style (auto when there is no label column)."),
        click.option("--image-root", default=None, type=click.Path(), help="CSV: folder the image paths are relative to."),
        click.option("--image-suffix", default=None, help="CSV: suffix for extension-less paths, e.g. .png."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@click.command()
@click.option("--out", default="", help="Folder for the data and both runs [default: runs/demo-<time>].")
@click.option("--n", default=3000, show_default=True, help="Number of synthetic patches.")
@click.option("--epochs", default=6, show_default=True, help="Epochs per run.")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
def demo(out, n, epochs, seed, device, progress):
    """Train CE and distractor-aware models on built-in synthetic data; compare them.

    Writes a synthetic histology-like patch set with look-alike class pairs, trains a small CNN
    with cross-entropy, with the distractor-aware loss at `nil train`'s defaults (the gradient
    distractor) and with distractors mined by FAISS (--ann faiss), and prints the three runs' test
    metrics side by side. Takes a few minutes on two CPU cores.
    """
    from nil.demo import DemoConfig, run_demo

    result = run_demo(DemoConfig(out=out, n=n, epochs=epochs, seed=seed, device=device, progress=progress))
    click.echo(metrics_table({name: r["test"] for name, r in result["runs"].items()}))
    click.echo(f"\ndata: {result['data']}")
    for name, r in result["runs"].items():
        click.echo(f"run {name}: {r['out']}")


def _read_config_file(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--config FILE``: every other option's default from a YAML mapping of long option names
    (``batch-size`` or ``batch_size``); options given on the command line still win."""
    if value is None:
        return None
    import yaml

    try:
        loaded = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
    except OSError as e:
        raise click.BadParameter(f"cannot read {value}: {e.strerror or e}", param_hint="--config") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise click.BadParameter(f"{value} is not valid YAML{at}", param_hint="--config") from None
    loaded = {} if loaded is None else loaded
    if not isinstance(loaded, dict):
        raise click.BadParameter(f"{value} must hold a mapping of option names to values, e.g. 'epochs: 30'",
                                 param_hint="--config")
    by_name = {}
    for p in ctx.command.params:
        if isinstance(p, click.Option) and p.name not in ("config", "resume_dir"):
            for opt in p.opts:
                if opt.startswith("--"):
                    by_name[opt[2:].replace("-", "_")] = p
    defaults = {}
    for key, v in loaded.items():
        p = by_name.get(str(key).replace("-", "_"))
        if p is None:
            raise click.BadParameter(f"{value}: unknown option {key!r}", param_hint="--config")
        if p.name == "csv_label_cols" and isinstance(v, list):
            v = ",".join(map(str, v))
        if p.name == "ann_params" and isinstance(v, dict):  # a mapping, as a run's config.yaml writes it
            v = list(v.items())
        defaults[p.name] = v
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


class ModelName(click.ParamType):
    """One of the built-in backbones, or ``timm:NAME``."""

    name = "model"

    def convert(self, value, param, ctx):
        if value in MODELS or (isinstance(value, str) and value.startswith("timm:") and len(value) > 5):
            return value
        self.fail(f"{value!r} is not one of {', '.join(MODELS)}, nor timm:NAME", param, ctx)


@click.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
              callback=_read_config_file,
              help="YAML file of options (long names: 'batch-size: 64'); the command line overrides it. A run "
                   "folder's config.yaml repeats that run.")
@_data_options
@click.option("--out", default="", type=click.Path(), help="Run folder to create (must not exist or be empty).")
@click.option("--resume", "resume_dir", default=None, type=click.Path(),
              help="Continue the interrupted run in this folder from its last.pt, exactly as configured there.")
@click.option("--checkpoint-every", default=DEFAULT.checkpoint_every, show_default=True,
              help="Also write a resumable last.pt every N optimiser steps (0: at epoch ends only).")
@click.option("--on-bad-image", default=DEFAULT.on_bad_image, show_default=True, type=click.Choice(ON_BAD_IMAGE),
              help="An unreadable image file: fail naming it, or skip it (listed in RUN_DIR/skipped_images.json).")
@click.option("--model", default=DEFAULT.model, show_default=True, type=ModelName(),
              help=f"{', '.join(MODELS)} (torchvision), or timm:NAME for any model of timm's zoo "
                   "(pip install 'nil[timm]').")
@click.option("--weights", default=None, type=click.Path(), help="Local state dict to start from (nothing is downloaded).")
@click.option("--pretrained/--no-pretrained", default=DEFAULT.pretrained, show_default=True,
              help="Start the backbone from its published ImageNet weights (torchvision's weights API; downloaded "
                   "once into its cache) and normalise inputs with ImageNet's mean and std.")
@click.option("--normalize", default=DEFAULT.normalize, show_default=True, type=click.Choice(NORMALIZES),
              help="Input mean/std: data (the training split's own, measured on a sample), imagenet, half (0.5/0.5); "
                   "auto is imagenet with --pretrained, else data. Saved in config.json and every checkpoint.")
@click.option("--epochs", default=DEFAULT.epochs, show_default=True)
@click.option("--batch-size", default=DEFAULT.batch_size, show_default=True)
@click.option("--lr", default=DEFAULT.lr, show_default=True, help="AdamW learning rate.")
@click.option("--schedule", default=DEFAULT.schedule, show_default=True, type=click.Choice(SCHEDULES),
              help="Learning-rate schedule over all steps: cosine decay to 0, or step (x0.1 at 50% and 75%).")
@click.option("--weight-decay", default=DEFAULT.weight_decay, show_default=True)
@click.option("--backbone-lr-scale", default=DEFAULT.backbone_lr_scale, show_default=True,
              type=click.FloatRange(min=0, min_open=True),
              help="The backbone learns at --lr x this, the heads at --lr (fine-tuning pretrained weights: 0.1).")
@click.option("--freeze-stem-epochs", default=DEFAULT.freeze_stem_epochs, show_default=True,
              type=click.IntRange(min=0), help="Keep the stem (first convolution and its norm) unchanged this many epochs.")
@click.option("--image-size", default=None, type=int, help="Resize to this side [default: the data's own, 224 for files].")
@click.option("--embed-dim", default=DEFAULT.embed_dim, show_default=True, help="Width D of the embedding z.")
@click.option("--loss", default=DEFAULT.loss, show_default=True, type=click.Choice(LOSSES),
              help="ce: cross-entropy only; nil: CE + lambda x distractor term; ce-replay: CE + lambda x CE of "
                   "the batch's mined distractor images (hard-example replay: the compute-matched control of nil).")
@click.option("--lambda", "lam", default=DEFAULT.lam, show_default=True, help="Weight of the distractor term (ce-replay: of the replayed images' CE).")
@click.option("--margin", default=None, type=float,
              help="Push distractors at least this far away [default: 1.0; 1.4 with --stored-distractors: the "
                   "study's validation choices].")
@click.option("--variant", default=DEFAULT.variant, show_default=True, type=click.Choice(VARIANTS))
@click.option("--warmup-epochs", default=DEFAULT.warmup_epochs, show_default=True, help="Epochs of CE only before the distractor term.")
@click.option("--replay", default=DEFAULT.replay, show_default=True, type=click.FloatRange(min=0),
              help="--loss nil with a memory: also train on the mined distractor images with their own CE at this "
                   "weight (CE + lambda x term + replay x CE of the distractors); the images are embedded once "
                   "for both, so the step costs what --loss ce-replay costs.")
@click.option("--term-weighting", default=DEFAULT.term_weighting, show_default=True, type=click.Choice(TERM_WEIGHTINGS),
              help="balanced: weight each sample's distractor term by N / (C x n_class) of its class in the training "
                   "split, so a rare class (malignant, the top grade) pushes away from its distractors as hard as a "
                   "common one.")
@click.option("--term-space", default=DEFAULT.term_space, show_default=True, type=click.Choice(TERM_SPACES),
              help="Where the distractor term measures distances (and a memory searches): z, the projection head's "
                   "embedding; features, the L2-normalised pooled features the classifier reads, so the push "
                   "apart reaches the backbone instead of being absorbed by the projection head.")
@click.option("--distractor", default="auto", show_default=True, type=click.Choice(DISTRACTORS),
              help="memory: nearest stored other-class sample (searched per --ann); gradient: feature-space distractor "
                   "from the neurons (the study's validation choice); auto: memory when --ann exact|faiss, "
                   "--loss ce-replay, --variant triplet or --index-from asks for one, else gradient.")
@click.option("--gradient-step", default=DEFAULT.gradient_step, show_default=True, help="--distractor gradient: step size, x ||f||.")
@click.option("--fresh-distractors/--stored-distractors", default=DEFAULT.fresh_distractors, show_default=True,
              help="Re-embed each mined distractor's image with the current network in the same step (gradient "
                   "through both; ~2x the step) instead of using its stored, up to an epoch old, embedding "
                   "(stored vectors let the embeddings collapse).")
@click.option("--ann", default=DEFAULT.ann, show_default=True, type=click.Choice(ANNS),
              help="Where a memory distractor is searched: the batch, an exact memory, or the FAISS engine "
                   "(exact or faiss select --distractor memory).")
@click.option("--ann-index", default=DEFAULT.ann_index, show_default=True,
              help="Index kind for --ann faiss: flat, ivf, ivfpq, hnsw, cagra, exact; auto: the engine's "
                   "default for the device (ivfpq on CPU, exact on CUDA).")
@click.option("--refresh-every", default=DEFAULT.refresh_every, show_default=True, help="Steps between rebuilds of the ANN structure.")
@click.option("--ann-nprobe", default=None, type=click.IntRange(min=1),
              help="--ann faiss: lists probed per query [default: the engine's for the kind]; more: higher recall, slower.")
@click.option("--ann-rerank", default=None, type=click.IntRange(min=1),
              help="--ann faiss: candidates re-ranked exactly per query [default: ivfpq calibrates it at each build, 32-256, to hold the true neighbour of probe_recall of a sample]; more: higher recall.")
@click.option("--ann-param", "ann_params", multiple=True, type=INDEX_PARAM,
              help="--ann exact|faiss: a further parameter of the memory's index, e.g. store_dtype=float16 "
                   "(half the memory), nlist=4096 or inplace=false (see `nil index build`); repeatable.")
@click.option("--audit-every", default=DEFAULT.audit_every, show_default=True, help="--ann faiss: steps between recall@1 audits of 32 queries against exact search, written to metrics.jsonl (0: off).")
@click.option("--index-from", default=None, type=click.Path(), help="Start the memory from an index built by `nil index build`.")
@click.option("--val-fraction", default=DEFAULT.val_fraction, show_default=True, help="Seeded split, for data without its own splits.")
@click.option("--test-fraction", default=DEFAULT.test_fraction, show_default=True)
@click.option("--select-metric", default=DEFAULT.select_metric, show_default=True,
              type=click.Choice(METRICS),
              help="Validation metric that chooses best.pt.")
@click.option("--seed", default=DEFAULT.seed, show_default=True)
@click.option("--device", default=DEFAULT.device, show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--workers", default=None, type=int, help="Data loader workers [default: 0 on CPU, 4 on CUDA].")
@click.option("--precision", default=DEFAULT.precision, show_default=True, type=click.Choice(PRECISIONS),
              help="Training autocast: auto is bf16 on CUDA, fp32 on CPU; bf16 also speeds up AMX CPUs.")
@click.option("--log", default=DEFAULT.log, show_default=True, type=click.Choice(LOGS),
              help="Besides metrics.jsonl: csv writes metrics.csv; tensorboard writes RUN_DIR/tensorboard "
                   "(loss parts, validation metrics, mining recall, timings, best-epoch embeddings for the "
                   "projector; needs the tensorboard extra); none.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
def train(**kw):
    """Train a classifier, optionally with the distractor-aware loss.

    Writes RUN_DIR/config.json, splits.json, metrics.jsonl (per epoch), last.pt, best.pt (best
    validation epoch) and metrics.json (test metrics of best.pt). `--resume RUN_DIR` continues a
    run that was interrupted (killed, out of disk) from its last.pt.

    Scales out under `torchrun --nproc-per-node N [--nnodes M ...] -m cli train ...`
    (DistributedDataParallel; the distractor memory sharded over the processes): --batch-size is
    then the global batch, split evenly over the processes, and rank 0 writes the run folder.
    """
    from nil.config import TrainConfig
    from nil.distributed import is_main
    from nil.train import train as run_train

    resume_dir = kw.pop("resume_dir")
    if resume_dir is not None:
        from nil.resume import load_run_config

        ctx = click.get_current_context()
        given = [name for name in kw if name != "progress"
                 and ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE]
        if ctx.get_parameter_source("config_file") == click.core.ParameterSource.COMMANDLINE:
            given.insert(0, "config")
        if given:
            raise click.UsageError(f"--resume continues the run exactly as configured in {resume_dir}/config.json; "
                                   f"drop --{given[0].replace('_', '-')}")
        cfg = load_run_config(resume_dir)
        cfg.progress = kw["progress"]
        result = run_train(cfg, resume=True)
        click.echo(metrics_table({"test": result["test"], "val": result["val"]}))
        click.echo(f"\nbest epoch {result['best_epoch']} by val {result['select_metric']}; run folder: {resume_dir}")
        return
    ctx = click.get_current_context()
    if (kw["fresh_distractors"] and kw["distractor"] == "gradient"
            and ctx.get_parameter_source("fresh_distractors") == click.core.ParameterSource.COMMANDLINE):
        raise click.UsageError("--fresh-distractors re-embeds searched distractor images; --distractor gradient "
                               "has none (drop one of them)")
    if kw["csv_label_cols"]:
        kw["csv_label_cols"] = [c.strip() for c in kw["csv_label_cols"].split(",") if c.strip()]
    kw["format"] = kw.pop("fmt")
    kw["ann_params"] = dict(kw["ann_params"])
    result = run_train(TrainConfig(**kw))
    if not is_main():  # under torchrun, rank 0 alone reports
        return
    click.echo(metrics_table({"test": result["test"], "val": result["val"]}))
    click.echo(f"\nbest epoch {result['best_epoch']} by val {result['select_metric']}; run folder: {kw['out']}")


@click.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(), help="A best.pt or last.pt from nil train.")
@click.option("--data", default=None, type=click.Path(), help="Data to evaluate on [default: the training data].")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=None)
@click.option("--split", default="test", show_default=True, type=click.Choice(SPLITS))
@click.option("--batch-size", default=256, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def eval_(checkpoint, data, fmt, split, batch_size, device, as_json):
    """Metrics of a checkpoint on one split: accuracy, balanced accuracy, macro-F1, AUC, QWK."""
    from nil.evaluate import evaluate_checkpoint

    m = evaluate_checkpoint(checkpoint, data, split, fmt, batch_size, device)
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    click.echo(metrics_table({split: m}))
    click.echo("\nconfusion matrix (rows: true, columns: predicted)")
    for name, row in zip(m["classes"], m["confusion_matrix"]):
        click.echo(f"  {name:>12} " + " ".join(f"{v:6d}" for v in row))


@click.group()
def data():
    """Make and inspect datasets."""


@data.command("synth")
@click.argument("out", type=click.Path())
@click.option("--n", default=10000, show_default=True, help="Number of patches.")
@click.option("--size", default=32, show_default=True, help="Patch side in pixels.")
@click.option("--classes", default=4, show_default=True, help="Classes; (0,1), (2,3), ... are look-alike pairs.")
@click.option("--similarity", default=0.8, show_default=True, help="Closeness of look-alike pairs, 0..1.")
@click.option("--seed", default=0, show_default=True)
def data_synth(out, n, size, classes, similarity, seed):
    """Write a synthetic histology-like patch set (zarr) with look-alike class pairs."""
    from nil.data.synth import write_synthetic

    path = write_synthetic(out, n=n, size=size, classes=classes, seed=seed, similarity=similarity, progress=True)
    click.echo(f"wrote {n} patches of {size}x{size} in {classes} classes to {path}")


@click.command()
@_data_options
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder for audit.json, duplicates.csv, suspects.csv and index.html.")
@click.option("--checkpoint", default=None, type=click.Path(),
              help="Compare images in this model's embedding space instead of pixel space (its run's data "
                   "unless --data is given).")
@click.option("--threshold", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Near-duplicate distance: RMS pixel difference on 0..1 [default: 0.02], or embedding "
                   "distance with --checkpoint [default: 0.05].")
@click.option("--device", default="auto", show_default=True)
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
def audit(data, fmt, csv_path_col, csv_label_col, csv_label_cols, image_root, image_suffix, out, checkpoint,
          threshold, device, progress):
    """Find exact and near duplicates (across splits first), conflicting labels and label-noise suspects.

    Reads any supported data set and writes OUT/audit.json, duplicates.csv, suspects.csv and
    index.html (thumbnails side by side, opens offline). A duplicate shared by the training and the
    test split inflates every test figure; run this before training on a public data set.
    """
    from nil.audit import audit as run
    from nil.data import CsvOptions

    cols = [c.strip() for c in csv_label_cols.split(",") if c.strip()] if csv_label_cols else None
    csv = CsvOptions(csv_path_col, csv_label_col, cols, image_root, image_suffix)
    result = run(data, out, fmt=fmt, checkpoint=checkpoint, threshold=threshold, device=device, progress=progress,
                 csv=csv)
    cross = ", ".join(f"{k} {v}" for k, v in result["cross_split"].items())
    click.echo(f"{result['images']} images: {result['exact_groups']} exact and {result['near_groups']} near-duplicate "
               f"groups; across splits: {cross}; label conflicts {len(result['label_conflicts'])}; suspects "
               f"{len(result['suspects'])} ({result['seconds']} s)")
    click.echo(f"wrote {out}/audit.json, duplicates.csv, suspects.csv and index.html")


@click.command()
@click.argument("run_dir", type=click.Path())
@click.option("--gallery", default=8, show_default=True, help="Test images in the distractor gallery.")
@click.option("--k", default=4, show_default=True, help="Distractors shown per test image.")
@click.option("--device", default="auto", show_default=True)
def report(run_dir, gallery, k, device):
    """Write RUN_DIR/report/index.html: curves, confusion matrix, distractor gallery, suspect labels.

    The page is self-contained (pictures inlined) and opens offline; suspects.csv lists training
    samples whose nearest neighbours are mostly of one other class.
    """
    from nil.report import build_report
    from nil.runtime import resolve_device

    path = build_report(run_dir, n_gallery=gallery, k=k, device=str(resolve_device(device)))
    click.echo(f"report: {path}")
