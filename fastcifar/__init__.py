"""fastcifar: a fast, reproducible CIFAR-10 trainer for the CNN family of the paper."""

__version__ = "0.1.0"
