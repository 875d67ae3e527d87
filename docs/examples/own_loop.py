"""Train a small CNN of your own on Fashion-MNIST with SR-STE 2:4, in your own training loop.

    python docs/examples/own_loop.py                       # 18 s on 2 idle CPU cores: test accuracy 0.88
    python docs/examples/own_loop.py --epochs 3 --out runs/own-loop

nmtrain appears in three places, each marked "nmtrain:" below: `nmtrain.sparsify` once the optimizer
exists, then `handle.export` and `handle.remove` when training is done (and `nmtrain.masks` checks the
result). The loop between them is a plain PyTorch loop and stays one: SR-STE's per-step work (the
2:4 masks recomputed from |W|, the decay on pruned weights) runs inside `optimizer.step()`, through
hooks. The contract: docs/api.md.

Data: Fashion-MNIST's four IDX files (Debian's `dataset-fashion-mnist` puts them in
/usr/share/datasets/fashion-mnist; `--data DIR` for another copy), read here in a few lines.
"""

import argparse
import gzip
import time

START = time.perf_counter()      # the wall time printed at the end counts the imports too

from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import nmtrain

# ------------------------------------------------------------------------------------------------
# Data: the IDX files as tensors, the whole split in memory (47 MB as float32)


FILES = [f"{split}-{kind}-ubyte.gz" for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]


def read_idx(path: Path) -> np.ndarray:
    """An IDX file: two zero bytes, a type byte (0x08: uint8), the number of dimensions, each size as a
    big-endian int32, then the values."""
    raw = gzip.open(path, "rb").read()
    ndim = raw[3]
    shape = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images as N x 1 x 28 x 28 floats, normalised; labels as int64) of ``split``: "train" or "t10k"."""
    images = torch.from_numpy(read_idx(root / f"{split}-images-idx3-ubyte.gz").copy())
    labels = torch.from_numpy(read_idx(root / f"{split}-labels-idx1-ubyte.gz").astype(np.int64))
    x = (images.float() / 255 - 0.286) / 0.353        # Fashion-MNIST's mean and std
    return x.unsqueeze(1), labels


# ------------------------------------------------------------------------------------------------
# The model: ours, not nmtrain's. nmtrain chooses the layers by its usual rule: every Conv2d and Linear
# but the first and the last, as long as groups of 4 fit (a Linear's in_features, a Conv2d's C_in: the
# weights of 4 consecutive input channels at one kernel tap form a group, as in cuDNN's layout).


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)      # first layer: stays dense (1 channel could not hold 2:4)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)     # 2:4
        self.fc1 = nn.Linear(32 * 7 * 7, 128)            # 2:4: most of the weights
        self.fc2 = nn.Linear(128, 10)                    # the classifier: stays dense

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    """Test accuracy. In eval mode and without gradients no step begins: evaluating never moves the method."""
    model.eval()
    correct = sum(int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(x), batch))
    model.train()
    return correct / len(x)


# ------------------------------------------------------------------------------------------------
# The loop: a plain PyTorch loop; nothing in it knows about nmtrain.


def train(model, optimizer, scheduler, data, epochs: int, batch: int) -> None:
    x_train, y_train, x_test, y_test = data
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(x_train))
        for i in range(len(x_train) // batch):                  # the last, partial batch is dropped
            idx = order[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])   # the step's 1st training forward: its masks
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # Gradient clipping would go here, e.g. nn.utils.clip_grad_norm_(model.parameters(), 1.0): before
            # optimizer.step(), where the method's after_backward runs, so it sees clipped gradients
            # (SR-STE's decay on pruned weights is in .grad already: its straight-through backward adds it).
            # Gradient accumulation: several forward/backward passes before one optimizer.step(); the
            # method counts optimizer steps, not batches.
            optimizer.step()                                     # after_backward, the update, after_step
            scheduler.step()
        # A checkpoint here would save handle.state_dict() beside model.state_dict() and
        # optimizer.state_dict(): the masks, the method's random state and its step (a resume is bit-exact).
        print(f"epoch {epoch + 1}: last batch loss {loss.item():.3f}, "
              f"test accuracy {accuracy(model, x_test, y_test):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path("runs/own-loop"), help="where the export goes")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    missing = [f for f in FILES if not (args.data / f).is_file()]
    if missing:
        parser.error(f"--data: {args.data} has no {missing[0]}; install Debian's dataset-fashion-mnist "
                     "or pass --data DIR holding the four IDX files")

    torch.manual_seed(args.seed)
    data = (*load_split(args.data, "train"), *load_split(args.data, "t10k"))
    model = SmallCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps = args.epochs * (len(data[0]) // args.batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)

    # nmtrain: route conv2 and fc1 through SR-STE at 2:4 and hook the optimizer: after the optimizer
    # exists (it must hold the sparse weights), before the first forward. (Methods whose work follows
    # the run's length, such as pgf or step, also take total_steps=steps.)
    handle = nmtrain.sparsify(model, method="srste", pattern="2:4", optimizer=optimizer)
    print(f"sparse layers: {', '.join(handle.layers)}; left dense: "
          + "; ".join(f"{name} ({why})" for name, why in handle.skipped.items()))

    train(model, optimizer, scheduler, data, args.epochs, args.batch)
    trained = time.perf_counter()
    # The sparse layers' forward still runs through the method: this is the 2:4 model's accuracy.
    acc = accuracy(model, data[2], data[3])
    flops = handle.flops()

    # nmtrain: the compressed N:M safetensors file of `nmtrain convert` (kept values and their positions
    # in each group of 4). Before remove(): it reads the final masks from the method.
    path = handle.export(args.out / "model-2of4.safetensors")
    # nmtrain: fold the masks into the weights (pruned entries exactly 0.0) and detach the method: the
    # model is a plain PyTorch model again, its layers' own forward back, the optimizer's hooks gone.
    report = handle.remove()

    # What was promised: every sparse weight now holds 2:4 itself, and the folded model scores the same.
    two_four = nmtrain.masks.parse_pattern("2:4")
    for name in handle.layers:
        problem = nmtrain.masks.nm_violation(model.get_submodule(name).weight, two_four)
        assert problem is None, f"{name}.weight is not 2:4: {problem}"
    folded = accuracy(model, data[2], data[3])
    assert folded == acc, (folded, acc)

    dense_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    layers = ", ".join(f"{name} {r['pattern']} (density {r['density']:.2f})" for name, r in report.items())
    print(f"sparse weights: {layers}")
    print(f"training GEMM MACs: {flops['ratio']:.2f} of dense (the 2:4 layers' forward GEMMs at half)")
    print(f"exported {path} ({path.stat().st_size / 1e3:.0f} kB; dense float32 {dense_bytes / 1e3:.0f} kB)")
    print(f"test accuracy {acc:.4f} (2:4, masks folded in: {folded:.4f}); wall {time.perf_counter() - START:.1f} s "
          f"({trained - START:.1f} s to the end of training, imports and data included)")


if __name__ == "__main__":
    main()
