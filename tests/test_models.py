import pytest
import torch

from pipeline.models import MODELS, build_model, load_checkpoint, save_checkpoint
from pipeline.models.torchvision_nets import PretrainedWeightsMissing


@pytest.mark.parametrize("arch", MODELS.names())
def test_every_model_builds_and_has_a_cam_layer(arch):
    m = build_model(arch, 7).eval()
    with torch.no_grad():
        out = m(torch.rand(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert isinstance(m.cam_module(), torch.nn.Module)


def test_registry_lists_the_paper_models():
    assert {"smallcnn", "resnet18", "resnet18_tv", "wrn34_10", "resnet50", "densenet121"} <= set(MODELS.names())


def test_the_two_resnet18s_differ_by_their_stem():
    """resnet18: the baselines' CIFAR variant (3×3 stem); resnet18_tv: torchvision's (7×7 stride 2, max-pool)."""
    cifar, tv = build_model("resnet18", 10).net, build_model("resnet18_tv", 10).net
    assert cifar.conv1.kernel_size == (3, 3) and cifar.conv1.stride == (1, 1)
    assert tv.conv1.kernel_size == (7, 7) and tv.conv1.stride == (2, 2) and hasattr(tv, "maxpool")
    assert tv.fc.out_features == 10


def test_wide_resnet_is_initialised_as_trades():
    """TRADES models/wideresnet.py: conv weights N(0, 2/(k·k·out)), batch norm (1, 0), classifier bias 0."""
    from pipeline.models.cifar_nets import WideResNet

    torch.manual_seed(0)
    net = WideResNet(10, depth=10, widen=4)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        k, out = conv.kernel_size[0] * conv.kernel_size[1], conv.out_channels
        want = (2 / (k * out)) ** 0.5
        assert float(conv.weight.detach().std()) == pytest.approx(want, rel=0.15)  # default: 1/√(3·fan_in), ~0.4 of it
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(bool((b.weight == 1).all()) and bool((b.bias == 0).all()) for b in bns)
    assert bool((net.fc.bias == 0).all())


def test_pretrained_weights_fail_clearly_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PretrainedWeightsMissing) as err:
        build_model("resnet50", 200, pretrained=True)
    msg = str(err.value)
    assert str(tmp_path) in msg and "download.pytorch.org" in msg and "pretrained: false" in msg
    with pytest.raises(ValueError, match="pretrained"):
        build_model("resnet18", 10, pretrained=True)


def test_pretrained_weights_load_from_the_local_cache(tmp_path, monkeypatch):
    import torchvision.models as tvm

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = tvm.resnet50(weights=None)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet50-0676ba61.pth")
    m = build_model("resnet50", 5, pretrained=True)
    assert torch.equal(m.net.conv1.weight, ref.conv1.weight)
    assert m.net.fc.out_features == 5


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    m = build_model("smallcnn", 10, mean=(0.1, 0.2, 0.3), std=(0.5, 0.5, 0.5))
    meta = {"arch": "smallcnn", "num_classes": 10, "mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5],
            "image_shape": [3, 16, 16], "params": {"eps": 0.1}}
    save_checkpoint(tmp_path / "m.pt", m, meta)
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    assert blob["meta"]["params"]["eps"] == 0.1
    m2, meta2 = load_checkpoint(tmp_path / "m.pt")
    x = torch.rand(3, 3, 16, 16)
    m.eval()
    assert torch.allclose(m(x), m2(x))
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_checkpoint_bytes_depend_on_values_not_on_object_identity(tmp_path):
    """A resumed run's history is read back from disk (new string objects): same values, same bytes."""
    import hashlib
    import json

    import torch

    from pipeline.models import save_checkpoint

    net = torch.nn.Linear(2, 2)
    history = [{"epoch": 1, "lr": 0.05}, {"epoch": 2, "lr": 0.05}]
    reread = [json.loads(json.dumps(history[0])), {"epoch": 2, "lr": 0.05}]
    digests = []
    for i, h in enumerate((history, reread)):
        (tmp_path / str(i)).mkdir()
        save_checkpoint(tmp_path / str(i) / "model.pt", net, {"arch": "x", "summary": {"history": h}})
        digests.append(hashlib.sha256((tmp_path / str(i) / "model.pt").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
