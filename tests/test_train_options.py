"""`nil train` fine-tuning and reporting options: input normalisation, layer-wise learning rate,
stem freezing, --log csv|tensorboard|none."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from cli.main import main
from nil.config import TrainConfig
from nil.errors import NilError
from nil.evaluate import evaluate_checkpoint
from nil.runtime import open_config_dataset
from nil.train import build_training, train


def _cfg(tiny_npz, tmp_path, **kw) -> TrainConfig:
    base = dict(data=str(tiny_npz), out=str(tmp_path / "run"), model="small_cnn", epochs=2, batch_size=32,
                embed_dim=8, ann="none", loss="ce", device="cpu", progress=False)
    return TrainConfig(**(base | kw))


def test_inputs_are_normalised_with_the_training_splits_own_statistics(tmp_path, tiny_npz):
    result = train(_cfg(tiny_npz, tmp_path, epochs=1))
    train_images = np.load(tiny_npz)["train_images"].astype(np.float64) / 255  # 96 images: all of them sampled
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["normalize"]
    assert recorded["kind"] == "data"
    assert recorded["mean"] == pytest.approx(train_images.mean(axis=(0, 1, 2)), abs=1e-4)
    assert recorded["std"] == pytest.approx(train_images.std(axis=(0, 1, 2), ddof=1), abs=1e-4)
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert ckpt["model_spec"]["normalize"] == recorded  # every later reader applies the same statistics
    again = evaluate_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    assert again["accuracy"] == pytest.approx(result["test"]["accuracy"])


def test_half_normalisation_keeps_the_fixed_statistics(tmp_path, tiny_npz):
    train(_cfg(tiny_npz, tmp_path, epochs=1, normalize="half"))
    recorded = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["normalize"]
    assert recorded == {"kind": "half", "mean": [0.5] * 3, "std": [0.5] * 3}


def test_backbone_learns_at_the_scaled_rate_and_the_stem_waits_its_epochs(tiny_npz, tmp_path):
    cfg = _cfg(tiny_npz, tmp_path, lr=1e-2, backbone_lr_scale=0.1, freeze_stem_epochs=1)
    ds = open_config_dataset(cfg)
    steps_per_epoch = 2
    training = build_training(cfg, ds, 16, torch.device("cpu"), total_steps=cfg.epochs * steps_per_epoch)
    model, optimizer, scheduler = training.model, training.optimizer, training.scheduler
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates == {"stem": 0.0, "backbone": pytest.approx(1e-3), "heads": pytest.approx(1e-2)}
    stem = [p for g in optimizer.param_groups if g["name"] == "stem" for p in g["params"]]
    before = [p.detach().clone() for p in stem]
    x = torch.randn(8, 3, 16, 16)
    for step in range(steps_per_epoch + 1):
        if step == steps_per_epoch:
            assert all(torch.equal(a, b) for a, b in zip(before, stem))  # frozen epoch: not even weight decay
        optimizer.zero_grad()
        model(x).logits.square().mean().backward()
        optimizer.step()
        scheduler.step()
    assert not all(torch.equal(a, b) for a, b in zip(before, stem))  # the stem learns from the second epoch
    rates = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert rates["stem"] == rates["backbone"] == pytest.approx(1e-3 * 0.01)  # unfrozen, on the shared step schedule


def test_freezing_every_epoch_is_refused(tiny_npz, tmp_path):
    with pytest.raises(NilError, match="--freeze-stem-epochs"):
        _cfg(tiny_npz, tmp_path, freeze_stem_epochs=2).validate()


def test_csv_log_is_the_epoch_lines_as_a_table(tmp_path, tiny_npz):
    train(_cfg(tiny_npz, tmp_path, loss="nil", ann="exact"))
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    table = pd.read_csv(tmp_path / "run" / "metrics.csv")
    assert list(table["epoch"]) == [1, 2]
    assert table["val/balanced_accuracy"].tolist() == pytest.approx([x["val"]["balanced_accuracy"] for x in lines])
    assert table["train/loss_distractor"].tolist() == pytest.approx([x["train"]["loss_distractor"] for x in lines])
    assert "mining/mining_ms_per_step" in table.columns


def test_no_log_writes_only_the_jsonl(tmp_path, tiny_npz):
    train(_cfg(tiny_npz, tmp_path, epochs=1, log="none"))
    assert not (tmp_path / "run" / "metrics.csv").exists() and not (tmp_path / "run" / "tensorboard").exists()


def test_tensorboard_log_holds_scalars_and_the_best_epoch_projector(tmp_path, tiny_npz):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(_cfg(tiny_npz, tmp_path, loss="nil", ann="exact", log="tensorboard"))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard")).Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss_ce", "train/loss_distractor", "val/auc", "lr", "epoch_s"} <= set(tags)
    assert [e.step for e in events.Scalars("val/auc")] == [1, 2]
    projector = (tmp_path / "run" / "tensorboard" / "projector_config.pbtxt").read_text()
    assert "z_best_epoch" in projector and "sprite" in projector  # thumbnails with the embeddings
    (folder,) = [p for p in (tmp_path / "run" / "tensorboard").iterdir() if p.is_dir()]
    labels = (folder / "z_best_epoch" / "metadata.tsv").read_text().split()
    assert len(labels) == 24 and set(labels) <= {"0", "1", "2"}  # every validation image, with its class


def test_tensorboard_missing_is_one_sentence_before_anything_is_written(tmp_path, tiny_npz, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(NilError, match=r"pip install 'nil\[tensorboard\]'"):
        train(_cfg(tiny_npz, tmp_path, log="tensorboard"))
    assert not (tmp_path / "run").exists()


def test_a_timm_backbone_trains_and_its_checkpoint_evaluates(tmp_path, tiny_npz):
    pytest.importorskip("timm")
    result = train(_cfg(tiny_npz, tmp_path, model="timm:resnet18", epochs=1, freeze_stem_epochs=0))
    again = evaluate_checkpoint(tmp_path / "run" / "best.pt", device="cpu")
    assert again["accuracy"] == pytest.approx(result["test"]["accuracy"])


def test_a_timm_backbone_loads_a_local_state_dict_and_names_its_stem(tmp_path):
    timm = pytest.importorskip("timm")
    from nil.models import build_model, stem

    written = timm.create_model("resnet18", num_classes=0, in_chans=3).state_dict()
    written = {k: torch.full_like(v, 0.25) if v.is_floating_point() else v for k, v in written.items()}
    torch.save(written, tmp_path / "backbone.pt")
    model = build_model("timm:resnet18", 2, in_channels=3, image_size=32, weights=tmp_path / "backbone.pt")
    assert torch.all(model.backbone.layer4[1].conv2.weight == 0.25)
    assert stem(model) is model.backbone.conv1  # timm's pretrained_cfg names the first convolution


def test_timm_offline_and_unknown_names_are_one_sentence(monkeypatch):
    timm = pytest.importorskip("timm")
    from nil.models import build_model

    def offline(*args, pretrained=False, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(NilError, match=r"pretrained weights of timm model resnet18 .*--weights PATH"):
        build_model("timm:resnet18", 2, pretrained=True)
    with pytest.raises(NilError, match="timm has no model 'no_such_net'"):
        build_model("timm:no_such_net", 2)


def test_the_cli_takes_timm_names_and_refuses_others():
    from click.testing import CliRunner

    from cli.main import main

    result = CliRunner().invoke(main, ["train", "--data", "x.npz", "--out", "o", "--model", "vgg"])
    assert result.exit_code == 2 and "nor timm:NAME" in result.output


def test_the_faiss_search_knobs_reach_the_index_and_need_ann_faiss(tiny_npz, tmp_path):
    pytest.importorskip("faiss")
    cfg = _cfg(tiny_npz, tmp_path, loss="nil", ann="faiss", ann_index="ivfpq", ann_nprobe=3, ann_rerank=7)
    training = build_training(cfg, open_config_dataset(cfg), 16, torch.device("cpu"), total_steps=4)
    params = training.source.miner.index.params
    assert params["nprobe"] == 3 and params["rerank"] == 7
    with pytest.raises(NilError, match="need --ann faiss"):
        _cfg(tiny_npz, tmp_path, loss="nil", ann="exact", ann_rerank=7).validate()


def test_ann_param_sets_the_memorys_index(tiny_npz, tmp_path):
    """--ann-param store_dtype=float16 halves the exact memory; with faiss it reaches the index with the others."""
    cfg = _cfg(tiny_npz, tmp_path, loss="nil", ann="exact", ann_params={"store_dtype": "float16"})
    training = build_training(cfg, open_config_dataset(cfg), 16, torch.device("cpu"), total_steps=4)
    assert training.source.miner.index.store.vectors.dtype == torch.float16
    pytest.importorskip("faiss")
    cfg = _cfg(tiny_npz, tmp_path, loss="nil", ann="faiss", ann_index="ivf", ann_nprobe=2,
               ann_params={"store_dtype": "float16", "nlist": 4})
    params = build_training(cfg, open_config_dataset(cfg), 16, torch.device("cpu"), total_steps=4).source.miner.index.params
    assert (params["store_dtype"], params["nprobe"]) == ("float16", 2)
    assert cfg.to_options()["ann-param"] == {"store_dtype": "float16", "nlist": 4}


@pytest.mark.parametrize("kw, message", [
    (dict(ann="none", distractor="memory"), "needs --ann exact or --ann faiss"),
    (dict(ann="faiss", ann_nprobe=4, ann_params={"nprobe": 8}), "give nprobe and rerank once"),
    (dict(ann="exact", index_from="idx"), "drop one"),
])
def test_ann_param_is_refused_where_it_cannot_apply(tiny_npz, tmp_path, kw, message):
    params = kw.pop("ann_params", {"store_dtype": "float16"})
    with pytest.raises(NilError, match=message):
        _cfg(tiny_npz, tmp_path, loss="nil", ann_params=params, **kw).validate()


@pytest.mark.parametrize("args, message", [
    (["--ann", "exact", "--ann-param", "nlist=4"], "unknown parameter(s) nlist for kind 'exact'"),
    (["--ann", "exact", "--ann-param", "store_dtype=int8"], "store_dtype must be one of float32, float16"),
    (["--ann", "exact", "--ann-param", "store_dtype"], "'store_dtype' is not NAME=VALUE"),
])
def test_a_bad_ann_param_is_one_sentence_and_writes_no_run_folder(tiny_npz, tmp_path, args, message):
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--data", str(tiny_npz), "--out", str(out), "--model", "small_cnn",
                                       "--epochs", "1", "--device", "cpu", "--no-progress", *args])
    assert result.exit_code != 0 and message in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


def test_ann_param_reads_from_the_command_line_and_from_a_config_mapping(tiny_npz, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("nil.train.train", lambda cfg, **kw: seen.append(cfg) or (_ for _ in ()).throw(SystemExit(0)))
    base = ["train", "--data", str(tiny_npz), "--out", str(tmp_path / "run"), "--ann", "exact"]
    CliRunner().invoke(main, [*base, "--ann-param", "store_dtype=float16", "--ann-param", "chunk=512"])
    config = tmp_path / "run.yaml"
    config.write_text("ann-param:\n  store_dtype: float16\n  chunk: 512\n")
    CliRunner().invoke(main, [*base, "--config", str(config)])
    assert [c.ann_params for c in seen] == [{"store_dtype": "float16", "chunk": 512}] * 2


def test_balanced_term_weighting_uses_the_training_splits_class_frequencies(tiny_npz, tmp_path):
    cfg = _cfg(tiny_npz, tmp_path, loss="nil", distractor="gradient", term_weighting="balanced", epochs=1)
    ds = open_config_dataset(cfg)
    training = build_training(cfg, ds, 16, torch.device("cpu"), total_steps=3)
    counts = np.bincount(ds.train.labels, minlength=ds.num_classes)
    expected = counts.sum() / (ds.num_classes * counts)
    assert training.criterion.class_weight.numpy() == pytest.approx(expected, rel=1e-6)
    assert _cfg(tiny_npz, tmp_path, loss="nil").term_weighting == "none"
    result = train(cfg)  # trains end to end, and config.json records the setting
    assert result["test"]["accuracy"] is not None
    assert json.loads((tmp_path / "run" / "config.json").read_text())["term_weighting"] == "balanced"
    with pytest.raises(NilError, match="needs --loss nil"):
        _cfg(tiny_npz, tmp_path, loss="ce", term_weighting="balanced").validate()


def test_the_defaults_are_the_studys_validation_choice_and_a_memory_keeps_its_own():
    """No options: the gradient distractor, lambda 0.3, margin 1.0 (nil-gradient's frozen choice in
    benchmarks/results/study-choice.json). Asking for a memory gives nil-fresh's choice (the memory
    names the distractor, the current network embeds it), and stored distractors nil-stored's."""
    choice = json.loads((Path(__file__).parents[1] / "benchmarks" / "results" / "study-choice.json").read_text())
    cfg = TrainConfig(data="d.npz", out="o")
    assert (cfg.loss, cfg.distractor, cfg.ann) == ("nil", "gradient", "none")
    assert {"lam": cfg.lam, "margin": cfg.margin} == choice["nil-gradient"]["params"]
    for memory in (dict(ann="faiss"), dict(ann="exact"), dict(variant="triplet"), dict(loss="ce-replay"),
                   dict(ann="none", distractor="memory")):
        cfg = TrainConfig(data="d.npz", out="o", **memory)
        assert cfg.distractor == "memory" and cfg.margin == choice["nil-fresh"]["params"]["margin"]
        cfg = TrainConfig(data="d.npz", out="o", fresh_distractors=False, **memory)
        assert cfg.margin == choice["nil-stored"]["params"]["margin"]
    assert TrainConfig(ann="faiss", margin=0.7).margin == 0.7  # a given margin is kept
    with pytest.raises(NilError, match="--distractor gradient builds each distractor from the network"):
        TrainConfig(data="d.npz", out="o", distractor="gradient", ann="faiss").validate()


def test_the_cli_shows_auto_and_records_what_it_resolved_to(tmp_path, tiny_npz):
    result = CliRunner().invoke(main, ["train", "--help"])
    assert "[default: auto]" in result.output and "validation choice" in result.output
    run = CliRunner().invoke(main, ["train", "--data", str(tiny_npz), "--out", str(tmp_path / "r"), "--model",
                                    "small_cnn", "--epochs", "1", "--embed-dim", "8", "--device", "cpu", "--no-progress"])
    assert run.exit_code == 0, run.output
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["distractor"] == "gradient" and config["margin"] == 1.0 and config["ann"] == "none"
    refused = CliRunner().invoke(main, ["train", "--data", str(tiny_npz), "--out", str(tmp_path / "x"),
                                        "--distractor", "gradient", "--ann", "faiss"])
    assert refused.exit_code != 0 and "searches no memory" in refused.output and not (tmp_path / "x").exists()
