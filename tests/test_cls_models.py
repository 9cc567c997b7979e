"""The classification-mode CNN zoo: shapes, reference key names, checkpoint loading, torchvision / timm models."""

from __future__ import annotations

import argparse
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clipkd_dino.errors import ConfigError, UserError
from clipkd_dino.models.cnn import CLASSIFIER_NAMES, create_classifier, load_classifier_weights
from clipkd_dino.models.cnn.registry import ALIASES, CIFAR_CLASSIFIERS
from test_teacher_models import _cache_file, hub  # noqa: F401  (the fixture: an offline Hugging Face cache)

CIFAR_NAMES = list(CIFAR_CLASSIFIERS)

# (key, shape) pairs and state-dict sizes read from the CRD / mdistiller model definitions (100 classes)
REFERENCE_KEYS = {
    "resnet8x4": (62, [("conv1.weight", (32, 3, 3, 3)), ("layer1.0.downsample.0.weight", (64, 32, 1, 1)),
                       ("layer3.0.downsample.0.weight", (256, 128, 1, 1)), ("fc.weight", (100, 256))]),
    "resnet56": (344, [("layer1.1.conv1.weight", (16, 16, 3, 3)), ("layer3.8.bn2.running_var", (64,))]),
    "wrn_40_2": (227, [("block1.layer.0.convShortcut.weight", (32, 16, 1, 1)),
                       ("block2.layer.0.convShortcut.weight", (64, 32, 1, 1)),
                       ("block3.layer.5.conv2.weight", (128, 128, 3, 3)), ("bn1.running_mean", (128,)),
                       ("fc.weight", (100, 128))]),
    "ShuffleV1": (296, [("conv1.weight", (24, 3, 1, 1)), ("layer1.0.conv1.weight", (54, 24, 1, 1)),
                        ("layer1.0.conv3.weight", (216, 18, 1, 1)), ("layer2.0.conv1.weight", (60, 80, 1, 1)),
                        ("layer3.3.bn3.weight", (960,)), ("linear.weight", (100, 960))]),
    "ShuffleV2": (338, [("layer1.0.conv1.weight", (24, 1, 3, 3)), ("layer1.0.conv5.weight", (58, 58, 1, 1)),
                        ("layer2.7.conv3.weight", (116, 116, 1, 1)), ("conv2.weight", (1024, 464, 1, 1)),
                        ("linear.weight", (100, 1024))]),
    "MobileNetV2": (320, [("conv1.0.weight", (16, 3, 3, 3)), ("blocks.1.0.conv.6.weight", (12, 48, 1, 1)),
                          ("blocks.6.0.conv.6.weight", (160, 480, 1, 1)), ("conv2.0.weight", (1280, 160, 1, 1)),
                          ("classifier.0.weight", (100, 1280))]),
    "vgg13": (72, [("block0.0.weight", (64, 3, 3, 3)), ("block1.3.weight", (128, 128, 3, 3)),
                   ("block4.4.running_var", (512,)), ("classifier.weight", (100, 512))]),
    "ResNet50": (320, [("layer1.0.shortcut.0.weight", (256, 64, 1, 1)), ("layer4.2.conv3.weight", (2048, 512, 1, 1)),
                       ("linear.weight", (100, 2048))]),
}


def final_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@pytest.fixture(scope="module")
def cifar_batch() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", CIFAR_NAMES)
def test_cifar_model_outputs(name, cifar_batch):
    torch.manual_seed(0)
    model = create_classifier(name, 100).eval()
    with torch.no_grad():
        out = model(cifar_batch)
    assert out["logits"].shape == (2, 100)
    assert out["pooled"].shape == (2, model.feature_dim)
    assert [s.shape[1] for s in out["stages"]] == model.stage_channels
    assert [p.shape for p in out["preact_stages"]] == [s.shape for s in out["stages"]]
    assert all(s.dim() == 4 and s.shape[0] == 2 for s in out["stages"])
    # "pooled" is what the final Linear reads
    torch.testing.assert_close(final_linear(model)(out["pooled"]), out["logits"])


@pytest.mark.parametrize("name", ["resnet8", "resnet50_cifar", "vgg8", "shufflev1", "shufflev2"])
def test_preact_stages_are_pre_relu(name, cifar_batch):
    model = create_classifier(name, 10).eval()
    with torch.no_grad():
        out = model(cifar_batch)
    for stage, preact in zip(out["stages"][1:], out["preact_stages"][1:]):
        assert (preact < 0).any()
        torch.testing.assert_close(F.relu(preact), stage)


def test_wrn_preact_is_the_next_batch_norm(cifar_batch):
    model = create_classifier("wrn_16_2", 10).eval()
    with torch.no_grad():
        out = model(cifar_batch)
        torch.testing.assert_close(out["preact_stages"][1], model.block2.layer[0].bn1(out["stages"][1]))
        torch.testing.assert_close(out["preact_stages"][3], model.bn1(out["stages"][3]))


def test_wrn_forward_updates_each_batch_norm_once(cifar_batch):
    model = create_classifier("wrn_16_2", 10).train()
    model(cifar_batch)
    assert model.block2.layer[0].bn1.num_batches_tracked.item() == 1
    assert model.bn1.num_batches_tracked.item() == 1


@pytest.mark.parametrize("name", list(REFERENCE_KEYS))
def test_reference_key_names_and_shapes(name):
    size, pairs = REFERENCE_KEYS[name]
    state = create_classifier(name, 100).state_dict()
    assert len(state) == size
    for key, shape in pairs:
        assert key in state, key
        assert tuple(state[key].shape) == shape, key


def test_names_aliases_and_unknown():
    assert set(ALIASES) <= set(CLASSIFIER_NAMES) and set(CIFAR_NAMES) <= set(CLASSIFIER_NAMES)
    for alias, target in ALIASES.items():
        assert type(create_classifier(alias, 10)) is type(create_classifier(target, 10))
    assert create_classifier("RESNET8", 10).feature_dim == 64
    with pytest.raises(ConfigError, match="resnet8x4") as info:
        create_classifier("resnet9000", 10)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="torchvision"):
        create_classifier("tv:not_a_model", 10)
    with pytest.raises(ConfigError, match="timm"):
        create_classifier("timm:not_a_model", 10)


def crd_checkpoint(model: nn.Module) -> dict:
    """What CRD's train_teacher.py saves: the model, the epoch, the accuracy tensor and the optimizer state."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    model(torch.randn(2, 3, 32, 32))["logits"].sum().backward()
    optimizer.step()
    return {"epoch": 240, "model": model.state_dict(), "accuracy": torch.tensor(72.34), "best_acc": 72.34,
            "optimizer": optimizer.state_dict()}


def test_crd_checkpoint_loads_strictly(tmp_path):
    teacher = create_classifier("resnet8x4", 100)
    path = tmp_path / "ckpt_epoch_240.pth"
    torch.save(crd_checkpoint(teacher), path)
    student = create_classifier("resnet8x4", 100)
    load_classifier_weights(student, path)
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(student.state_dict()[key], value)
    # CRD's *_last.pth also holds the argparse options
    torch.save({"opt": argparse.Namespace(model="resnet8x4", lr=0.05), "model": teacher.state_dict()},
               tmp_path / "resnet8x4_last.pth")
    load_classifier_weights(create_classifier("resnet8x4", 100), tmp_path / "resnet8x4_last.pth")


def test_wrapped_prefixed_and_safetensors_files(tmp_path):
    from safetensors.torch import save_file

    source = create_classifier("wrn_16_2", 10)
    state = source.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pt")
    torch.save(state, tmp_path / "plain.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "weights.safetensors")
    for file in ("ddp.pt", "plain.pt", "weights.safetensors"):
        model = create_classifier("wrn_16_2", 10)
        load_classifier_weights(model, tmp_path / file)
        torch.testing.assert_close(model.fc.weight, source.fc.weight)


def test_mismatched_and_unreadable_files(tmp_path):
    torch.save({"model": create_classifier("resnet8", 100).state_dict()}, tmp_path / "r8.pth")
    with pytest.raises(UserError, match=r"r8\.pth.*missing keys: layer1\.1\.") as info:
        load_classifier_weights(create_classifier("resnet20", 100), tmp_path / "r8.pth")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match=r"r8\.pth.*fc\.weight \(100, 64\) vs \(10, 64\)"):
        load_classifier_weights(create_classifier("resnet8", 10), tmp_path / "r8.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match=r"junk\.pth"):
        load_classifier_weights(create_classifier("resnet8", 10), tmp_path / "junk.pth")
    with pytest.raises(UserError, match=r"absent\.pth"):
        load_classifier_weights(create_classifier("resnet8", 10), tmp_path / "absent.pth")


def test_torchvision_resnet18(tmp_path):
    import torchvision

    model = create_classifier("tv:resnet18", 10).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out["logits"].shape == (2, 10) and out["pooled"].shape == (2, model.feature_dim) == (2, 512)
    # the stem ReLU, then layer1 ... layer4 (mdistiller's ImageNet ResNet "feats")
    assert model.stage_channels == [s.shape[1] for s in out["stages"]] == [64, 64, 128, 256, 512]
    torch.testing.assert_close(model.net.fc(out["pooled"]), out["logits"])
    for stage, preact in zip(out["stages"], out["preact_stages"]):
        torch.testing.assert_close(F.relu(preact), stage)
    # a torchvision state dict loads into the wrapped network; a deep copy records its own features
    reference = torchvision.models.resnet18(num_classes=10)
    torch.save(reference.state_dict(), tmp_path / "resnet18.pth")
    load_classifier_weights(model, tmp_path / "resnet18.pth")
    copied = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(copied(x)["logits"], reference.eval()(x))
        assert len(copied(x)["stages"]) == 5


def test_timm_mobilenetv1(tmp_path):
    import timm

    model = create_classifier("timm:mobilenetv1_100", 10).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert out["logits"].shape == (2, 10) and out["pooled"].shape == (2, model.feature_dim) == (2, 1024)
    assert model.stage_channels == [s.shape[1] for s in out["stages"]] == [64, 128, 256, 512, 1024]
    torch.testing.assert_close(model.net.get_classifier()(out["pooled"]), out["logits"])
    torch.save(timm.create_model("mobilenetv1_100", num_classes=10).state_dict(), tmp_path / "mv1.pth")
    load_classifier_weights(model, tmp_path / "mv1.pth")


def test_library_weights_tags_resolve_offline_from_the_download_caches(hub, tmp_path, monkeypatch):
    """`tv:NAME` teachers take torchvision weights names, `timm:NAME` ones timm pretrained tags: read from
    torch.hub's and the Hugging Face cache offline (laid out here with other weights), a one-line error otherwise."""
    from safetensors.torch import save

    from clipkd_dino.models.cnn.weights import resolve_classifier_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    torch.manual_seed(0)
    source = create_classifier("tv:mobilenet_v3_small", 1000)
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    cached.parent.mkdir(parents=True)
    torch.save(source.net.state_dict(), cached)
    for tag in ("IMAGENET1K_V1", "DEFAULT", "MobileNet_V3_Small_Weights.IMAGENET1K_V1"):
        assert resolve_classifier_weights("tv:mobilenet_v3_small", tag) == cached
    loaded = create_classifier("tv:mobilenet_v3_small", 1000)
    load_classifier_weights(loaded, resolve_classifier_weights("tv:mobilenet_v3_small", "IMAGENET1K_V1"))
    torch.testing.assert_close(loaded.net.state_dict(), source.net.state_dict(), rtol=0, atol=0)
    with pytest.raises(ConfigError, match="nor is it a torchvision weights name of 'mobilenet_v3_small': "
                                          "IMAGENET1K_V1"):
        resolve_classifier_weights("tv:mobilenet_v3_small", "IMAGENET1K_V9")
    with pytest.raises(ConfigError, match=r"weights 'IMAGENET1K_V1' of 'tv:resnet18' are not in the download cache"):
        resolve_classifier_weights("tv:resnet18", "IMAGENET1K_V1")
    with pytest.raises(ConfigError, match=r"weights 'c3_in1k' of 'timm:resnet10t' are not in the download cache"):
        resolve_classifier_weights("timm:resnet10t", "c3_in1k")
    timm_source = create_classifier("timm:resnet10t", 1000)
    snapshot = _cache_file(hub, "timm/resnet10t.c3_in1k", "model.safetensors", save(timm_source.net.state_dict()))
    assert resolve_classifier_weights("timm:resnet10t", "c3_in1k") == snapshot
    with pytest.raises(ConfigError, match="a file; weights tags work for tv:NAME and timm:NAME"):
        resolve_classifier_weights("resnet8x4", "IMAGENET1K_V1")
