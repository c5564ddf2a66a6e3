"""``nil bench accuracy``: CE versus the distractor-aware arms on the real MedMNIST files."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import click

from cli.bench_commands import bench
from nil.config import PRECISIONS


def _words(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _int_list(value: str, option: str) -> list[int]:
    try:
        return [int(s) for s in _words(value)]
    except ValueError:
        raise click.BadParameter("seeds must be comma-separated integers", param_hint=option) from None


def _epochs(value: str, models: list[str]) -> dict[str, int]:
    """``8`` (every model) or ``small_cnn=15,resnet18=8``."""
    try:
        if "=" not in value:
            return {m: int(value) for m in models}
        pairs = dict(w.split("=", 1) for w in _words(value))
        return {m.strip(): int(n) for m, n in pairs.items()}
    except ValueError:
        raise click.BadParameter("give N or MODEL=N,MODEL=N with integer N", param_hint="--epochs") from None


@bench.command("accuracy")
@click.option("--datasets", default="retinamnist,breastmnist", show_default=True, help="Comma-separated.")
@click.option("--models", default="small_cnn,resnet18", show_default=True, help="Comma-separated.")
@click.option("--arms", default="ce,nil-exact,nil-faiss,nil-triplet,nil-gradient", show_default=True,
              help="Comma-separated arms; also nil-fresh (--fresh-distractors, opt-in, ~2x the step).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds.")
@click.option("--epochs", default="small_cnn=15,resnet18=6", show_default=True,
              help="Epochs for every model (N) or per model (MODEL=N,...); the same for every arm.")
@click.option("--precision", default="bf16", show_default=True, type=click.Choice(PRECISIONS),
              help="Training autocast (bf16 halves ResNet steps on AMX CPUs).")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--lr", default=2e-3, show_default=True)
@click.option("--lambda", "lam", default=1.0, show_default=True,
              help="Distractor weight of every nil arm (default tuned on validation).")
@click.option("--margin", default=1.0, show_default=True, help="Margin of every nil arm (tuned on validation).")
@click.option("--warmup-epochs", default=0, show_default=True, help="CE-only epochs first (tuned on validation).")
@click.option("--data-dir", default=None, type=click.Path(), help="Folder with the .npz files [default: ../shared/data].")
@click.option("--workdir", default="runs/bench-accuracy", show_default=True, help="Where the runs are written.")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", default="benchmarks/results/accuracy.json", show_default=True, type=click.Path())
@click.option("--tune", is_flag=True,
              help="Instead: grid-search lambda, margin and warm-up of nil-exact on the validation split only "
                   "(test never read); writes <out>-tuning.json/.md and prints the chosen setting.")
@click.option("--grid", default=None,
              help="--tune: the grid, e.g. 'lam=0.3,1,3 margin=0.5,1 warmup_epochs=0,2' (that is the default); "
                   "names left out keep --lambda/--margin/--warmup-epochs.")
@click.option("--tag", default="tuning", show_default=True, help="--tune: results go to <out>-<tag>.json/.md.")
@click.option("--reference/--no-reference", default=True, help="--tune: also train CE for comparison.")
def bench_accuracy(datasets, models, arms, seeds, epochs, precision, batch_size, lr, lam, margin, warmup_epochs,
                   data_dir, workdir, device, out, tune, grid, tag, reference):
    """Train CE and the distractor-aware arms on RetinaMNIST and BreastMNIST; mean and std over seeds.

    Same schedule, augmentation and seeds for every arm; best.pt chosen on validation; the test
    split is read once per run. Writes accuracy.json and accuracy.md (beside the published
    MedMNIST v2 ResNet-18 figures).
    """
    from benchmarks.accuracy import AccuracyBench, parse_grid, run_accuracy_bench, run_tuning

    seed_list = _int_list(seeds, "--seeds")
    model_list = _words(models)
    cfg = AccuracyBench(datasets=_words(datasets), models=model_list, arms=_words(arms), seeds=seed_list,
                        epochs=_epochs(epochs, model_list), precision=precision, batch_size=batch_size, lr=lr,
                        lam=lam, margin=margin, warmup_epochs=warmup_epochs, data_dir=data_dir, workdir=workdir,
                        device=device, out=out)
    command = "nil " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        if tune:
            result = run_tuning(cfg, parse_grid(grid) if grid else None, command=command, reference=reference,
                                tag=tag)
            path = Path(out).with_name(f"{Path(out).stem}-{tag}.md")
            click.echo(path.read_text())
            click.echo(f"{len(result['rows'])} runs in {result['total_s'] / 60:.1f} min; chosen {result['chosen']}")
            return
        result = run_accuracy_bench(cfg, command=command)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(Path(out).with_suffix(".md").read_text())
    click.echo(f"{len(result['rows'])} runs in {result['total_s'] / 60:.1f} min; results: {out}")


@bench.command("study")
@click.argument("stage", type=click.Choice(["tune", "final", "report"]))
@click.option("--datasets", default="retinamnist,breastmnist", show_default=True, help="Comma-separated.")
@click.option("--models", default="small_cnn,resnet18", show_default=True, help="final: comma-separated models.")
@click.option("--arms", default="ce,ce-matched,nil-fresh,nil-stored,nil-gradient,nil-balanced,nil-replay,nil-features",
              show_default=True,
              help="Comma-separated arms (ce, ce-matched = CE with replayed distractor images, nil-fresh, nil-stored, "
                   "nil-gradient = the feature-gradient distractor, nil-balanced = nil-gradient with the term "
                   "weighted by inverse class frequency, nil-replay = ce-matched's replay plus the term on the "
                   "replayed images' fresh embeddings, nil-features = nil-fresh with the term in the normalised "
                   "pooled features).")
@click.option("--seeds", default="0,1,2,3,4", show_default=True, help="final: comma-separated seeds.")
@click.option("--tune-seeds", default="100", show_default=True, help="tune: seeds (keep them apart from --seeds).")
@click.option("--tune-models", default="small_cnn", show_default=True, help="tune: models the grids run on.")
@click.option("--epochs", default="small_cnn=30,resnet18=30", show_default=True,
              help="Epochs for every model (N) or per model (MODEL=N,...); the same for every arm.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(PRECISIONS),
              help="Training autocast (bf16 only pays on CPUs with AVX-512 BF16 or AMX, and on GPUs).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=2),
              help="The same for every arm; another value than the committed study's starts another study "
                   "(give it its own --out folder).")
@click.option("--select-metric", default="balanced_accuracy", show_default=True,
              type=click.Choice(["balanced_accuracy", "auc"]),
              help="Validation metric that keeps each run's best.pt (both are fair to imbalanced classes).")
@click.option("--threads", default=None, type=int, help="torch threads of this process [default: torch's].")
@click.option("--data-dir", default=None, type=click.Path(), help="Folder with the .npz files [default: ../shared/data].")
@click.option("--workdir", default="runs/study", show_default=True, help="Where the run folders are written.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--out", default="benchmarks/results/study.json", show_default=True, type=click.Path(),
              help="Report; study-runs.jsonl (every finished run) and study-choice.json sit beside it.")
def bench_study(stage, datasets, models, arms, seeds, tune_seeds, tune_models, epochs, precision, batch_size,
                select_metric, threads, data_dir, workdir, device, out):
    """Does distractor-aware training help? A resumable study against fair baselines.

    STAGE tune: every arm's grid (the same number of settings each) on the validation split only;
    each arm's choice is frozen in study-choice.json. STAGE final: every model, seed, dataset and
    arm with its frozen choice, test read once per run; study.json/.md rewritten after each run.
    STAGE report: rewrite study.json/.md from the finished runs. Finished runs are skipped, so an
    interrupted study continues where it stopped.
    """
    import torch

    from benchmarks.study import ARMS, Study, run_final, run_tuning, write_report

    if threads:
        torch.set_num_threads(threads)
    seed_list, tune_seed_list = _int_list(seeds, "--seeds"), _int_list(tune_seeds, "--tune-seeds")
    arm_list = _words(arms)
    unknown = [a for a in arm_list if a not in ARMS]
    if unknown:
        raise click.BadParameter(f"unknown arms {unknown}: choose from {list(ARMS)}", param_hint="--arms")
    model_list = _words(models)
    study = Study(datasets=_words(datasets), models=model_list, arms=arm_list, seeds=seed_list,
                  tune_seeds=tune_seed_list, tune_models=_words(tune_models),
                  epochs=_epochs(epochs, sorted(set(model_list) | set(_words(tune_models)))), precision=precision,
                  batch_size=batch_size, select_metric=select_metric, device=device, workdir=workdir, out=out,
                  data_dir=data_dir)
    command = "nil " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        if stage == "tune":
            choices = run_tuning(study)
            for arm in arm_list:
                click.echo(f"{arm}: {choices[arm]['params'] if arm in choices else 'not all tuning runs done'}")
            return
        result = run_final(study, command) if stage == "final" else write_report(study, command)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{result['finished_runs']} of {result['planned_runs']} final runs; wrote {out} and "
               f"{Path(out).with_suffix('.md')}")


@bench.command("convergence")
@click.option("--datasets", default="retinamnist,breastmnist", show_default=True, help="Comma-separated.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds (at least 3 for a verdict).")
@click.option("--tune/--no-tune", default=True, show_default=True,
              help="Choose batch size x weight decay on validation first (a 2x2 grid on the tuning seed); "
                   "--no-tune: the final runs use the study's recipe.")
@click.option("--tune-seeds", default="100", show_default=True, help="Comma-separated seeds of the recipe grid.")
@click.option("--epochs", default=30, show_default=True, help="Epochs: the study's, to check its recipe.")
@click.option("--select-metric", default="auc", show_default=True,
              type=click.Choice(["auc", "accuracy", "balanced_accuracy"]),
              help="Validation metric that keeps best.pt (MedMNIST v2 selects on AUC).")
@click.option("--threads", default=None, type=int, help="torch threads of this process [default: torch's].")
@click.option("--data-dir", default=None, type=click.Path(), help="Folder with the .npz files [default: ../shared/data].")
@click.option("--workdir", default="runs/convergence", show_default=True, help="Where the run folders are written.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--study", "study_out", default="benchmarks/results/study.json", show_default=True, type=click.Path(),
              help="The study whose frozen ce choice (study-choice.json beside it) is trained.")
@click.option("--out", default="benchmarks/results/convergence.json", show_default=True, type=click.Path(),
              help="Report (.json and .md); convergence-runs.jsonl (every finished run) sits beside it.")
def bench_convergence(datasets, seeds, tune, tune_seeds, epochs, select_metric, threads, data_dir, workdir, device,
                      study_out, out):
    """Can the study's CE baseline reach the published accuracy? ResNet-18 ce, best.pt by validation AUC.

    Held against issue 13's check: test accuracy within 0.015 of the published MedMNIST v2
    ResNet-18 (28) figure. First a recipe grid (batch size x weight decay) on validation only,
    the choice frozen in convergence-choice.json; then the chosen recipe on the final seeds, the
    test split read once per run. Resumable: finished runs are skipped.
    """
    import torch

    from benchmarks.convergence import Convergence, run_convergence

    if threads:
        torch.set_num_threads(threads)
    seed_list, tune_list = _int_list(seeds, "--seeds"), _int_list(tune_seeds, "--tune-seeds")
    if set(seed_list) & set(tune_list):
        raise click.BadParameter("the recipe grid's seeds must not be final seeds", param_hint="--tune-seeds")
    cfg = Convergence(datasets=_words(datasets), seeds=seed_list, tune=tune, tune_seeds=tune_list, epochs=epochs,
                      select_metric=select_metric, study_out=study_out, out=out, workdir=workdir, data_dir=data_dir,
                      device=device)
    command = "nil " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    try:
        result = run_convergence(cfg, command)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(Path(out).with_suffix(".md").read_text())
    click.echo(f"{result['finished_runs']} of {result['planned_runs']} runs; wrote {out}")
