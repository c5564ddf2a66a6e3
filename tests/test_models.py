import pytest
import torch

from nil.errors import NilError
from nil.models import MODELS, build_model


@pytest.mark.parametrize("name", MODELS)
def test_models_give_logits_and_unit_embeddings_on_28px(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=5, in_channels=3, image_size=28, embed_dim=16).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 28, 28))
    assert out.logits.shape == (2, 5)
    assert out.z.shape == (2, 16)
    assert torch.allclose(out.z.norm(dim=1), torch.ones(2), atol=1e-5)


def test_small_inputs_adapt_the_resnet_stem():
    small = build_model("resnet18", 2, 1, image_size=28)
    large = build_model("resnet18", 2, 1, image_size=224)
    assert small.backbone.conv1.kernel_size == (3, 3) and small.backbone.conv1.stride == (1, 1)
    assert isinstance(small.backbone.maxpool, torch.nn.Identity)
    assert large.backbone.conv1.kernel_size == (7, 7) and large.backbone.conv1.in_channels == 1


def test_weights_round_trip_and_errors(tmp_path):
    a = build_model("small_cnn", 3, 3, 28)
    torch.save(a.state_dict(), tmp_path / "w.pt")
    b = build_model("small_cnn", 3, 3, 28, weights=tmp_path / "w.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    with pytest.raises(NilError, match="does not exist"):
        build_model("small_cnn", 3, 3, 28, weights=tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(NilError, match="cannot read"):
        build_model("small_cnn", 3, 3, 28, weights=tmp_path / "junk.pt")
    with pytest.raises(NilError, match="unknown model"):
        build_model("vgg", 3)


def _imagenet_like_state(name):
    """A state dict shaped like torchvision's published weights of ``name`` (random, written here)."""
    import torchvision

    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None).state_dict()


def test_pretrained_loads_the_published_weights_through_torchvision(monkeypatch):
    import torchvision

    state = _imagenet_like_state("resnet18")
    calls = []

    def fake_get_state_dict(self, *args, **kwargs):
        calls.append(self)
        return state

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_get_state_dict)
    model = build_model("resnet18", 2, in_channels=3, image_size=224, pretrained=True)
    assert calls and calls[0] is torchvision.models.ResNet18_Weights.DEFAULT  # the weights API, its own cache
    assert torch.equal(model.backbone.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])  # 224 px: the stem is kept
    small = build_model("resnet18", 2, in_channels=1, image_size=28, pretrained=True)  # adapted stem stays random
    assert small.backbone.conv1.weight.shape == (64, 1, 3, 3)
    assert torch.equal(small.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_pretrained_offline_is_one_sentence_naming_the_cache_and_the_alternative(monkeypatch):
    import urllib.error

    import torchvision

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(NilError) as err:
        build_model("densenet121", 2, pretrained=True)
    text = str(err.value)
    assert "densenet121" in text and "checkpoints" in text and "--weights PATH" in text
    assert "densenet121-" in text  # the file to pre-fill the cache with
    with pytest.raises(NilError, match="no published weights"):
        build_model("small_cnn", 2, pretrained=True)


def test_pretrained_runs_normalise_with_imagenet_statistics_and_record_them(tmp_path, tiny_npz, monkeypatch):
    import json

    import torchvision

    from nil.config import TrainConfig
    from nil.evaluate import evaluate_checkpoint
    from nil.models import normalization
    from nil.train import train

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict",
                        lambda self, *a, **k: _imagenet_like_state("resnet18"))
    cfg = TrainConfig(data=str(tiny_npz), out=str(tmp_path / "run"), model="resnet18", pretrained=True, epochs=1,
                      batch_size=32, embed_dim=8, ann="none", device="cpu", progress=False)
    result = train(cfg)
    ckpt = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    channels = ckpt["model_spec"]["in_channels"]
    assert ckpt["model_spec"]["normalize"] == {"kind": "imagenet", **normalization("imagenet", channels)}
    assert json.loads((tmp_path / "run" / "config.json").read_text())["pretrained"] is True
    again = evaluate_checkpoint(tmp_path / "run" / "best.pt", device="cpu")  # evaluation uses the recorded statistics
    assert again["accuracy"] == pytest.approx(result["test"]["accuracy"])
