"""The built-in data set, image folders, and reproducible training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from edgecnn.data import SYNTHETIC_CLASSES, image_folder, split, synthetic_dataset
from edgecnn.errors import InvalidInputError
from edgecnn.train import TrainConfig, train


def test_synthetic_set_is_deterministic_and_balanced():
    a, b, c = synthetic_dataset(20, seed=5), synthetic_dataset(20, seed=5), synthetic_dataset(20, seed=6)
    assert len(SYNTHETIC_CLASSES) >= 5
    assert a.images.shape == (20 * len(SYNTHETIC_CLASSES), 64, 64, 3) and a.images.dtype == np.uint8
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert np.bincount(a.labels).tolist() == [20] * len(SYNTHETIC_CLASSES)
    # Variation inside a class: no two images of one class are the same.
    circles = a.images[a.labels == 0].reshape(20, -1)
    assert len({row.tobytes() for row in circles}) == 20


def test_split_is_stratified_and_disjoint():
    ds = synthetic_dataset(10, seed=0)
    tr, va = split(ds, 0.2, seed=0)
    assert len(tr) + len(va) == len(ds)
    assert np.bincount(va.labels).tolist() == [2] * len(SYNTHETIC_CLASSES)
    tr_rows = {r.tobytes() for r in tr.images.reshape(len(tr), -1)}
    assert not any(r.tobytes() in tr_rows for r in va.images.reshape(len(va), -1))


def test_image_folder_reads_any_size_and_mode(tmp_path):
    ds = synthetic_dataset(3, seed=1)
    for i, (img, lab) in enumerate(zip(ds.images, ds.labels, strict=True)):
        d = tmp_path / ds.class_names[lab]
        d.mkdir(exist_ok=True)
        im = Image.fromarray(img).resize((100 + i, 80))
        if i % 3 == 1:
            im = im.convert("L")
        im.save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
    got = image_folder(tmp_path)
    assert got.class_names == sorted(ds.class_names)
    assert got.images.shape == (len(ds), 64, 64, 3)


def test_image_folder_errors(tmp_path):
    with pytest.raises(InvalidInputError, match="no such file or folder"):
        image_folder(tmp_path / "nope")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    with pytest.raises(InvalidInputError, match="no images"):
        image_folder(tmp_path)
    (tmp_path / "b" / "y.png").write_bytes(b"not a png")
    with pytest.raises(InvalidInputError, match="y.png"):
        image_folder(tmp_path)


def test_training_is_reproducible_and_learns():
    ds = synthetic_dataset(40, seed=0)
    cfg = TrainConfig(epochs=2, progress=False, seed=11)
    r1, r2 = train(ds, cfg, log=lambda s: None), train(ds, cfg, log=lambda s: None)
    for k, v in r1.checkpoint.state_dict.items():
        assert torch.equal(v, r2.checkpoint.state_dict[k]), k
    assert r1.history[-1]["train_loss"] < r1.history[0]["train_loss"]
    r3 = train(ds, TrainConfig(epochs=2, progress=False, seed=12), log=lambda s: None)
    assert not torch.equal(r1.checkpoint.state_dict["classifier.bias"], r3.checkpoint.state_dict["classifier.bias"])


def test_one_batch_is_not_enough():
    # The built-in set must not be trivially solved: after a single batch the Net is far from 100%.
    ds = synthetic_dataset(30, seed=0)
    res = train(ds, TrainConfig(epochs=1, batch_size=ds.images.shape[0], progress=False), log=lambda s: None)
    assert res.val_accuracy < 0.9
