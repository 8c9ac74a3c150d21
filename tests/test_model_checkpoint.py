"""Net layout, checkpoint reading (weights_only), bare state_dicts, and refusals."""

from __future__ import annotations

import pickle

import pytest
import torch
from course_net import CourseNet
from torch import nn

from edgecnn.checkpoint import load_checkpoint
from edgecnn.errors import InvalidModelError
from edgecnn.model import Net


def test_net_keeps_the_seed_attribute_names_and_layer_order():
    net = Net(7)
    kinds = [type(m).__name__ for m in net.feature_extractor]
    assert kinds == ["Conv2d", "ELU", "MaxPool2d", "Conv2d", "ELU", "MaxPool2d", "Flatten"]
    assert list(net.state_dict()) == list(CourseNet(7).state_dict())
    assert net(torch.zeros(2, 3, 64, 64)).shape == (2, 7)


def test_bare_state_dict_from_course_code_loads_with_inferred_class_count(tmp_path):
    torch.manual_seed(3)
    course = CourseNet(4).eval()
    torch.save(course.state_dict(), tmp_path / "course.pt")
    ck = load_checkpoint(tmp_path / "course.pt")
    assert ck.bare and ck.num_classes == 4 and ck.class_names == [f"class_{i}" for i in range(4)]
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(ck.build_model()(x), course(x))


def test_checkpoint_metadata_round_trip(trained):
    ck = load_checkpoint(trained.pt)
    assert not ck.bare
    assert ck.class_names == ["circle", "square", "triangle", "cross", "stripes", "checker"]
    assert len(ck.mean) == 3 and len(ck.std) == 3 and ck.input_size == 64
    assert ck.summary["val_accuracy"] == pytest.approx(trained.val_accuracy)
    assert len(ck.sha256) == 64


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_pickle_payload_is_refused_and_never_runs(tmp_path):
    sentinel = tmp_path / "pwned"
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": _Evil(str(sentinel))}, f)
    torch.save({"x": _Evil(str(sentinel))}, tmp_path / "evil_zip.pt")
    assert not sentinel.exists()
    for name in ("evil.pt", "evil_zip.pt"):
        with pytest.raises(InvalidModelError, match="weights_only"):
            load_checkpoint(tmp_path / name)
    assert not sentinel.exists()


def test_full_pickled_module_is_refused_with_state_dict_hint(tmp_path):
    torch.save(Net(3), tmp_path / "full.pt")
    with pytest.raises(InvalidModelError, match="state_dict"):
        load_checkpoint(tmp_path / "full.pt")


@pytest.mark.parametrize("case", ["missing", "empty", "dir", "garbage", "truncated", "other_arch",
                                  "wrong_shape", "not_dict"])
def test_bad_checkpoints_are_refused_clearly(tmp_path, trained, case):
    p = tmp_path / "bad.pt"
    if case == "empty":
        p.write_bytes(b"")
    elif case == "dir":
        p.mkdir()
    elif case == "garbage":
        p.write_bytes(b"this is not a checkpoint at all" * 10)
    elif case == "truncated":
        p.write_bytes(trained.pt.read_bytes()[:5000])
    elif case == "other_arch":
        torch.save(nn.Sequential(nn.Linear(4, 2)).state_dict(), p)
    elif case == "wrong_shape":
        sd = Net(3).state_dict()
        sd["feature_extractor.3.weight"] = torch.zeros(16, 32, 3, 3)
        torch.save(sd, p)
    elif case == "not_dict":
        torch.save([torch.zeros(3)], p)
    with pytest.raises(InvalidModelError) as ei:
        load_checkpoint(p)
    msg = str(ei.value)
    assert "\n" not in msg and str(p) in msg
