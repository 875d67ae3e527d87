"""Datasets for nmtrain (Fashion-MNIST by default; CIFAR and ImageFolder loaders land with `nmtrain train`)."""
