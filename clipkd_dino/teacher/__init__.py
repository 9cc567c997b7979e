"""The frozen teacher's pass over the training data: pseudo-labels, class means and an embedding cache."""

from clipkd_dino.teacher.cache import TeacherCache
from clipkd_dino.teacher.class_means import ClassMeans, load_class_means
from clipkd_dino.teacher.labels import Labels, load_labels

__all__ = ["ClassMeans", "Labels", "TeacherCache", "load_class_means", "load_labels"]
