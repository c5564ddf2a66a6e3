"""``nil bench accuracy``: CE versus the distractor-aware arms on the real MedMNIST files."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from cli.bench_commands import _benchmarks, bench


def _words(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


@bench.command("accuracy")
@click.option("--datasets", default="retinamnist,breastmnist", show_default=True, help="Comma-separated.")
@click.option("--models", default="small_cnn,resnet18", show_default=True, help="Comma-separated.")
@click.option("--arms", default="ce,nil-exact,nil-faiss,nil-triplet,nil-gradient", show_default=True,
              help="Comma-separated arms.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--epochs", default=10, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--lambda", "lam", default=0.5, show_default=True, help="Distractor weight of every nil arm.")
@click.option("--margin", default=0.5, show_default=True)
@click.option("--warmup-epochs", default=1, show_default=True)
@click.option("--data-dir", default=None, type=click.Path(), help="Folder with the .npz files [default: ../shared/data].")
@click.option("--workdir", default="runs/bench-accuracy", show_default=True, help="Where the runs are written.")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", default="benchmarks/results/accuracy.json", show_default=True, type=click.Path())
def bench_accuracy(datasets, models, arms, seeds, epochs, batch_size, lr, lam, margin, warmup_epochs, data_dir,
                   workdir, device, out):
    """Train CE and the distractor-aware arms on RetinaMNIST and BreastMNIST; mean and std over seeds.

    Same schedule, augmentation and seeds for every arm; best.pt chosen on validation; the test
    split is read once per run. Writes accuracy.json and accuracy.md (beside the published
    MedMNIST v2 ResNet-18 figures).
    """
    _benchmarks()
    from benchmarks.accuracy import AccuracyBench, run_accuracy_bench

    try:
        seed_list = [int(s) for s in _words(seeds)]
    except ValueError:
        raise click.BadParameter("seeds must be comma-separated integers", param_hint="--seeds") from None
    cfg = AccuracyBench(datasets=_words(datasets), models=_words(models), arms=_words(arms), seeds=seed_list,
                        epochs=epochs, batch_size=batch_size, lr=lr, lam=lam, margin=margin,
                        warmup_epochs=warmup_epochs, data_dir=data_dir, workdir=workdir, device=device, out=out)
    try:
        result = run_accuracy_bench(cfg, command="nil " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(Path(out).with_suffix(".md").read_text())
    click.echo(f"{len(result['rows'])} runs in {result['total_s'] / 60:.1f} min; results: {out}")
