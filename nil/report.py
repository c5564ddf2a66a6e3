"""``nil report RUN_DIR``: a self-contained HTML page that shows a run and its distractors.

Writes ``RUN_DIR/report/`` with ``index.html`` (every picture inlined, so it opens offline) and the
PNGs it shows beside it: training curves, the confusion matrix, a distractor gallery (test images
beside their nearest training images of another class) and suspect labels (training samples whose
nearest neighbours vote, class-balanced, for one other class: likely label noise or true look-alikes),
also listed in ``suspects.csv``. It states every setting that changes the method, and warns when the
model is no better than always predicting the majority class.
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

import faiss_index  # noqa: E402
from nil.config import TrainConfig  # noqa: E402
from nil.errors import NilError  # noqa: E402
from nil.embedding import embed_split  # noqa: E402
from nil.neighbours import find_suspects  # noqa: E402
from nil.runtime import open_config_dataset  # noqa: E402

LOG = logging.getLogger(__name__)


def _read_run(run_dir: Path) -> tuple[dict, list[dict], dict]:
    try:
        config = json.loads((run_dir / "config.json").read_text())
        history = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines() if s.strip()]
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except FileNotFoundError as exc:
        raise NilError(f"{run_dir} is not a finished nil run: {Path(exc.filename).name} is missing") from None
    except json.JSONDecodeError as exc:
        raise NilError(f"{run_dir} holds a damaged JSON file: {exc}") from None
    if not (run_dir / "best.pt").is_file():
        raise NilError(f"{run_dir} is not a finished nil run: best.pt is missing")
    return config, history, metrics


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss parts, validation metrics and (where recorded) mining cost and recall per epoch."""
    epochs = [h["epoch"] for h in history]
    has_mining = any("mining" in h for h in history)
    fig, axes = plt.subplots(1, 3 if has_mining else 2, figsize=(15 if has_mining else 10, 3.6))
    for key in ("loss", "loss_ce", "loss_distractor"):
        axes[0].plot(epochs, [h["train"][key] for h in history], marker="o", label=key)
    axes[0].set(title="training loss", xlabel="epoch")
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auc", "qwk"):
        values = [h["val"].get(key) for h in history]
        if any(v is not None for v in values):
            axes[1].plot(epochs, [np.nan if v is None else v for v in values], marker="o", label=key)
    axes[1].set(title="validation", xlabel="epoch")
    if has_mining:
        ms = [h.get("mining", {}).get("mining_ms_per_step", np.nan) for h in history]
        axes[2].plot(epochs, ms, marker="o", color="tab:red", label="mining ms/step")
        axes[2].set(title="distractor mining", xlabel="epoch", ylabel="ms per step")
        recall = [h.get("mining", {}).get("audit_recall_at_1", np.nan) for h in history]
        if not all(np.isnan(recall)):
            twin = axes[2].twinx()
            twin.plot(epochs, recall, marker="s", color="tab:blue", label="recall@1")
            twin.set(ylabel="recall@1 vs exact", ylim=(0, 1.05))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_confusion(cm: np.ndarray, classes: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(1.2 + 0.6 * len(classes), 1 + 0.6 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black", fontsize=8)
    ax.set(xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true",
           title="test confusion matrix")
    ax.set_xticklabels(classes, rotation=45, ha="right", fontsize=7)
    ax.set_yticklabels(classes, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def per_class_table(cm: np.ndarray, classes: list[str]) -> pd.DataFrame:
    tp = np.diag(cm).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(cm.sum(0) > 0, tp / cm.sum(0), np.nan)
        recall = np.where(cm.sum(1) > 0, tp / cm.sum(1), np.nan)
    return pd.DataFrame({"class": classes, "support": cm.sum(1), "precision": precision.round(4),
                         "recall": recall.round(4)})


def _show(ax, image: np.ndarray, title: str) -> None:
    ax.imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def majority_warning(cm: np.ndarray, split: str = "test") -> str | None:
    """A sentence when the model's accuracy on ``split`` is not above always predicting its largest class."""
    cm = np.asarray(cm)
    total = cm.sum()
    if total == 0:
        return None
    accuracy, majority = np.trace(cm) / total, cm.sum(1).max() / total
    if accuracy > majority:
        return None
    return (f"this model's {split} accuracy {accuracy:.3f} is not above the majority-class rate {majority:.3f} "
            "(always predicting the largest class): it has not learned the task yet, so its distractors and "
            "suspect labels say little; train longer or check the data")


def method_settings(config: dict) -> dict:
    """Every setting that changes the method, in the words of the ``nil train`` options."""
    loss = config.get("loss")
    out = {"loss": loss, "model": config.get("model"), "epochs": config.get("epochs"),
           "batch_size": config.get("batch_size"), "lr": config.get("lr"), "schedule": config.get("schedule"),
           "select_metric": config.get("select_metric"), "seed": config.get("seed")}
    if loss in ("nil", "ce-replay"):
        ann = config.get("ann")
        source = ("gradient" if config.get("distractor") == "gradient"
                  else "batch (--ann none)" if ann == "none" else f"memory (--ann {ann})")
        out |= {"distractor source": source,
                "ann_index": config.get("ann_index") if config.get("ann") == "faiss" else None,
                "distractor vectors": ("moved features of the sample itself" if source == "gradient"
                                       else "images replayed with their own CE, searched in pooled features"
                                       if loss == "ce-replay" else "this step's batch embeddings" if ann == "none"
                                       else "re-embedded in the step (fresh)" if config.get("fresh_distractors")
                                       else "stored in the memory (up to an epoch old)"),
                "warmup_epochs": config.get("warmup_epochs")}
    if loss == "nil":
        out |= {"lam": config.get("lam"), "margin": config.get("margin"), "variant": config.get("variant"),
                "term_weighting": config.get("term_weighting", "none"),
                "term measured in": ("pooled features (L2-normalised)" if config.get("term_space") == "features"
                                     else "z (projection head)"),
                "replay (weight of the distractor images' CE)": config.get("replay") or None}
    if loss == "ce-replay":
        out["lam (weight of the replayed images' CE)"] = config.get("lam")
    return {k: v for k, v in out.items() if v is not None}


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def build_report(run_dir: str | Path, n_gallery: int = 8, k: int = 4, n_suspects: int = 12, seed: int = 0,
                 device: str = "cpu") -> Path:
    """Write ``RUN_DIR/report/index.html`` and its PNGs; returns the HTML path."""
    run_dir = Path(run_dir)
    config, history, metrics = _read_run(run_dir)
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    classes = metrics["classes"]
    cm = np.asarray(metrics["test"]["confusion_matrix"])

    plot_curves(history, out / "curves.png")
    plot_confusion(cm, classes, out / "confusion.png")
    per_class = per_class_table(cm, classes)

    ds = open_config_dataset(TrainConfig.from_dict(config))
    train_emb = embed_split(run_dir / "best.pt", split="train", device=device, progress=False)
    test_emb = embed_split(run_dir / "best.pt", split="test", device=device, progress=False)
    index = faiss_index.ExactIndex(train_emb["vectors"].shape[1], len(classes))
    index.upsert(train_emb["ids"], train_emb["vectors"], train_emb["labels"])

    rng = np.random.default_rng(seed)
    pick = rng.choice(len(test_emb["ids"]), size=min(n_gallery, len(test_emb["ids"])), replace=False)
    res = index.search_other_class(test_emb["vectors"][pick], test_emb["labels"][pick], k)
    train_pos = {int(i): p for p, i in enumerate(ds.train.ids)}
    test_pos = {int(i): p for p, i in enumerate(ds.test.ids)}
    fig, axes = plt.subplots(len(pick), k + 1, figsize=(1.6 * (k + 1), 1.7 * len(pick)), squeeze=False)
    gallery_rows = []
    for r, p in enumerate(pick):
        qid, qlab = int(test_emb["ids"][p]), int(test_emb["labels"][p])
        _show(axes[r][0], ds.test.load(test_pos[qid]), f"test {qid}\n{classes[qlab]}")
        for c in range(k):
            nid, nlab, dist = int(res.ids[r, c]), int(res.labels[r, c]), float(res.distances[r, c])
            if nid < 0:
                axes[r][c + 1].axis("off")
                continue
            _show(axes[r][c + 1], ds.train.load(train_pos[nid]), f"train {nid}\n{classes[nlab]} d={dist:.3f}")
            gallery_rows.append({"query_id": qid, "query_label": classes[qlab], "rank": c + 1, "neighbor_id": nid,
                                 "neighbor_label": classes[nlab], "distance": round(dist, 4)})
    fig.suptitle("test images (left) and their nearest training images of another class", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "gallery.png", dpi=110)
    plt.close(fig)

    warning = majority_warning(cm)
    if warning:
        LOG.warning("%s", warning)
    suspects = find_suspects(train_emb["vectors"], train_emb["labels"])
    suspects.insert(0, "id", train_emb["ids"][suspects["row"].to_numpy()] if len(suspects) else [])
    suspects.insert(1, "key", [train_emb["keys"][r] for r in suspects["row"]])
    suspects["label"] = [classes[c] for c in suspects["label"]]
    suspects["suspected_class"] = [classes[c] for c in suspects["suspected_class"]]
    suspects = suspects.drop(columns="row")
    suspects.to_csv(out / "suspects.csv", index=False)
    top = suspects.head(n_suspects)
    if len(top):
        cols = min(6, len(top))
        fig, axes = plt.subplots((len(top) + cols - 1) // cols, cols, figsize=(1.8 * cols, 2.0 * ((len(top) + cols - 1) // cols)), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, (_, row) in zip(axes.flat, top.iterrows()):
            _show(ax, ds.train.load(train_pos[int(row["id"])]),
                  f"{row['id']}: {row['label']}\nlooks {row['suspected_class']} ({row['fraction']:.0%})")
        fig.tight_layout()
        fig.savefig(out / "suspects.png", dpi=110)
        plt.close(fig)

    html_path = out / "index.html"
    html_path.write_text(_html(run_dir, config, metrics, per_class, gallery_rows, top, out, warning))
    return html_path


def _html(run_dir: Path, config: dict, metrics: dict, per_class: pd.DataFrame, gallery_rows: list[dict],
          suspects: pd.DataFrame, out: Path, warning: str | None = None) -> str:
    def img(name: str, alt: str) -> str:
        if not (out / name).exists():
            return "<p>(none)</p>"
        return f'<img alt="{alt}" src="data:image/png;base64,{_b64(out / name)}">'

    test = metrics["test"]
    rows = "".join(f"<tr><td>{k}</td><td>{'n/a' if test.get(k) is None else f'{test[k]:.4f}'}</td></tr>"
                   for k in ("accuracy", "balanced_accuracy", "macro_f1", "auc", "qwk"))
    settings = {"data": config.get("data")} | method_settings(config)
    alert = f'<p id="warning"><strong>Warning:</strong> {html.escape(warning)}.</p>' if warning else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nil report: {html.escape(run_dir.name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}img{{max-width:100%}}h2{{margin-top:1.6em}}</style>
</head><body>
<h1>nil report: {html.escape(str(run_dir))}</h1>
<p>best epoch {metrics['best_epoch']} of {metrics['epochs']} by validation {html.escape(metrics['select_metric'])};
test metrics of best.pt, {test['n']} images.</p>
{alert}
<table id="test-metrics"><tr><th>test metric</th><th>value</th></tr>{rows}</table>
<h2>Settings</h2><pre>{html.escape(json.dumps(settings, indent=1))}</pre>
<h2>Training curves</h2>{img('curves.png', 'training curves')}
<h2>Confusion matrix and per-class precision / recall</h2>{img('confusion.png', 'confusion matrix')}
{per_class.to_html(index=False, table_id='per-class', na_rep='n/a')}
<h2>Distractor gallery</h2>
<p>Each row: a test image, then its nearest training images of another class in the model's embedding space.</p>
{img('gallery.png', 'distractor gallery')}
{pd.DataFrame(gallery_rows).to_html(index=False, table_id='gallery') if gallery_rows else ''}
<h2>Suspect labels</h2>
<p>Training samples whose 20 nearest neighbours vote for one other class (at least 80% of the votes, each
neighbour's vote weighted by the inverse frequency of its class, so a minority-class image is not listed merely
for sitting among the majority class): likely label noise or true look-alikes. All of them are in <a href="suspects.csv">suspects.csv</a>; the top {len(suspects)} are shown.</p>
{img('suspects.png', 'suspect labels')}
{suspects.to_html(index=False, table_id='suspects', float_format=lambda v: f'{v:.3f}') if len(suspects) else '<p>none</p>'}
</body></html>
"""
