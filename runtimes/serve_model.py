"""The model `edgecnn serve` runs: its Classifier and the v2 description of its inputs and outputs. Torch-free."""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from edgecnn.errors import InvalidInputError, InvalidModelError

from .classifier import Classifier
from .preprocess import MAX_PIXELS, softmax, to_rgb_uint8
from .serve_protocol import InputTensor, OutputTensor, ProtocolError, RequestedOutput, classification

IMAGES_INPUT = "images"
MODEL_VERSION = "1"
# Decoded pixels one request may hold in all (each image is decoded, resized and dropped in turn).
MAX_REQUEST_PIXELS = 64_000_000
# Adaptive spinning: a model call that starts within this long of the previous call's end runs on the
# spinning session (the load is back to back); else on the non-spinning one (ServedModel.run).
HOT_GAP_S = 0.002


def resolve_model(source: str | os.PathLike):
    """A model file, a deploy.json (from `edgecnn tune`) or a bundle folder (from `edgecnn package`) -> the
    one description of what to run (edgecnn.runtimes.deploy.resolve; an altered bundle is refused)."""
    from .deploy import resolve

    return resolve(source)


class ServedModel:
    """The Classifier a server runs, with the v2 description of its inputs and outputs.

    A fixed-batch ONNX model (the default export: batch 1) is served through a copy whose batch axis
    is symbolic (``onnx_batch.relax_batch_file``, torch- and onnx-free), so a batch of 64 is one call;
    with ``relax=False``, or when the copy cannot be made, ``Runtime.run`` feeds the batch row by row.
    """

    def __init__(self, source: str | os.PathLike, runtime: str | None = None, name: str | None = None,
                 relax: bool = True, adaptive_spinning: bool = False, lone_threads: int | None = None, **options):
        """``adaptive_spinning`` (ort-cpu only, with ``spinning=False``): also load a spinning twin of the
        session and run each call on it while calls come back to back (``run``)."""
        self.deployable, self.override_notes = resolve_model(source).override(runtime, options)
        d = self.deployable
        model, runtime, options = d.model, d.runtime, d.load_kwargs()
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.clf = Classifier(model, runtime=runtime, **options)
        self.batching = "dynamic"
        if self.clf.runtime.input_shape[0] is not None:
            self.batching = f"fixed batch {self.clf.runtime.input_shape[0]}: batches run row by row"
            if relax and model.suffix.lower() == ".onnx":
                relaxed = self._relaxed(model, runtime, options)
                if relaxed is not None:
                    self.clf.close()
                    self.clf = relaxed
                    self.batching = "dynamic (fixed batch axis made symbolic in a temporary copy)"
        self.model_path = model
        self._hot: Classifier | None = None  # the spinning twin (adaptive spinning)
        self._last_end = float("-inf")
        self.hot_calls = self.cold_calls = 0
        if adaptive_spinning and runtime == "ort-cpu" and options.get("spinning") is False:
            self._hot = Classifier(self.clf.runtime.model_path, runtime=runtime, **{**options, "spinning": True})
        self._lone: ServedModel | None = None
        if lone_threads and lone_threads > (options.get("threads") or lone_threads):
            self._lone = ServedModel(self.clf.runtime.model_path, runtime=runtime, relax=False,
                                     adaptive_spinning=adaptive_spinning, **{**options, "threads": lone_threads})
        self.name = name or d.name
        if not self.name or "/" in self.name:
            raise InvalidInputError(f"bad model name {self.name!r}")
        rt = self.clf.runtime
        _, c, h, w = rt.input_shape
        self.input_name = getattr(rt, "input_name", "input")
        if self.clf.embedded_preprocessing:
            self.input_datatype, self.input_dims = "UINT8", (h, w, c)
        else:
            self.input_datatype, self.input_dims = "FP32", (c, h, w)
        self.num_classes = len(self.clf.class_names)
        self.outputs = ["probabilities"] if self.clf.embedded_softmax else ["logits", "probabilities"]

    @property
    def spinning(self) -> str | bool | None:
        """What the model calls spin: "adaptive" with a spinning twin, else the runtime's own setting."""
        return "adaptive" if self._hot is not None else getattr(self.clf.runtime, "spinning_used", None)

    @property
    def threads(self) -> int | None:
        """Intra-op threads of one instance's session (None: the runtime does not say)."""
        rt = self.clf.runtime
        return getattr(rt, "threads_used", None) or getattr(rt, "threads", None)

    @property
    def lone_threads(self) -> int | None:
        """Threads of the session a lone call runs on (``run_lone``): ``threads`` unless it has its own."""
        return self.threads if self._lone is None else self._lone.threads

    @property
    def spinning_text(self) -> str:
        """``spinning`` in words: adaptive, on, off or unknown."""
        s = self.spinning
        return s if isinstance(s, str) else "unknown" if s is None else "on" if s else "off"

    def run(self, x: np.ndarray) -> np.ndarray:
        """One model call (the batcher's ``run``; thread-safe). With adaptive spinning a call of several rows
        (a batch formed: requests queued while the last call ran) or one that starts within HOT_GAP_S of the
        previous call's end runs on the spinning session: back-to-back calls get
        spinning's speed (ORT's threads spin between the operators of a call and wait for the next one)
        while a call after a pause runs without it, so an idle or lightly loaded server does not burn a
        core (a spinning pool keeps spinning up to ~50 ms after each call)."""
        hot = self._hot
        if hot is not None and (x.shape[0] > 1 or time.perf_counter() - self._last_end < HOT_GAP_S):
            self.hot_calls += 1
            out = hot.run(x)
        else:
            self.cold_calls += 1
            out = self.clf.run(x)
        self._last_end = time.perf_counter()
        return out

    def call_counts(self) -> tuple[int, int]:
        """(spinning, not) model calls so far, the lone request's session included."""
        if self._lone is None:
            return self.hot_calls, self.cold_calls
        hot, cold = self._lone.call_counts()
        return self.hot_calls + hot, self.cold_calls + cold

    def run_lone(self, x: np.ndarray) -> np.ndarray:
        """A call that runs alone (nothing else running or queued): on the session with every usable
        thread where the instances' sessions have fewer (``lone_threads``), else ``run``."""
        return self.run(x) if self._lone is None else self._lone.run(x)

    def _relaxed(self, model: Path, runtime: str, options: dict) -> Classifier | None:
        from .onnx_batch import relax_batch_file

        self._tmp = tempfile.TemporaryDirectory(prefix="edgecnn-serve-")
        try:
            path = relax_batch_file(model, Path(self._tmp.name) / model.name)
            clf = Classifier(path, runtime=runtime, **options)
            # The relaxed copy must give the same logits as the original, row by row.
            x = self.clf.runtime.dummy_input(3)
            x = (np.random.default_rng(0).standard_normal(x.shape).astype(np.float32) if x.dtype == np.float32
                 else np.random.default_rng(0).integers(0, 256, x.shape, dtype=np.uint8))
            if np.allclose(clf.run(x), self.clf.run(x), rtol=1e-4, atol=1e-5):
                return clf
            clf.close()
        except (InvalidModelError, InvalidInputError):
            pass
        self._tmp.cleanup()
        self._tmp = None
        return None

    def metadata(self, cfg) -> dict:
        """The v2 model metadata: ``platform`` names the model format, ``parameters`` holds only strings,
        numbers and booleans (class names as a JSON string; unknown values left out)."""
        rt = self.clf.runtime
        inputs = [{"name": self.input_name, "datatype": self.input_datatype, "shape": [-1, *self.input_dims]},
                  {"name": IMAGES_INPUT, "datatype": "BYTES", "shape": [-1]}]
        outputs = [{"name": o, "datatype": "FP32", "shape": [-1, self.num_classes]} for o in self.outputs]
        suffix = self.model_path.suffix.lower()
        platform = {".onnx": "onnx_onnxv1", ".xml": "openvino_ir"}.get(suffix, f"edgecnn_{rt.name}")
        params = {"runtime": rt.describe(), "runtime_name": rt.name,
                  "precision": getattr(self.deployable, "precision", None),
                  "threads": self.threads, "lone_threads": self.lone_threads,
                  "spinning": self.spinning,
                  "class_names": json.dumps(list(self.clf.class_names)),
                  "max_batch_size": cfg.max_batch, "max_delay_ms": cfg.max_delay_ms,
                  "instances": cfg.instances, "call_rows": cfg.rows_per_call,
                  "max_queue_rows": getattr(cfg, "queue_rows", None),
                  "batching": self.batching}
        params = {k: v for k, v in params.items() if isinstance(v, (str, int, float, bool))}
        return {"name": self.name, "versions": [MODEL_VERSION], "platform": platform,
                "inputs": inputs, "outputs": outputs, "parameters": params}

    def decode_images(self, blobs: list[bytes], max_total_pixels: int = MAX_REQUEST_PIXELS) -> np.ndarray:
        """Encoded image files (JPEG, PNG, ...) -> the model's input batch, exactly as Classifier.preprocess
        makes it. Every image's size is read from its header first (nothing decoded): one over MAX_PIXELS,
        or all together over ``max_total_pixels``, is refused with 413. Then one image at a time is decoded
        and at once resized to the input size, so a request holds at most one full-size image."""
        from PIL import Image, UnidentifiedImageError

        bad = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError,
               EOFError, InvalidInputError)
        total = 0
        for i, b in enumerate(blobs):
            try:
                with Image.open(io.BytesIO(b)) as im:
                    w, h = im.size
            except bad:
                raise ProtocolError(f"image {i} is not a decodable image file") from None
            if w * h > MAX_PIXELS:
                raise ProtocolError(f"image {i} is too large ({w}x{h}, over {MAX_PIXELS} pixels)", 413)
            total += w * h
            if total > max_total_pixels:
                raise ProtocolError(f"the request's images decode to more than {max_total_pixels} pixels "
                                    f"(the per-request budget, {max_total_pixels / 1e6:.0f} MPixel): "
                                    "send fewer or smaller images per request", 413)
        size = self.clf.input_size
        rows = np.empty((len(blobs), size, size, 3), np.uint8)
        for i, b in enumerate(blobs):
            try:
                with Image.open(io.BytesIO(b)) as im:
                    im.load()
                    rows[i] = to_rgb_uint8(im, size)
            except bad:
                raise ProtocolError(f"image {i} is not a decodable image file") from None
        return self.clf.model_input(rows)

    def the_input(self, req) -> InputTensor:
        """The request's one input, checked by name, datatype and shape (an images tensor: BYTES [N] or [N,1])."""
        if len(req.inputs) != 1:
            raise ProtocolError(f"give exactly one input ({self.input_name!r} or {IMAGES_INPUT!r}), "
                                f"got {len(req.inputs)}")
        t = req.inputs[0]
        if t.name == IMAGES_INPUT:
            if t.datatype != "BYTES":
                raise ProtocolError(f"input {IMAGES_INPUT!r} must be BYTES (encoded image files), got {t.datatype}")
            if not (len(t.shape) == 1 or (len(t.shape) == 2 and t.shape[1] == 1)) or t.shape[0] < 1:
                raise ProtocolError(f"input {IMAGES_INPUT!r} must have shape [N] or [N,1] with N >= 1, "
                                    f"got {list(t.shape)}")
            return t
        if t.name != self.input_name:
            raise ProtocolError(f"unknown input {t.name!r}; this model takes {self.input_name!r} "
                                f"({self.input_datatype} {[-1, *self.input_dims]}) or {IMAGES_INPUT!r} (BYTES)")
        if t.datatype != self.input_datatype:
            raise ProtocolError(f"input {t.name!r} must be {self.input_datatype}, got {t.datatype}")
        if len(t.shape) != 4 or tuple(t.shape[1:]) != self.input_dims or t.shape[0] < 1:
            raise ProtocolError(f"input {t.name!r} must have shape [N, {', '.join(map(str, self.input_dims))}] "
                                f"with N >= 1, got {list(t.shape)}")
        return t

    @staticmethod
    def tensor_input(t: InputTensor) -> np.ndarray:
        """The model's own tensor (checked by ``the_input``) -> the batch to run; NaN/Inf refused."""
        x = t.data
        if not x.flags.aligned:  # binary data at an odd offset in the body: numpy's loops on it (and its own
            # copy) run ~8x slower than a byte copy to an aligned buffer (~20 us against ~2.5 us at 1x3x64x64)
            x = np.frombuffer(bytearray(x.reshape(-1).view(np.uint8)), x.dtype).reshape(x.shape)
        if x.dtype == np.float32 and not np.isfinite(x).all():
            raise ProtocolError(f"input {t.name!r} contains NaN or Inf")
        return np.ascontiguousarray(x, dtype=x.dtype.newbyteorder("="))

    def output_tensors(self, req, logits: np.ndarray) -> list[OutputTensor]:
        """The requested outputs (names already checked) of one request's logits."""
        wanted = req.outputs
        if wanted is None:
            wanted = [RequestedOutput(o, req.binary_default) for o in self.outputs]
        out = []
        probs = None
        for w in wanted:
            if w.name == "probabilities" and not self.clf.embedded_softmax:
                if probs is None:
                    probs = softmax(logits.astype(np.float32))
                values = probs
            else:
                values = logits
            if w.classification:
                labels = classification(values, w.classification, self.clf.class_names)
                k = len(labels) // values.shape[0]
                out.append(OutputTensor(w.name, "BYTES", (values.shape[0], k), labels, w.binary))
            else:
                out.append(OutputTensor(w.name, "FP32", tuple(values.shape), values, w.binary))
        return out

    def close(self) -> None:
        self.clf.close()
        if self._hot is not None:
            self._hot.close()
        if self._lone is not None:
            self._lone.close()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
