import math

import pytest
import torch

from nil.losses import DistractorLoss, balanced_class_weights


def test_margin_loss_matches_hand_computation():
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    d = torch.tensor([[0.8, 0.6], [0.0, -1.0], [1.0, 0.0]])
    valid = torch.tensor([True, True, False])
    # ||z0 - d0|| = sqrt(0.04 + 0.36); ||z1 - d1|| = 2 > margin: zero; sample 2 has no distractor
    expected = (1.0 - math.sqrt(0.4)) ** 2 / 2
    loss = DistractorLoss(margin=1.0)(z, d, valid)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_balanced_class_weights_are_inverse_frequency_with_mean_one_per_sample():
    labels = torch.tensor([0, 0, 0, 1])  # class 2 has no sample: weight 1, nothing to rebalance
    w = balanced_class_weights(labels, 3)
    assert w.tolist() == pytest.approx([4 / 9, 4 / 3, 1.0])
    assert w[labels].mean().item() == pytest.approx(4 / 9 * 3 / 4 + 4 / 3 / 4)


def test_class_weights_scale_each_samples_term_and_the_count_divides():
    z = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    d = torch.tensor([[0.8, 0.6], [0.8, 0.6], [0.0, 0.9]])
    valid, labels = torch.tensor([True, True, True]), torch.tensor([0, 0, 1])
    plain = DistractorLoss(margin=1.0)(z, d, valid)
    terms = torch.tensor([(1.0 - math.sqrt(0.4)) ** 2] * 2 + [0.9 ** 2])
    assert plain.item() == pytest.approx(terms.mean().item(), rel=1e-5)
    weighted = DistractorLoss(margin=1.0, class_weight=torch.tensor([0.5, 2.0]))
    loss = weighted(z, d, valid, labels=labels)
    assert loss.item() == pytest.approx(((terms * torch.tensor([0.5, 0.5, 2.0])).sum() / 3).item(), rel=1e-5)
    plain_grad = torch.autograd.grad(plain, z)[0]
    loss.backward()
    assert z.grad == pytest.approx(plain_grad * torch.tensor([[0.5], [0.5], [2.0]]), rel=1e-5)  # each row x its weight
    with pytest.raises(ValueError, match="needs the batch's labels"):
        weighted(z, d, valid)


def test_margin_loss_gradient_pushes_away_from_distractor():
    z = torch.tensor([[1.0, 0.0]], requires_grad=True)
    d = torch.tensor([[0.9, 0.0]])
    DistractorLoss(margin=0.5)(z, d, torch.tensor([True])).backward()
    # L = (0.5 - (z_x - 0.9))^2 -> dL/dz_x = -2 * (0.5 - 0.1) = -0.8: gradient descent raises z_x
    assert z.grad[0, 0].item() == pytest.approx(-0.8, rel=1e-4)
    assert z.grad[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_no_valid_distractor_gives_zero_with_graph():
    z = torch.randn(4, 8, requires_grad=True)
    loss = DistractorLoss()(z, torch.zeros(4, 8), torch.zeros(4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(z.grad == 0)


def test_zero_distance_has_finite_gradient():
    z = torch.tensor([[0.6, 0.8]], requires_grad=True)
    DistractorLoss(margin=0.5)(z, z.detach().clone(), torch.tensor([True])).backward()
    assert torch.isfinite(z.grad).all()


def test_triplet_loss_matches_hand_computation():
    z = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    pos = torch.tensor([[0.3, 0.4], [1.0, 0.0]])  # distances 0.5 and 1.0
    neg = torch.tensor([[0.6, 0.8], [0.0, 3.0]])  # distances 1.0 and 3.0
    valid = torch.tensor([True, True])
    loss = DistractorLoss(margin=0.7, variant="triplet")(z, neg, valid, pos, torch.tensor([True, True]))
    # max(0, 0.5 - 1.0 + 0.7) = 0.2 ; max(0, 1.0 - 3.0 + 0.7) = 0
    assert loss.item() == pytest.approx(0.1, rel=1e-4)
    only_first = DistractorLoss(margin=0.7, variant="triplet")(z, neg, valid, pos, torch.tensor([True, False]))
    assert only_first.item() == pytest.approx(0.2, rel=1e-4)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant"):
        DistractorLoss(variant="cosine")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gradient_distractor_moves_features_toward_the_most_confusing_class(precision):
    from nil.mining import gradient_distractor
    from nil.models import build_model
    from nil.predict import autocast

    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 3, 16, 8, None).eval()
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    with autocast(torch.device("cpu"), precision):  # the trainer's forward; features may be bf16
        out = model(x)
    mined = gradient_distractor(model, out.features, out.logits, y, step=0.5)
    assert mined.distractor.dtype == torch.float32 and mined.valid.all()
    assert torch.allclose(mined.distractor.norm(dim=1), torch.ones(6), atol=1e-4)  # an embedding on the sphere
    # the step raises the most confusing other class's logit, which is what makes it a distractor
    logits = out.logits.detach().float().clone()
    logits.scatter_(1, y[:, None], float("-inf"))
    c = logits.argmax(1)
    f = out.features.detach().float()
    g = torch.autograd.functional.jacobian(lambda v: model.classifier(v).gather(1, c[:, None]).sum(), f)
    moved = f + 0.5 * f.norm(dim=1, keepdim=True) * torch.nn.functional.normalize(g, dim=1)
    with torch.no_grad():
        assert (model.classifier(moved).gather(1, c[:, None]) > model.classifier(f).gather(1, c[:, None])).all()
        assert torch.allclose(model.heads(moved).z, mined.distractor, atol=1e-5)
