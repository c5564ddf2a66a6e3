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
