#!/usr/bin/env python3
"""Classify images with this bundle's model: python predict.py IMAGE... (numpy, Pillow, onnxruntime only)."""

# This file is copied verbatim into every `edgecnn package` bundle as predict.py. It imports nothing
# from edgecnn: the preprocessing is edgecnn_preprocess.py beside it, generated from the installed
# edgecnn.runtimes.preprocess, so the device runs the same code as edgecnn's Classifier.

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = "manifest.json"
EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_UNAVAILABLE = 2, 1, 3


class BundleError(Exception):
    """A problem with the bundle (missing/altered file) or the environment, with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _preprocess_module():
    sys.dont_write_bytecode = True  # keep the bundle folder exactly as its manifest lists it
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import edgecnn_preprocess

    return edgecnn_preprocess


class BundleModel:
    """One model of the bundle on ONNX Runtime CPU, with the bundle's labels and preprocessing."""

    def __init__(self, folder: Path = HERE, model: str | None = None, threads: int | None = None):
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise BundleError(f"{folder / MANIFEST}: cannot read the bundle manifest ({e})") from None
        name = model or manifest["default_model"]
        entries = {m["file"]: m for m in manifest["models"]}
        if name not in entries:
            raise BundleError(f"no model {name!r} in this bundle; it has {', '.join(entries)}")
        for f in (name, "labels.txt", "edgecnn_preprocess.py"):
            if _sha256(folder / f) != manifest["files"][f]:
                raise BundleError(f"{f}: sha256 does not match {MANIFEST} (altered file)", EXIT_CHECK_FAILED)
        self.pre = _preprocess_module()
        try:
            import onnxruntime as ort
        except ImportError:
            raise BundleError("onnxruntime is not installed: pip install -r requirements.txt",
                              EXIT_UNAVAILABLE) from None
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / name), sess_options=so,
                                            providers=["CPUExecutionProvider"])
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        self.labels = (folder / "labels.txt").read_text(encoding="utf-8").splitlines()
        self.mean = json.loads(meta["mean"]) if "mean" in meta else list(self.pre.DEFAULT_MEAN)
        self.std = json.loads(meta["std"]) if "std" in meta else list(self.pre.DEFAULT_STD)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self.uint8 = inp.type == "tensor(uint8)"  # preprocessing embedded in the graph: feed RGB pixels
        self.softmax_inside = meta.get("embedded_softmax") == "1"
        self.size = int(inp.shape[1] if self.uint8 else inp.shape[2])
        self.fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None

    def probabilities(self, images: list):
        """Images (paths, PIL images, uint8 arrays) -> float32 probabilities (N, classes)."""
        import numpy as np

        if self.uint8:
            x = self.pre.to_batch_uint8(images, self.size)
        else:
            x = self.pre.preprocess(images, self.mean, self.std, self.size)
        step = self.fixed_batch or len(x)
        out = np.concatenate([self.session.run(None, {self.input_name: x[i : i + step]})[0]
                              for i in range(0, len(x), step)])
        return out if self.softmax_inside else self.pre.softmax(out)

    def classify(self, images: list, top_k: int = 1) -> list[list[tuple[str, float]]]:
        import numpy as np

        res = []
        for p in self.probabilities(images):
            idx = np.argsort(-p, kind="stable")[:top_k]
            res.append([(self.labels[i], float(p[i])) for i in idx])
        return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Classify images; one line per image: file, top label, probability.")
    ap.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...; any size)")
    ap.add_argument("--model", default=None, help="which model of the bundle (default: the manifest's default)")
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.top_k < 1:
        ap.error("--top-k must be >= 1")
    try:
        clf = BundleModel(HERE, args.model, args.threads)
    except BundleError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return e.exit_code
    rc = 0
    for img in args.images:
        try:
            preds = clf.classify([img], args.top_k)[0]
        except clf.pre.InvalidInputError as e:
            print(f"predict.py: error: {e}", file=sys.stderr)
            rc = EXIT_BAD_INPUT
            continue
        print("\t".join([img] + [f"{label}\t{p:.6f}" for label, p in preds]))
    return rc


if __name__ == "__main__":
    sys.exit(main())
