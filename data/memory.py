"""An image dataset held whole in memory as one tensor (Fashion-MNIST, synthetic).

Images stay in their compact storage dtype (uint8 for Fashion-MNIST: 47 MB instead of 188 MB as
float) and are converted, normalised and augmented one sample at a time in ``__getitem__``.

Augmentation draws from torch's global RNG, like torchvision's transforms: in the main process it
follows ``torch.manual_seed``, and in DataLoader workers each worker's RNG is seeded from the
loader's generator, so a seeded run sees the same crops and flips every time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class TensorImageDataset(Dataset):
    """``images`` (N x C x H x W) and ``labels`` (N,) as ``(normalised float image, int label)``.

    ``scale`` maps stored values to [0, 1] before normalising (1/255 for uint8). ``crop_padding``
    > 0 enables training augmentation: a random crop of the original size from the image padded
    with zeros (black, the background of Fashion-MNIST) plus a random horizontal flip.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: float | list[float],
                 std: float | list[float], scale: float = 1.0, crop_padding: int = 0,
                 classes: list[str] | None = None) -> None:
        if images.dim() != 4 or labels.dim() != 1 or len(images) != len(labels):
            raise ValueError(f"images {tuple(images.shape)} and labels {tuple(labels.shape)} do not match")
        self.images = images
        self.labels = labels
        channels = images.shape[1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32).expand(channels).reshape(channels, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).expand(channels).reshape(channels, 1, 1)
        self.scale = scale
        self.crop_padding = crop_padding
        self.classes = classes if classes is not None else [str(i) for i in range(int(labels.max()) + 1)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index].to(torch.float32)
        if self.crop_padding:
            image = self._augment(image)
        image = (image * self.scale - self.mean) / self.std
        return image, int(self.labels[index])

    def _augment(self, image: torch.Tensor) -> torch.Tensor:
        pad = self.crop_padding
        _, height, width = image.shape
        padded = F.pad(image, (pad, pad, pad, pad))
        top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        image = padded[:, top:top + height, left:left + width]
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        return image
