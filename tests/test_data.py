"""The data layer: IDX parsing, every registered dataset on tiny local files, subsets, loaders, errors."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image

from nmtrain.data import DatasetError, DatasetInfo, build_datasets, build_loaders, list_datasets
from nmtrain.data import cifar as cifar_module
from nmtrain.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx, write_idx

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"



def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    return message


# --- registry -------------------------------------------------------------------------------------

def test_registry_lists_every_dataset_with_a_one_line_description():
    datasets = list_datasets()
    assert list(datasets)[0] == "fashion_mnist"
    assert {"fashion_mnist", "cifar10", "cifar100", "imagefolder", "synthetic"} <= set(datasets)
    for name, summary in datasets.items():
        assert summary and "\n" not in summary, name


def test_unknown_dataset_names_the_field_and_the_choices():
    with pytest.raises(DatasetError) as exc:
        build_datasets("foo")
    message = one_line(exc)
    assert message.startswith("data.dataset: 'foo' is unknown; use one of: fashion_mnist, ")
    assert isinstance(exc.value, ValueError)


def test_an_option_the_dataset_does_not_take_is_a_one_line_error():
    with pytest.raises(DatasetError) as exc:
        build_datasets("synthetic", colour="red")
    assert one_line(exc).startswith("data.colour: not an option of dataset 'synthetic'")


# --- IDX parser -----------------------------------------------------------------------------------

def test_idx_round_trip(tmp_path):
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    write_idx(tmp_path / "x.gz", images)
    back = read_idx(tmp_path / "x.gz", IMAGES_MAGIC)
    assert back.dtype == torch.uint8 and torch.equal(back, images)


def test_idx_rejects_wrong_magic(tmp_path):
    write_idx(tmp_path / "labels.gz", torch.arange(4))
    with pytest.raises(DatasetError) as exc:
        read_idx(tmp_path / "labels.gz", IMAGES_MAGIC)
    assert "labels.gz has magic number 0x00000801, expected 0x00000803" in one_line(exc)


def test_idx_rejects_a_payload_shorter_than_its_header_says(tmp_path):
    path = tmp_path / "short.gz"
    with gzip.open(path, "wb") as fh:  # header announces 3 x 28 x 28, payload holds 100 bytes
        fh.write(struct.pack(">IIII", IMAGES_MAGIC, 3, 28, 28) + bytes(100))
    with pytest.raises(DatasetError) as exc:
        read_idx(path, IMAGES_MAGIC)
    message = one_line(exc)
    assert str(path) in message and "holds 100 data bytes" in message and "3x28x28 = 2352" in message


def test_idx_rejects_a_truncated_gzip_stream(tmp_path):
    write_idx(tmp_path / "full.gz", torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8))
    raw = (tmp_path / "full.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError) as exc:
        read_idx(tmp_path / "cut.gz")
    message = one_line(exc)
    assert message.startswith("data.root: ") and "cut.gz" in message and "truncated" in message


def test_idx_rejects_a_file_that_is_not_gzip(tmp_path):
    (tmp_path / "plain.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError) as exc:
        read_idx(tmp_path / "plain.gz")
    assert "plain.gz is not a complete gzip file" in one_line(exc)


# --- Fashion-MNIST --------------------------------------------------------------------------------

def write_fake_fmnist(root, n_train=12, n_test=6):
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", torch.arange(n) % 10)


def test_fashion_mnist_from_tiny_files(tmp_path):
    write_fake_fmnist(tmp_path)
    train, test, info = build_datasets("fashion_mnist", root=str(tmp_path))
    assert info == DatasetInfo("fashion_mnist", 10, 1, 28, 12, 6)
    image, label = train[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32 and label == 3
    raw = train.images[3].float() / 255  # normalised with Fashion-MNIST's mean and std
    assert torch.allclose(image, (raw - 0.2860) / 0.3530, atol=1e-6)


def test_fashion_mnist_takes_mean_and_std_but_not_image_size(tmp_path):
    write_fake_fmnist(tmp_path)
    train, _, _ = build_datasets("fashion_mnist", root=str(tmp_path), mean=[0.5], std=[0.25])
    raw = train.images[3].float() / 255
    assert torch.allclose(train[3][0], (raw - 0.5) / 0.25, atol=1e-6)
    with pytest.raises(DatasetError) as exc:
        build_datasets("fashion_mnist", root=str(tmp_path), image_size=32)
    assert one_line(exc) == "data.image_size: not an option of dataset 'fashion_mnist' (it takes: mean, std)"
    with pytest.raises(DatasetError) as exc:
        build_datasets("fashion_mnist", root=str(tmp_path), std=[0.3, 0.3, 0.3])
    assert one_line(exc) == "data.std: 3 value(s) for the 1-channel images of fashion_mnist; give 1, one per channel"


def test_fashion_mnist_augmentation_crops_and_flips_train_only(tmp_path):
    write_fake_fmnist(tmp_path)
    train, test, _ = build_datasets("fashion_mnist", root=str(tmp_path), augment=True)
    torch.manual_seed(1)
    views = {tuple(train[0][0].flatten().tolist()) for _ in range(20)}
    assert len(views) > 1  # random crops/flips differ
    assert train[0][0].shape == (1, 28, 28)
    assert torch.equal(test[0][0], test[0][0])  # test split is never augmented


def test_fashion_mnist_missing_file_names_the_file_and_the_fix(tmp_path):
    write_fake_fmnist(tmp_path)
    os.remove(tmp_path / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(DatasetError) as exc:
        build_datasets("fashion_mnist", root=str(tmp_path))
    assert one_line(exc) == (f"data.root: {tmp_path} has no Fashion-MNIST files (t10k-images-idx3-ubyte.gz "
                             "missing); install Debian's dataset-fashion-mnist or set data.root")


def test_fashion_mnist_missing_directory(tmp_path):
    with pytest.raises(DatasetError) as exc:
        build_datasets("fashion_mnist", root=str(tmp_path / "nope"))
    assert one_line(exc).startswith(f"data.root: {tmp_path / 'nope'} does not exist; install Debian's")


def test_fashion_mnist_truncated_file_is_named(tmp_path):
    write_fake_fmnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">II", LABELS_MAGIC, 12) + bytes(5))
    with pytest.raises(DatasetError) as exc:
        build_datasets("fashion_mnist", root=str(tmp_path))
    assert str(path) in one_line(exc)


def test_fashion_mnist_image_and_label_counts_must_agree(tmp_path):
    write_fake_fmnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", torch.zeros(7))
    with pytest.raises(DatasetError) as exc:
        build_datasets("fashion_mnist", root=str(tmp_path))
    assert "holds 12 images but" in one_line(exc)


@pytest.mark.skipif(not os.path.isdir(FMNIST_ROOT), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_real_files():
    train, test, info = build_datasets("fashion_mnist")  # the default root
    assert info == DatasetInfo("fashion_mnist", 10, 1, 28, 60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.min() == 0 and train.labels.max() == 9
    assert torch.equal(torch.bincount(test.labels), torch.full((10,), 1000))
    sample = torch.stack([train[i][0] for i in range(0, 60000, 30)])  # 2000 evenly spread images
    assert abs(sample.mean().item()) < 0.05 and abs(sample.std().item() - 1) < 0.05


# --- CIFAR ----------------------------------------------------------------------------------------

def cifar_batch(n, label_key, num_classes, seed):
    rng = np.random.default_rng(seed)
    return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key: [int(i) for i in rng.integers(0, num_classes, n)]}


def dump(obj, path):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def write_fake_cifar10(root, per_batch=4, n_test=5):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        dump(cifar_batch(per_batch, "labels", 10, i), folder / f"data_batch_{i}")
    dump(cifar_batch(n_test, "labels", 10, 0), folder / "test_batch")
    dump({"label_names": [f"c{i}" for i in range(10)]}, folder / "batches.meta")


def write_fake_cifar100(root, n_train=8, n_test=3):
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        batch = cifar_batch(n, "fine_labels", 100, seed)
        batch["coarse_labels"] = [label // 5 for label in batch["fine_labels"]]
        dump(batch, folder / name)
    dump({"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]},
         folder / "meta")


def test_cifar10_from_tiny_pickles(tmp_path):
    write_fake_cifar10(tmp_path)
    train, test, info = build_datasets("cifar10", root=str(tmp_path), verify=False)
    assert info == DatasetInfo("cifar10", 10, 3, 32, 20, 5)
    image, label = train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label == cifar_batch(4, "labels", 10, 1)["labels"][0]
    # The pixel layout is CIFAR's (3 planes of 32x32), normalised per channel.
    raw = torch.from_numpy(cifar_batch(4, "labels", 10, 1)["data"][0].reshape(3, 32, 32)).float() / 255
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(3, 1, 1)
    std = torch.tensor([0.2470, 0.2435, 0.2616]).view(3, 1, 1)
    assert torch.allclose(image, (raw - mean) / std, atol=1e-5)
    assert train.classes[3] == "c3"


def test_cifar10_augmentation_keeps_the_shape(tmp_path):
    write_fake_cifar10(tmp_path)
    train, test, _ = build_datasets("cifar10", root=str(tmp_path), verify=False, augment=True)
    torch.manual_seed(0)
    views = [train[0][0] for _ in range(8)]
    assert all(v.shape == (3, 32, 32) for v in views)
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(test[0][0], test[0][0])


def test_cifar100_from_tiny_pickles(tmp_path):
    write_fake_cifar100(tmp_path)
    train, test, info = build_datasets("cifar100", root=str(tmp_path), verify=False)
    assert info == DatasetInfo("cifar100", 100, 3, 32, 8, 3)
    assert [test[i][1] for i in range(3)] == cifar_batch(3, "fine_labels", 100, 2)["fine_labels"]
    assert train[0][0].shape == (3, 32, 32)


def test_cifar_image_size_resizes_after_the_crop_and_mean_std_replace_the_statistics(tmp_path):
    write_fake_cifar10(tmp_path)
    train, test, info = build_datasets("cifar10", root=str(tmp_path), verify=False, augment=True, image_size=48)
    assert info == DatasetInfo("cifar10", 10, 3, 48, 20, 5)
    assert train[0][0].shape == (3, 48, 48) and test[0][0].shape == (3, 48, 48)
    _, test, _ = build_datasets("cifar10", root=str(tmp_path), verify=False, mean=[0.5, 0.4, 0.3], std=[0.25] * 3)
    raw = torch.from_numpy(cifar_batch(5, "labels", 10, 0)["data"][0].reshape(3, 32, 32)).float() / 255
    assert torch.allclose(test[0][0], (raw - torch.tensor([0.5, 0.4, 0.3]).view(3, 1, 1)) / 0.25, atol=1e-5)


def test_cifar_md5_check_stays_on_by_default(tmp_path):
    write_fake_cifar10(tmp_path)
    with pytest.raises(DatasetError) as exc:
        build_datasets("cifar10", root=str(tmp_path))
    message = one_line(exc)
    assert message.startswith(f"data.root: {tmp_path}/cifar-10-batches-py/data_batch_1 fails its md5 check")


def test_cifar_missing_files_name_the_field_and_the_fix(tmp_path):
    write_fake_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    with pytest.raises(DatasetError) as exc:
        build_datasets("cifar10", root=str(tmp_path), verify=False)
    assert one_line(exc) == (f"data.root: {tmp_path} has no CIFAR-10 files (cifar-10-batches-py/test_batch "
                             "missing); set data.root to the folder holding cifar-10-batches-py/ or set "
                             "data.download: true")
    with pytest.raises(DatasetError) as exc:
        build_datasets("cifar100", root=str(tmp_path / "none"))
    assert one_line(exc).startswith(f"data.root: {tmp_path / 'none'} does not exist; ")


def test_cifar_unreadable_pickle(tmp_path):
    write_fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DatasetError) as exc:
        build_datasets("cifar10", root=str(tmp_path), verify=False)
    assert "cannot be read" in one_line(exc)


def test_cifar_failed_download_says_how_to_get_the_data(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(cifar_module, "download_and_extract_archive", offline)
    with pytest.raises(DatasetError) as exc:
        build_datasets("cifar10", root=str(tmp_path), download=True)
    message = one_line(exc)
    assert message.startswith(f"data.download: fetching CIFAR-10 into {tmp_path} failed (")
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message


# --- ImageFolder ----------------------------------------------------------------------------------

def write_fake_imagefolder(root, classes=("cat", "dog", "eel"), per_class=2):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in classes:
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / cls / f"{i}.png")


def test_imagefolder_from_tiny_pngs(tmp_path):
    write_fake_imagefolder(tmp_path)
    for augment in (False, True):
        train, test, info = build_datasets("imagefolder", root=str(tmp_path), image_size=32, augment=augment)
        assert info == DatasetInfo("imagefolder", 3, 3, 32, 6, 6)
        assert train[0][0].shape == (3, 32, 32) and test[5][0].shape == (3, 32, 32)
        assert [test[i][1] for i in range(6)] == [0, 0, 1, 1, 2, 2]


def test_imagefolder_normalises_with_the_given_mean_and_std(tmp_path):
    write_fake_imagefolder(tmp_path)
    _, plain, _ = build_datasets("imagefolder", root=str(tmp_path), image_size=16, mean=[0, 0, 0], std=[1, 1, 1])
    _, imagenet, _ = build_datasets("imagefolder", root=str(tmp_path), image_size=16)      # ImageNet's, the default
    pixels = plain[0][0]          # no normalisation left: the pixels on [0, 1]
    assert pixels.shape == (3, 16, 16) and 0 <= pixels.min() and pixels.max() <= 1
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(imagenet[0][0], (pixels - mean) / std, atol=1e-5)
    with pytest.raises(DatasetError) as exc:
        build_datasets("imagefolder", root=str(tmp_path), image_size=16, mean=[0.5])
    assert one_line(exc) == "data.mean: 1 value(s) for the 3-channel images of imagefolder; give 3, one per channel"


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError) as exc:
        build_datasets("imagefolder")
    assert one_line(exc).startswith("data.root: the imagefolder dataset needs a root folder")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError) as exc:
        build_datasets("imagefolder", root=str(tmp_path), image_size=32)
    assert one_line(exc).startswith("data.root: ")  # empty class folder or missing val/
    write_fake_imagefolder(tmp_path / "mismatch")
    (tmp_path / "mismatch" / "val" / "eel" / "0.png").rename(tmp_path / "mismatch" / "val" / "dog" / "x.png")
    (tmp_path / "mismatch" / "val" / "eel" / "1.png").unlink()
    (tmp_path / "mismatch" / "val" / "eel").rmdir()
    with pytest.raises(DatasetError) as exc:
        build_datasets("imagefolder", root=str(tmp_path / "mismatch"), image_size=32)
    assert "different class folders (only in train: ['eel']; only in val: none)" in one_line(exc)


# --- synthetic ------------------------------------------------------------------------------------

def test_synthetic_defaults_and_determinism():
    train, test, info = build_datasets("synthetic", seed=3)
    assert info == DatasetInfo("synthetic", 10, 1, 28, 512, 256)
    again, _, _ = build_datasets("synthetic", seed=3)
    other, _, _ = build_datasets("synthetic", seed=4)
    assert torch.equal(train.images, again.images) and torch.equal(train.labels, again.labels)
    assert not torch.equal(train.images, other.images)
    counts = torch.bincount(train.labels, minlength=10)
    assert counts.max() - counts.min() <= 1  # balanced classes
    image, label = train[0]
    assert image.shape == (1, 28, 28) and isinstance(label, int)
    stack = torch.stack([train[i][0] for i in range(len(train))])
    assert abs(stack.mean().item()) < 1e-3 and abs(stack.std().item() - 1) < 1e-3


def test_synthetic_options():
    train, test, info = build_datasets("synthetic", num_classes=3, in_channels=3, image_size=16,
                                       train_size=30, test_size=9)
    assert info == DatasetInfo("synthetic", 3, 3, 16, 30, 9)
    assert train[0][0].shape == (3, 16, 16) and set(test.labels.tolist()) == {0, 1, 2}
    with pytest.raises(DatasetError) as exc:
        build_datasets("synthetic", train_size=0)
    assert one_line(exc) == "data.train_size: must be a positive integer, got 0"


def test_synthetic_is_learnable_by_a_small_mlp():
    train, test, info = build_datasets("synthetic", seed=0)
    train_loader, test_loader = build_loaders(train, test, batch_size=32, seed=0)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        for x, y in train_loader:
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in test_loader)
    assert correct / len(test) > 0.6  # chance is 0.1


# --- subsets and loaders --------------------------------------------------------------------------

def test_subsets_are_seeded_and_sized():
    train, test, info = build_datasets("synthetic", train_subset=100, test_subset=40, seed=1)
    assert (info.train_size, info.test_size) == (100, 40) and (len(train), len(test)) == (100, 40)
    again, _, _ = build_datasets("synthetic", train_subset=100, test_subset=40, seed=1)
    other, _, _ = build_datasets("synthetic", train_subset=100, test_subset=40, seed=2)
    assert train.indices == again.indices and train.indices != other.indices
    assert len(set(train.indices)) == 100 and train.indices == sorted(train.indices)
    assert torch.equal(train[0][0], train.dataset[train.indices[0]][0])
    full, _, _ = build_datasets("synthetic", train_subset=512)
    assert len(full) == 512


@pytest.mark.parametrize("size, expected", [
    (0, "data.train_subset: must be a positive integer or null, got 0"),
    (513, "data.train_subset: 513 is more than the 512 samples available; use at most 512 or null for all"),
])
def test_subset_errors(size, expected):
    with pytest.raises(DatasetError) as exc:
        build_datasets("synthetic", train_subset=size)
    assert one_line(exc) == expected


def test_loaders_shuffle_train_reproducibly_and_keep_test_in_order():
    train, test, _ = build_datasets("synthetic", train_subset=64, test_subset=20)

    def epoch_labels(loader):
        return torch.cat([y for _, y in loader]).tolist()

    a_train, a_test = build_loaders(train, test, batch_size=16, seed=5, eval_batch_size=7)
    b_train, _ = build_loaders(train, test, batch_size=16, seed=5)
    c_train, _ = build_loaders(train, test, batch_size=16, seed=6)
    first = epoch_labels(a_train)
    assert first == epoch_labels(b_train) and first != epoch_labels(c_train)
    assert epoch_labels(a_train) != first  # the next epoch is a new permutation
    assert [len(y) for _, y in a_test] == [7, 7, 6]
    assert epoch_labels(a_test) == [test[i][1] for i in range(len(test))]
    x, y = next(iter(a_train))
    assert x.shape == (16, 1, 28, 28) and y.dtype == torch.int64
    with pytest.raises(DatasetError) as exc:
        build_loaders(train, test, batch_size=0, seed=0)
    assert one_line(exc) == "data.batch_size: must be a positive integer, got 0"


def test_holdout_takes_the_same_training_samples_out_whatever_the_seed():
    from nmtrain.data import build_datasets

    full, _, _ = build_datasets("synthetic", seed=0)
    splits = [build_datasets("synthetic", seed=s, holdout=50) for s in (0, 1)]
    for train, held, info in splits:
        assert len(held) == 50 and len(train) == len(full) - 50
        assert info.train_size == len(train) and info.test_size == 50
        assert not set(train.indices) & set(held.indices)          # disjoint, together the whole split
        assert sorted(train.indices + held.indices) == list(range(len(full)))
    assert splits[0][1].indices == splits[1][1].indices            # one fixed split
    x, y = splits[0][1][0]
    fx, fy = full[splits[0][1].indices[0]]
    assert torch.equal(x, fx) and y == fy


@pytest.mark.parametrize("bad", [0, -3, True, 10 ** 9])
def test_holdout_out_of_range_names_the_field(bad):
    from nmtrain.data import DatasetError, build_datasets

    with pytest.raises(DatasetError, match="data.holdout"):
        build_datasets("synthetic", seed=0, holdout=bad)
