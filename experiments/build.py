"""What a spec describes, built: datasets, loaders, the model, and its layer plan.

Training and AdaPrune both start here, so a spec means the same model, data and sparse layers to
each. Seeding is the caller's (training also seeds Python's `random`), and so is loading weights.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..data import DatasetInfo, build_datasets, build_loaders
from ..sparsity import Pattern
from .layers import LayerPlan, called_layers, plan_layers
from .models import build_model
from .spec import Spec


@dataclass
class Built:
    train_ds: Dataset
    test_ds: Dataset
    info: DatasetInfo           # num_classes, in_channels, image_size
    train_loader: DataLoader
    test_loader: DataLoader
    model: nn.Module            # freshly initialised, on the CPU


def build(spec: Spec, augment: bool, holdout: int | None, rank: int = 0, world: int = 1) -> Built:
    """The spec's datasets (``augment``: training's augmentation; ``holdout``: train samples held out
    for evaluation), their loaders (rank ``rank`` of ``world``) and a new model for their images."""
    train_ds, test_ds, info = build_datasets(spec.data.dataset, root=spec.data.root, augment=augment,
                                             train_subset=spec.data.train_subset, test_subset=spec.data.test_subset,
                                             download=spec.data.download, seed=spec.seed, holdout=holdout,
                                             **spec.data.options())
    train_loader, test_loader = build_loaders(train_ds, test_ds, batch_size=spec.data.batch_size, seed=spec.seed,
                                              num_workers=spec.data.num_workers,
                                              eval_batch_size=spec.data.eval_batch_size, rank=rank, world=world)
    model = build_model(spec.model.name, num_classes=info.num_classes, in_channels=info.in_channels,
                        image_size=info.image_size, width=spec.model.width)
    return Built(train_ds, test_ds, info, train_loader, test_loader, model)


def layer_plan(spec: Spec, built: Built, pattern: Pattern, device: torch.device) -> LayerPlan:
    """The sparse layers of ``built.model`` (already on ``device``) for ``pattern`` by the spec's sparsity
    section; a layer whose forward does not run on one image is never sparse (see `called_layers`)."""
    info, sparsity = built.info, spec.sparsity
    called = called_layers(built.model, torch.zeros(1, info.in_channels, info.image_size, info.image_size,
                                                    device=device))
    return plan_layers(built.model, pattern, sparsity.layout, sparsity.include, sparsity.exclude,
                       sparsity.keep_first_dense, sparsity.keep_last_dense, called)
