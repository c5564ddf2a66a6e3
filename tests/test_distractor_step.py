"""The distractor step: one design for every source, BatchNorm statistics of the training data only.

Design under test (nil.batchnorm, nil.mining): within a step the training batch's forward pass is
ordinary training BatchNorm; every other pass of the step (distractor images, the gradient
distractor's moved features) is normalised with that batch's statistics and leaves the running
statistics alone; where that pass needs a gradient, the gradient flows through the batch's statistics.
"""

import json

import pytest
import torch

from nil.batchnorm import batch_statistics
from nil.config import TrainConfig
from nil.data import make_transform, open_dataset
from nil.errors import NilError
from nil.losses import DistractorLoss
from nil.mining import (
    DistractorImages,
    DistractorMiner,
    DistractorSource,
    GradientDistractors,
    Mined,
    SearchedDistractors,
    Step,
)
from nil.models import ModelOutput, build_model
from nil.train import make_scheduler, step_loss, train, train_epoch


def _buffers(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def setup(tiny_npz):
    ds = open_dataset(str(tiny_npz))
    torch.manual_seed(0)
    model = build_model("small_cnn", ds.num_classes, ds.channels, 16, 8).train()
    images = DistractorImages(ds.train, make_transform(False, 16, ds.channels))  # no flips: comparable
    rows = torch.arange(12)
    x, y = images.load(rows, torch.device("cpu"))
    ids = torch.as_tensor(ds.train.ids[:12], dtype=torch.int64)
    return ds, model, images, x, y, ids


def _plain_batch_buffers(model, x):
    """Running statistics after one ordinary train-mode forward of the batch alone."""
    ref = build_model("small_cnn", 3, 3, 16, 8)
    ref.load_state_dict(model.state_dict())
    ref.train()(x)
    return _buffers(ref)


@pytest.mark.parametrize("source_name", ["fresh", "replay", "gradient", "batch"])
def test_running_statistics_after_a_step_are_those_of_the_training_batch_alone(setup, source_name):
    ds, model, images, x, y, ids = setup
    expected = _plain_batch_buffers(model, x)
    miner = DistractorMiner("exact", ds.num_classes, 8)
    other_x, other_y = images.load(torch.arange(12, 40), torch.device("cpu"))
    with torch.no_grad():  # a memory of other training samples, embedded without touching the statistics
        miner.update(model.eval()(other_x).z, other_y, torch.as_tensor(ds.train.ids[12:40], dtype=torch.int64))
    model.train()
    source = {"fresh": SearchedDistractors(miner, images),
              "replay": SearchedDistractors(miner, images, replay=True),
              "gradient": GradientDistractors(0.5),
              "batch": SearchedDistractors(DistractorMiner("none", ds.num_classes, 8), images)}[source_name]
    with batch_statistics(model):
        step = source.step(model, x, y, ids, active=True)
    assert step.pairs.valid.all()
    if source_name in ("fresh", "replay"):  # distractor images really went through the network
        assert step.replay is not None if source_name == "replay" else step.pairs.distractor.requires_grad
    assert _same(_buffers(model), expected)


def test_gradient_distractor_search_leaves_running_statistics_unchanged(setup):
    ds, model, images, x, y, ids = setup
    with batch_statistics(model):
        out = model(x)
        after_batch = _buffers(model)
        GradientDistractors(0.5).step(model, x, y, ids, active=True)  # a second batch pass is the same batch
        from nil.mining import gradient_distractor
        gradient_distractor(model, out.features, out.logits, y, 0.5)
    assert not _same(after_batch, _buffers(build_model("small_cnn", 3, 3, 16, 8)))
    assert _same(_buffers(model), after_batch)


def test_a_distractor_image_is_embedded_as_a_member_of_the_batch(setup):
    """Replayed through the image path, a sample of the batch gets the embedding the batch gave it."""
    ds, model, images, x, y, ids = setup
    miner = DistractorMiner("none", ds.num_classes, 8)
    with batch_statistics(model):
        step = SearchedDistractors(miner, images, replay=True).step(model, x, y, ids, active=True)
    rows = step.pairs.ids  # every distractor is in the batch; replay embeds its image again
    where = (rows[:, None] == ids[None, :]).float().argmax(1)
    assert torch.allclose(step.replay.z, step.out.z[where], atol=1e-5)
    assert torch.equal(step.replay_labels, y[where])
    # searched in z (--loss nil --replay), the term measures the replayed images' own fresh embeddings
    assert torch.equal(step.pairs.distractor, step.replay.z.float()) and step.pairs.distractor.requires_grad
    # a plain train-mode pass over the distractor images alone would normalise with their own statistics
    alone = build_model("small_cnn", 3, 3, 16, 8)
    alone.load_state_dict(model.state_dict())
    assert not torch.allclose(alone.train()(x[where][:3]).z, step.out.z[where][:3], atol=1e-3)


@pytest.mark.parametrize("norm", [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d])
def test_a_later_pass_is_blind_to_what_the_batch_normalisation_removes(norm):
    """A loss on a distractor pass has no gradient along a per-channel shift of the layer before it.

    The batch's own loss cannot see such a shift (its normalisation removes it); a distractor pass
    normalised with constant statistics could, and Adam would then push the weights along it every
    step (hard-example replay trained to the majority-class rate that way)."""
    torch.manual_seed(0)
    two_d = norm is torch.nn.BatchNorm2d
    layer = torch.nn.Conv2d(3, 4, 3) if two_d else torch.nn.Linear(5, 4)
    model = torch.nn.Sequential(layer, norm(4)).train()
    shape = (lambda n: (n, 3, 6, 6)) if two_d else (lambda n: (n, 5))
    batch, later = torch.randn(shape(8)), torch.randn(shape(3)) + 0.5
    with batch_statistics(model):
        out = model(batch)
        stats = (model[1].running_mean.clone(), model[1].running_var.clone())
        again = model(later)
    assert torch.equal(model[1].running_mean, stats[0]) and torch.equal(model[1].running_var, stats[1])
    dims = [0, 2, 3] if two_d else [0]
    pre = layer(batch).detach()
    expect = torch.nn.functional.batch_norm(layer(later).detach(), pre.mean(dims), pre.var(dims, unbiased=False),
                                            model[1].weight.detach(), model[1].bias.detach(), False, 0.0, 1e-5)
    assert torch.allclose(again, expect, atol=1e-5)  # normalised with the batch's statistics
    (again * torch.randn_like(again)).sum().backward()
    assert layer.bias.grad.abs().max() < 1e-5  # a per-channel shift moves the batch mean with it
    scale = (layer.weight.grad * layer.weight).sum() + (layer.bias.grad * layer.bias).sum()
    size = layer.weight.grad.norm() * layer.weight.norm()
    assert abs(float(scale)) < 1e-2 * float(size)  # and so does a scale (the batch variance; eps aside)
    assert layer.weight.grad.abs().max() > 1e-3  # while the pass still trains the layer
    del out


def test_a_later_pass_without_gradient_uses_the_batch_statistics_as_before(setup):
    """The gradient distractor's moved features (no gradient) get the same numbers as ever."""
    ds, model, images, x, y, ids = setup
    with batch_statistics(model):
        out = model(x)
        with torch.no_grad():
            moved = model.heads(out.features.detach() * 1.1).z
    with batch_statistics(model):
        out = model(x)
        live = model.heads(out.features.detach() * 1.1).z
    assert torch.allclose(moved, live.detach(), atol=1e-5)


def _one_step(model, source, cfg, x, y, ids):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = make_scheduler(optimizer, "cosine", 1)
    return train_epoch(model, [(x, y, ids)], optimizer, scheduler, DistractorLoss(cfg.margin), source, cfg,
                        torch.device("cpu"), True, 0)


@pytest.mark.parametrize("loss, fresh", [("nil", True), ("nil", False), ("ce-replay", True)])
@pytest.mark.parametrize("batch", [1, 2, 12])
def test_steps_with_one_distractor_or_one_sample_do_not_crash(setup, loss, fresh, batch):
    """Only the last sample of the batch has a distractor (the memory holds one class only)."""
    ds, model, images, x, y, ids = setup
    x, y, ids = x[:batch], y[:batch].clone(), ids[:batch]
    y[:] = 0
    y[-1] = 1
    miner = DistractorMiner("exact", ds.num_classes, 8)
    stored_rows = torch.tensor([r for r in range(20, 60) if int(ds.train.labels[r]) == 0][:5])
    sx, sy = images.load(stored_rows, torch.device("cpu"))
    with torch.no_grad():
        miner.update(model.eval()(sx).z, sy, torch.as_tensor(ds.train.ids[stored_rows.numpy()], dtype=torch.int64))
    model.train()
    cfg = TrainConfig(data="-", out="-", loss=loss, fresh_distractors=fresh, progress=False)
    source = SearchedDistractors(miner, images if (fresh or loss == "ce-replay") else None, replay=loss == "ce-replay")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = _one_step(model, source, cfg, x, y, ids)
    assert stats.with_distractor == 1 and stats.seen == batch
    assert torch.isfinite(torch.tensor(stats.loss))
    changed = [k for k, v in model.state_dict().items() if "weight" in k and not torch.equal(v, before[k])]
    assert any(k.startswith("projection") for k in changed)  # the head took part


def test_the_projection_head_takes_part_in_steps_without_any_distractor(setup):
    ds, model, images, x, y, ids = setup
    cfg = TrainConfig(data="-", out="-", loss="ce", progress=False)
    model.zero_grad()
    _one_step(model, DistractorSource(), cfg, x, y, ids)
    assert all(p.grad is not None for p in model.parameters())  # zero gradients, but no unused parameter


def test_no_search_during_warmup(tmp_path, tiny_npz):
    cfg = TrainConfig(data=str(tiny_npz), out=str(tmp_path / "r"), model="small_cnn", epochs=2, batch_size=32,
                      embed_dim=8, warmup_epochs=1, progress=False, device="cpu", fresh_distractors=True, ann="exact")
    train(cfg)
    lines = [json.loads(s) for s in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["mining"]["mining_ms_per_step"] == 0.0 and lines[0]["mining"]["upsert_ms_per_step"] > 0
    assert lines[1]["mining"]["mining_ms_per_step"] > 0 and lines[1]["train"]["distractor_rate"] > 0.9


@pytest.mark.parametrize("kw, message", [
    (dict(distractor="gradient", loss="ce-replay"), "ce-replay"),
    (dict(distractor="gradient", variant="triplet"), "triplet"),
    (dict(distractor="gradient", index_from="x"), "index-from"),
    (dict(schedule="linear"), "schedule"),
])
def test_combinations_that_cannot_work_are_refused_up_front(tmp_path, tiny_npz, kw, message):
    cfg = TrainConfig(data=str(tiny_npz), out=str(tmp_path / "r"), progress=False, device="cpu", **kw)
    with pytest.raises(NilError, match=message):
        train(cfg)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("kw", [
    dict(loss="nil", ann="none", distractor="memory", fresh_distractors=True),
    dict(loss="nil", ann="exact", fresh_distractors=True, variant="triplet"),
    dict(loss="nil", ann="faiss", ann_index="flat", fresh_distractors=True, audit_every=2),
    dict(loss="ce-replay", ann="exact"),
    dict(loss="ce-replay", ann="none"),
    dict(loss="nil", distractor="gradient", schedule="step"),
])
def test_every_source_trains_end_to_end(tmp_path, tiny_npz, kw):
    cfg = TrainConfig(data=str(tiny_npz), out=str(tmp_path / "r"), model="small_cnn", epochs=2, batch_size=32,
                      embed_dim=8, warmup_epochs=0, progress=False, device="cpu", **kw)
    result = train(cfg)
    lines = [json.loads(s) for s in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train"]["distractor_rate"] > 0.5
    if kw["loss"] == "ce-replay":  # the "distractor" column holds the replayed images' cross-entropy
        assert lines[-1]["train"]["loss_distractor"] > 0.0
    assert 0.0 <= result["test"]["accuracy"] <= 1.0


def test_ce_replay_loss_is_batch_ce_plus_lambda_times_the_replayed_images_ce():
    torch.manual_seed(0)
    logits, replay_logits = torch.randn(4, 3), torch.randn(6, 3)
    y, replay_y = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 1, 0, 2, 2, 0])
    z = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    step = Step(ModelOutput(logits, z, z), None, ModelOutput(replay_logits, z[:1].expand(6, 8), z), replay_y)
    cfg = TrainConfig(loss="ce-replay", lam=0.3)
    total, ce, replay = step_loss(step, y, DistractorLoss(0.5), cfg)
    f = torch.nn.functional.cross_entropy
    assert torch.allclose(ce, f(logits, y)) and torch.allclose(replay, f(replay_logits, replay_y))
    assert torch.allclose(total, f(logits, y) + 0.3 * f(replay_logits, replay_y))
    no_replay = Step(ModelOutput(logits, z, z))  # warm-up, or no distractor image this step
    assert torch.allclose(step_loss(no_replay, y, DistractorLoss(0.5), cfg)[0], f(logits, y))


def test_nil_loss_with_replay_is_ce_plus_lambda_term_plus_replay_times_the_distractor_images_ce():
    torch.manual_seed(0)
    logits, replay_logits = torch.randn(4, 3), torch.randn(4, 3)
    y, replay_y = torch.tensor([0, 1, 2, 0]), torch.tensor([1, 2, 0, 2])
    z = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    d = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    pairs = Mined(d, torch.ones(4, dtype=torch.bool), torch.arange(4))
    step = Step(ModelOutput(logits, z, z), pairs, ModelOutput(replay_logits, d, d), replay_y)
    criterion = DistractorLoss(2.0)  # every pair of unit vectors is closer than 2: the hinge is active
    f = torch.nn.functional.cross_entropy
    term = criterion(z, d, pairs.valid, labels=y)
    assert term > 0
    total, ce, second = step_loss(step, y, criterion, TrainConfig(loss="nil", lam=0.3, replay=0.1))
    assert torch.allclose(second, term) and torch.allclose(ce, f(logits, y))
    assert torch.allclose(total, f(logits, y) + 0.3 * term + 0.1 * f(replay_logits, replay_y))
    # without --replay the replayed output (if any) adds nothing
    assert torch.allclose(step_loss(step, y, criterion, TrainConfig(loss="nil", lam=0.3))[0], f(logits, y) + 0.3 * term)


def test_replay_beside_the_term_trains_end_to_end_and_is_reported(tmp_path, tiny_npz):
    from nil.report import method_settings

    cfg = TrainConfig(data=str(tiny_npz), out=str(tmp_path / "r"), model="small_cnn", epochs=2, batch_size=32,
                      embed_dim=8, warmup_epochs=0, progress=False, device="cpu", ann="exact", replay=0.1)
    train(cfg)
    lines = [json.loads(s) for s in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train"]["distractor_rate"] > 0.5 and lines[-1]["train"]["loss_distractor"] >= 0.0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert method_settings(config)["replay (weight of the distractor images' CE)"] == 0.1
    assert "replay (weight of the distractor images' CE)" not in method_settings(config | {"replay": 0.0})


@pytest.mark.parametrize("kw, message", [
    (dict(loss="ce-replay", ann="exact", replay=0.1), "--replay adds"),
    (dict(loss="nil", distractor="gradient", replay=0.1), "--replay adds"),
    (dict(loss="nil", ann="exact", fresh_distractors=False, replay=0.1), "drop --stored-distractors"),
    (dict(loss="nil", ann="exact", replay=-1.0), "non-negative"),
])
def test_replay_where_it_cannot_apply_is_refused(kw, message):
    with pytest.raises(NilError, match=message):
        TrainConfig(data="x", out="y", **kw).validate()


def test_fresh_distractors_asked_for_with_the_gradient_source_is_refused_but_the_default_is_not(tmp_path, tiny_npz):
    from click.testing import CliRunner

    from cli.main import main

    common = ["train", "--data", str(tiny_npz), "--out", str(tmp_path / "r"), "--model", "small_cnn",
              "--epochs", "1", "--device", "cpu", "--no-progress", "--distractor", "gradient"]
    refused = CliRunner().invoke(main, common + ["--fresh-distractors"])
    assert refused.exit_code == 2 and "--distractor gradient has none" in refused.output
    assert not (tmp_path / "r").exists()
    TrainConfig(data="x", out="y", distractor="gradient").validate()  # fresh is the default: no refusal


def test_replay_source_in_feature_space_finds_the_nearest_other_class_pooled_features(setup):
    """The replay control searches the normalised pooled features (what its cross-entropy trains)."""
    ds, model, images, x, y, ids = setup
    width = model.classifier.in_features
    miner = DistractorMiner("none", ds.num_classes, width)
    source = SearchedDistractors(miner, images, replay=True, space="features")
    with batch_statistics(model):
        step = source.step(model, x, y, ids, active=True)
    f = torch.nn.functional.normalize(step.out.features.detach(), dim=1)
    d = torch.cdist(f, f).masked_fill(y[:, None] == y[None, :], float("inf"))
    assert torch.equal(step.pairs.ids, ids[d.argmin(1)])
    with pytest.raises(ValueError, match="space"):
        SearchedDistractors(miner, images, space="logits")


def test_ce_replay_with_a_saved_index_is_refused():
    with pytest.raises(NilError, match="ce-replay searches pooled features"):
        TrainConfig(data="x", out="y", loss="ce-replay", index_from="idx", ann="exact").validate()


# ------------------------------------------------------------------ --term-space features
def test_the_term_in_feature_space_measures_the_normalised_pooled_features():
    """step_loss's term compares normalise(f) with the distractor, not z; the head stays in the graph."""
    torch.manual_seed(0)
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    z = torch.nn.functional.normalize(torch.randn(4, 8), dim=1).requires_grad_(True)
    f = torch.randn(4, 16).relu().requires_grad_(True)
    d = torch.nn.functional.normalize(torch.rand(4, 16), dim=1)
    pairs = Mined(d, torch.ones(4, dtype=torch.bool), torch.arange(4))
    criterion = DistractorLoss(2.0)
    _, _, second = step_loss(Step(ModelOutput(logits, z, f), pairs), y, criterion,
                             TrainConfig(loss="nil", term_space="features"))
    expected = criterion(torch.nn.functional.normalize(f, dim=1), d, pairs.valid)
    assert torch.allclose(second, expected) and second > 0
    second.backward()
    assert f.grad is not None and f.grad.abs().sum() > 0
    assert z.grad is not None and torch.count_nonzero(z.grad) == 0  # in the graph, pushed nowhere


@pytest.mark.parametrize("fresh", [True, False])
def test_a_feature_space_memory_holds_and_returns_normalised_pooled_features(setup, fresh):
    ds, model, images, x, y, ids = setup
    width = model.classifier.in_features
    miner = DistractorMiner("exact", ds.num_classes, width)
    source = SearchedDistractors(miner, images if fresh else None, space="features")
    with batch_statistics(model):
        first = source.step(model, x, y, ids, active=True)
    source.update(first, y, ids)
    with batch_statistics(model):
        step = source.step(model, x, y, ids, active=True)
    f = torch.nn.functional.normalize(step.out.features.detach(), dim=1)
    assert step.pairs.distractor.shape == (len(y), width)
    assert torch.allclose(step.pairs.distractor.norm(dim=1), torch.ones(len(y)), atol=1e-5)
    d = torch.cdist(f, f).masked_fill(y[:, None] == y[None, :], float("inf"))
    assert torch.equal(step.pairs.ids, ids[d.argmin(1)])  # the memory holds this very batch
    if fresh:  # each distractor is in the batch: its vector is the batch's own, with grad
        assert step.pairs.distractor.requires_grad
        assert torch.allclose(step.pairs.distractor.detach(), f[d.argmin(1)], atol=1e-6)


def test_the_gradient_distractor_in_feature_space_is_the_normalised_moved_features(setup):
    ds, model, images, x, y, ids = setup
    with batch_statistics(model):
        step = GradientDistractors(0.5, "features").step(model, x, y, ids, active=True)
    v = step.pairs.distractor
    assert v.shape == step.out.features.shape and not v.requires_grad
    assert torch.allclose(v.norm(dim=1), torch.ones(len(y)), atol=1e-5)
    f = torch.nn.functional.normalize(step.out.features.detach().float(), dim=1)
    gap = (v - f).norm(dim=1)
    assert bool((gap > 1e-4).all()) and bool((gap < 0.5).all())  # moved by at most atan(0.5) of arc


@pytest.mark.parametrize("kw", [
    dict(ann="exact", fresh_distractors=True),
    dict(ann="faiss", ann_index="flat", fresh_distractors=True),
    dict(ann="exact", fresh_distractors=False),
    dict(distractor="gradient"),
])
def test_feature_space_runs_train_end_to_end_and_the_report_says_so(tmp_path, tiny_npz, kw):
    from nil.report import method_settings

    cfg = TrainConfig(data=str(tiny_npz), out=str(tmp_path / "r"), model="small_cnn", epochs=2, batch_size=32,
                      embed_dim=8, progress=False, device="cpu", term_space="features", margin=1.0, **kw)
    train(cfg)
    lines = [json.loads(s) for s in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["train"]["distractor_rate"] > 0.5 and lines[-1]["train"]["loss_distractor"] > 0.0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["term_space"] == "features"
    assert method_settings(config)["term measured in"] == "pooled features (L2-normalised)"
    assert method_settings(config | {"term_space": "z"})["term measured in"] == "z (projection head)"


@pytest.mark.parametrize("kw, message", [
    (dict(loss="ce"), "--term-space says"),
    (dict(loss="ce-replay", ann="exact"), "--term-space says"),
    (dict(loss="nil", ann="exact", index_from="idx"), "drop --index-from"),
])
def test_feature_space_where_it_cannot_apply_is_refused(kw, message):
    with pytest.raises(NilError, match=message):
        TrainConfig(data="x", out="y", term_space="features", **kw).validate()
