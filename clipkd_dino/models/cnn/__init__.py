"""The CNN zoo of the classification mode: CIFAR models that load the CRD / mdistiller teacher checkpoints,
and torchvision / timm ImageNet models. Each returns {"logits", "pooled", "stages", "preact_stages"}."""

from clipkd_dino.models.cnn.base import Classifier, ClassifierOutput
from clipkd_dino.models.cnn.registry import CLASSIFIER_NAMES, check_classifier_name, create_classifier
from clipkd_dino.models.cnn.weights import load_classifier_weights

__all__ = ["CLASSIFIER_NAMES", "Classifier", "ClassifierOutput", "check_classifier_name", "create_classifier",
           "load_classifier_weights"]
