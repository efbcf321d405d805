"""Datasets and loaders: CIFAR-100, synthetic, STL-10, Tiny-ImageNet and ImageNet readers; device-resident augmentation."""

from dkd_tune.data.batch import Batch
from dkd_tune.data.coco import CocoData
from dkd_tune.data.dataset import ImageDataset
from dkd_tune.data.device_loader import DeviceAugmentLoader, EvalLoader
from dkd_tune.data.imagenet import imagenet_loaders
from dkd_tune.data.label_noise import symmetric_label_noise
from dkd_tune.data.sources import ImageFolderData, InMemoryData
from dkd_tune.data.spec import DataSpec, parse_data_spec
from dkd_tune.data.splits import (
    dataset_num_classes,
    dataset_problem,
    load_coco_data,
    load_splits,
    load_train_test,
)
from dkd_tune.data.stl10 import load_stl10
from dkd_tune.data.synthetic import make_synthetic
from dkd_tune.data.tiny_imagenet import load_tiny_imagenet
from dkd_tune.data.train_loader import build_train_loader
from dkd_tune.data.views import normalize, render_views
from dkd_tune.data.worker_loader import WorkerAugmentLoader

__all__ = [
    "Batch",
    "CocoData",
    "DataSpec",
    "DeviceAugmentLoader",
    "EvalLoader",
    "ImageDataset",
    "ImageFolderData",
    "InMemoryData",
    "WorkerAugmentLoader",
    "build_train_loader",
    "dataset_num_classes",
    "dataset_problem",
    "imagenet_loaders",
    "load_coco_data",
    "load_splits",
    "load_stl10",
    "load_tiny_imagenet",
    "load_train_test",
    "make_synthetic",
    "normalize",
    "parse_data_spec",
    "render_views",
    "symmetric_label_noise",
]
