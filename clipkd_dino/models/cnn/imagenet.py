"""ImageNet classifiers by torchvision ("tv:NAME") or timm ("timm:NAME") name, built without weights (offline).

Both wrap the library's network as `net`, so its own state dicts load into `net` unchanged (see `weights.py`).

- timm: `forward_intermediates` gives the stage maps (every `feature_info` level: stem, then each stage) and
  `forward_head(pre_logits=True)` the pooled feature; "preact_stages" equals "stages".
- torchvision: forward hooks record the stage maps and the input of the final Linear ("pooled"). The stages are
  found once, when the model is built, by a probe forward pass at 224 px: the last module at each spatial size
  among the top-level modules (the head's adaptive pooling left out), with the `features` / `layers` /
  `trunk_output` containers opened up, in execution order. For ResNets that is the stem ReLU, then layer1 ...
  layer4, as in mdistiller's ImageNet ResNets, and "preact_stages" are the true pre-ReLU maps (the stem's BN
  output, each stage's last residual sum); for the other families they equal "stages". Transformers without
  spatial maps (ViT, Swin, MaxViT) report no stages: use timm for their intermediates.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from clipkd_dino.errors import ConfigError
from clipkd_dino.models.cnn.base import Classifier, ClassifierOutput, classifier_output

PROBE_SIZE = 224
BODY_CONTAINERS = ("features", "layers", "trunk_output")
NO_AUX_LOGITS = ("googlenet", "inception_v3")


class TimmClassifier(Classifier):
    """A timm model; "stages" are its `forward_intermediates` maps."""

    def __init__(self, name: str, num_classes: int):
        super().__init__()
        import timm

        if not timm.is_model(name):
            raise ConfigError(f"unknown timm model {name!r} (see timm.list_models())")
        self.net = timm.create_model(name, pretrained=False, num_classes=num_classes)
        if not hasattr(self.net, "forward_intermediates"):
            raise ConfigError(f"timm model {name!r} has no forward_intermediates, so no stage features")
        self.feature_dim = self.net.get_classifier().in_features
        self.stage_channels = [info["num_chs"] for info in self.net.feature_info]

    def forward(self, x: Tensor) -> ClassifierOutput:
        final, stages = self.net.forward_intermediates(x)
        pooled = self.net.forward_head(final, pre_logits=True)
        return classifier_output(self.net.get_classifier()(pooled), pooled, stages)


class TorchvisionClassifier(Classifier):
    """A torchvision classification model; hooks record the stage maps and the final Linear's input."""

    def __init__(self, name: str, num_classes: int):
        super().__init__()
        import torchvision.models as tvm

        name = name.lower()
        if name not in tvm.list_models(module=tvm):
            raise ConfigError(f"unknown torchvision classification model {name!r} "
                              f"(known: {', '.join(tvm.list_models(module=tvm))})")
        extra = {"aux_logits": False} if name in NO_AUX_LOGITS else {}
        self.net = tvm.get_model(name, weights=None, num_classes=num_classes, **extra)
        head = [m for m in self.net.modules() if isinstance(m, nn.Linear)]
        if not head:
            raise ConfigError(f"torchvision model {name!r} has no final Linear layer, so no pooled feature")
        self.feature_dim = head[-1].in_features
        self._captured: dict[str, Tensor] | None = None  # a dict only while `forward` runs
        head[-1].register_forward_pre_hook(partial(self._keep_input, "pooled"))
        spatial = not isinstance(self.net, (tvm.VisionTransformer, tvm.SwinTransformer, tvm.MaxVit))
        shapes = probe_stages(self.net) if spatial else {}
        self._stage_names = list(shapes)
        self.stage_channels = [shape[1] for shape in shapes.values()]
        for stage in self._stage_names:
            self.net.get_submodule(stage).register_forward_hook(partial(self._keep_output, stage))
        if isinstance(self.net, tvm.ResNet):
            self._hook_resnet_preacts()

    def _keep_output(self, key: str, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self._captured is not None:
            self._captured[key] = output

    def _keep_input(self, key: str, module: nn.Module, args: tuple) -> None:
        if self._captured is not None:
            self._captured[key] = args[0]

    def _hook_resnet_preacts(self) -> None:
        """Record the stem's BN output and each stage's last residual sum (the input of the block's last ReLU
        call); the ReLUs involved are made out-of-place so the recorded tensors keep their pre-ReLU values."""
        net = self.net
        net.relu.inplace = False
        net.bn1.register_forward_hook(partial(self._keep_output, "preact:relu"))
        for stage in ("layer1", "layer2", "layer3", "layer4"):
            last_relu = net.get_submodule(stage)[-1].relu
            last_relu.inplace = False
            last_relu.register_forward_pre_hook(partial(self._keep_input, f"preact:{stage}"))

    def forward(self, x: Tensor) -> ClassifierOutput:
        self._captured = captured = {}
        try:
            logits = self.net(x)
        finally:
            self._captured = None
        stages = [captured[name] for name in self._stage_names]
        preacts = [captured.get(f"preact:{name}", captured[name]) for name in self._stage_names]
        return classifier_output(logits, captured["pooled"], stages, preacts)


def body_modules(net: nn.Module) -> dict[str, nn.Module]:
    """Top-level modules by name, with the body containers (`features`, ...) replaced by their children and the
    head's adaptive pooling left out (it resizes rather than computes a stage)."""
    modules = {}
    for name, child in net.named_children():
        if isinstance(child, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
            continue
        if name in BODY_CONTAINERS and isinstance(child, nn.Sequential):
            modules.update({f"{name}.{sub}": grandchild for sub, grandchild in child.named_children()})
        else:
            modules[name] = child
    return modules


@torch.no_grad()
def probe_stages(net: nn.Module) -> dict[str, torch.Size]:
    """{module name: output shape} of the last module at each spatial size (larger than 1x1) of a probe pass."""
    calls: list[tuple[str, torch.Size]] = []
    handles = [module.register_forward_hook(
        lambda m, a, out, name=name: calls.append((name, out.shape)) if isinstance(out, Tensor) else None)
        for name, module in body_modules(net).items()]
    was_training = net.training
    try:
        net.eval()
        net(torch.zeros(1, 3, PROBE_SIZE, PROBE_SIZE))
    finally:
        net.train(was_training)
        for handle in handles:
            handle.remove()
    maps = [(name, shape) for name, shape in calls if len(shape) == 4 and shape[-2:] != (1, 1)]
    return {name: shape for i, (name, shape) in enumerate(maps)
            if i + 1 == len(maps) or maps[i + 1][1][-2:] != shape[-2:]}
