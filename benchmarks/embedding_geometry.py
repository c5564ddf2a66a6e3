"""The geometry of a trained model's embeddings: are the classes apart, or has everything collapsed?

    python -m benchmarks.embedding_geometry RUN_DIR [RUN_DIR ...] --out benchmarks/results/geometry.json

For each run, embeds the training split with ``best.pt`` and reports, over the unit sphere:
the median distance of each sample to its nearest other-class and nearest same-class sample
(exact search, :func:`faiss_index.knn_other_class`), the mean pairwise distance and the norm of
the mean embedding (1.0 means every z is the same point; ~0 means spread around the sphere).
This is the evidence behind the accuracy benchmark's diagnosis (``accuracy.md``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.report import envelope, markdown_table, write_result
from faiss_index import knn_other_class
from nil.embedding import embed_split


def geometry(run_dir: str | Path, split: str = "train") -> dict:
    emb = embed_split(Path(run_dir) / "best.pt", split=split, device="cpu", progress=False)
    z, y, ids = (torch.as_tensor(emb[k]) for k in ("vectors", "labels", "ids"))
    other, _ = knn_other_class(z, y, z, y, 1, qid=ids, bid=ids)
    same, _ = knn_other_class(z, y, z, y, 1, qid=ids, bid=ids, same_class=True)
    gram = z @ z.T  # unit vectors: ||a - b||^2 = 2 - 2 a.b
    pairwise = (2 - 2 * gram).clamp(min=0).sqrt()
    n = len(z)
    return {"run_dir": str(run_dir), "split": split, "n": n,
            "nearest_other_median": float(other[:, 0].median()),
            "nearest_same_median": float(same[:, 0].median()),
            "mean_pairwise": float(pairwise.sum() / (n * (n - 1))),
            "mean_z_norm": float(z.mean(0).norm())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default="benchmarks/results/geometry.json")
    args = parser.parse_args()
    rows = [geometry(r) for r in args.runs]
    command = "python -m benchmarks.embedding_geometry " + " ".join(args.runs) + f" --out {args.out}"
    table = [["/".join(Path(r["run_dir"]).parts[-4:]), f"{r['nearest_other_median']:.3f}",
              f"{r['nearest_same_median']:.3f}", f"{r['mean_pairwise']:.3f}", f"{r['mean_z_norm']:.3f}"]
             for r in rows]
    md = "\n".join([
        "# Embedding geometry of trained runs (training split, best.pt)", "", f"Command: `{command}`", "",
        "Distances on the unit sphere (0..2). |mean z| = 1 means every embedding is the same point.", "",
        markdown_table(["run (dataset/model/arm/seed)", "nearest other-class (median)", "nearest same-class (median)",
                        "mean pairwise", "|mean z|"], table), ""])
    out = Path(args.out)
    write_result(out, envelope(command, rows=rows), md)
    print(md)


if __name__ == "__main__":
    main()
