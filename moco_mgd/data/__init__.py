"""Data: the datasets (image folders, Fashion-MNIST, held-out splits), MoCo's augmentations and the resumable sampling."""
from moco_mgd.data.datasets import (DATASETS, FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, VAL_HOLDOUT_HELP,
                                    VAL_HOLDOUT_SEED, FashionMNIST, ImageFolderDataset, PartOfTrain, build_dataset,
                                    check_same_classes, evaluated_on, find_fashion_mnist, holdout_split,
                                    random_subset)
from moco_mgd.data.sampling import ResumableSampler, SeededSamples, WithBagMember, sample_seed
from moco_mgd.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, GaussianBlur, TwoCropsTransform, blur_sigma,
                                      eval_transform, pretrain_transform)

__all__ = ["DATASETS", "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "VAL_HOLDOUT_HELP", "VAL_HOLDOUT_SEED",
           "FashionMNIST", "ImageFolderDataset", "PartOfTrain", "build_dataset", "check_same_classes",
           "evaluated_on", "find_fashion_mnist", "holdout_split", "random_subset", "ResumableSampler",
           "SeededSamples", "WithBagMember", "sample_seed", "IMAGENET_MEAN", "IMAGENET_STD", "GaussianBlur", "TwoCropsTransform",
           "blur_sigma", "eval_transform", "pretrain_transform"]
