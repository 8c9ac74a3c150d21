#!/usr/bin/env python3
"""Classify images with this bundle's model: python predict.py PATH... [-o out.csv] (numpy, Pillow, and
onnxruntime or, for a bundle of a tuned OpenVINO configuration, openvino)."""

# This file is copied verbatim into every `edgecnn package` bundle as predict.py. It imports nothing
# from edgecnn: the preprocessing is edgecnn_preprocess.py beside it, generated from the installed
# edgecnn.runtimes.preprocess, so the device runs the same code as edgecnn's Classifier; the bulk
# pipeline (folders, globs, lists, parallel decode, result tables) is edgecnn_pipeline.py and
# edgecnn_tables.py, generated the same way from edgecnn.runtimes.pipeline and .tables.

from __future__ import annotations

import argparse
import json
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = "manifest.json"
# The bundle's own code, checked against the manifest before it runs (the model and labels: by edgecnn_deploy).
CODE_FILES = ("edgecnn_preprocess.py", "edgecnn_pipeline.py", "edgecnn_tables.py", "edgecnn_cpu.py",
              "edgecnn_deploy.py")
EXIT_BAD_INPUT, EXIT_UNAVAILABLE = 2, 3


class BundleError(Exception):
    """A problem with the bundle (missing/altered file) or the environment, with its exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_BAD_INPUT):
        super().__init__(message)
        self.exit_code = exit_code


def _usable_cpus() -> int:
    """CPUs this process may use (affinity mask, cgroup quota): the bundle's copy of edgecnn.runtimes.cpu."""
    _preprocess_module()  # puts the bundle folder on sys.path
    import edgecnn_cpu

    return edgecnn_cpu.usable_cpus()


def _preprocess_module():
    sys.dont_write_bytecode = True  # keep the bundle folder exactly as its manifest lists it
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import edgecnn_preprocess

    return edgecnn_preprocess


class BundleModel:
    """One model of the bundle on ONNX Runtime CPU (or OpenVINO, for a tuned bundle), with its labels and preprocessing."""

    def __init__(self, folder: Path = HERE, model: str | None = None, threads: int | None = None,
                 spinning: bool | None = None):
        """``threads``: runtime threads; default: the tuned count the bundle records, else 1 (decoding
        needs the cores). ``spinning``: ORT's intra-op spinning, over what the bundle records. Refuses
        (exit 2) a bundle whose model, labels or code differ from the manifest."""
        folder = Path(folder)
        self.pre = _preprocess_module()  # puts the bundle folder on sys.path (edgecnn_deploy, edgecnn_cpu)
        import edgecnn_deploy

        try:
            d = edgecnn_deploy.resolve(folder, model)  # the one reader edgecnn's commands use too
            edgecnn_deploy.check_files(folder, d.manifest, [f for f in CODE_FILES if f in d.manifest["files"]])
        except edgecnn_deploy.DeployableError as e:
            raise BundleError(str(e)) from None
        usable = _usable_cpus()
        # An explicit count, never the runtime's own (it sees neither the affinity mask nor a cgroup quota);
        # a tuned count was capped at the CPUs here by resolve (it may come from a bigger machine).
        threads = min(threads, usable) if threads else (d.threads or 1)
        self.deployable, self.threads = d, threads
        if d.runtime == "openvino":
            meta, in_type, in_shape = self._load_openvino(d.model, d.precision, d.options, threads)
        elif d.runtime == "ort-cpu":
            opts = d.options if spinning is None else {**d.options, "spinning": spinning}
            meta, in_type, in_shape = self._load_ort(d.model, threads, opts)
        else:
            raise BundleError(f"{folder}: runtime {d.runtime!r} is not one a bundle runs (ort-cpu, openvino)")
        # The one validator of class names and mean/std (edgecnn_preprocess.py is edgecnn's own preprocess).
        try:
            self.labels = list(self.pre.check_class_names(
                (folder / "labels.txt").read_text(encoding="utf-8").splitlines(), "labels.txt"))
            self.mean = list(self.pre.check_norm(json.loads(meta["mean"]) if "mean" in meta
                                                 else self.pre.DEFAULT_MEAN, "the model's mean"))
            self.std = list(self.pre.check_norm(json.loads(meta["std"]) if "std" in meta
                                                else self.pre.DEFAULT_STD, "the model's std", positive=True))
        except (ValueError, self.pre.InvalidInputError) as e:
            raise BundleError(f"{folder}: {e}") from None
        self.uint8 = in_type == "uint8"  # preprocessing embedded in the graph: feed RGB pixels
        self.softmax_inside = meta.get("embedded_softmax") == "1"
        self.size = int(in_shape[1] if self.uint8 else in_shape[2])
        self.fixed_batch = in_shape[0] if isinstance(in_shape[0], int) else None
        self.class_names = self.labels
        self.input_size = self.size

    def _load_ort(self, path: Path, threads, options: dict):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BundleError("onnxruntime is not installed: pip install -r requirements.txt",
                              EXIT_UNAVAILABLE) from None
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        if options.get("spinning") is not None:
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if options["spinning"] else "0")
        self.session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        self._infer = lambda x: self.session.run(None, {self.input_name: x})[0]
        return meta, "uint8" if inp.type == "tensor(uint8)" else "float32", list(inp.shape)

    def _load_openvino(self, path: Path, precision: str, opts: dict, threads):
        """The tuned OpenVINO configuration of the bundle's deploy settings (precision, hint, threads, ...)."""
        try:
            import openvino as ov
        except ImportError:
            raise BundleError("openvino is not installed: pip install -r requirements.txt",
                              EXIT_UNAVAILABLE) from None
        core = ov.Core()
        model = core.read_model(str(path))
        hints = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
        if precision not in hints:
            raise BundleError(f"precision {precision!r} of this bundle is not one OpenVINO runs ({', '.join(hints)})")
        config = {"INFERENCE_PRECISION_HINT": hints[precision]}
        if opts.get("hint"):
            config["PERFORMANCE_HINT"] = str(opts["hint"]).upper()
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        if opts.get("hyper_threading") is not None:
            config["ENABLE_HYPER_THREADING"] = bool(opts["hyper_threading"])
        compiled = core.compile_model(model, str(opts.get("device", "CPU")).upper(), config)
        meta = {}
        try:
            info = model.get_rt_info()
            if "framework" in list(info):
                meta = {str(k): v.astype(str) if hasattr(v, "astype") else str(v)
                        for k, v in dict(info["framework"]).items()}
        except Exception:  # noqa: BLE001 - no metadata: defaults below
            meta = {}
        port = compiled.inputs[0]
        pshape = port.get_partial_shape()
        shape = [d.get_length() if d.is_static else None for d in pshape]
        in_type = "uint8" if port.get_element_type().get_type_name() == "u8" else "float32"
        self._ov_local = threading.local()

        def infer(x):
            req = getattr(self._ov_local, "request", None)
            if req is None:
                req = self._ov_local.request = compiled.create_infer_request()
            req.infer({0: x})
            return req.get_output_tensor(0).data.copy()

        self._infer = infer
        return meta, in_type, shape

    def probabilities(self, images: list):
        """Images (paths, PIL images, uint8 arrays) -> float32 probabilities (N, classes)."""
        return self.probabilities_from_pixels(self.pre.to_batch_uint8(images, self.size))

    def probabilities_from_pixels(self, rgb):
        """uint8 RGB (N, size, size, 3), as to_rgb_uint8 gives -> float32 probabilities (N, classes)."""
        import numpy as np

        x = rgb if self.uint8 else self.pre.normalize(rgb, self.mean, self.std)
        step = self.fixed_batch or len(x)
        out = np.concatenate([self._infer(x[i : i + step]) for i in range(0, len(x), step)])
        return out if self.softmax_inside else self.pre.softmax(out)

    def classify(self, images: list, top_k: int = 1) -> list[list[tuple[str, float]]]:
        import numpy as np

        res = []
        for p in self.probabilities(images):
            idx = np.argsort(-p, kind="stable")[:top_k]
            res.append([(self.labels[i], float(p[i])) for i in idx])
        return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Classify images: one line per image (file, top label, probability), "
                                             "or with -o a table of rows (.csv, .jsonl, .parquet).")
    ap.add_argument("images", nargs="+", metavar="PATH",
                    help="image files, folders (recursive), globs, or .txt files listing one path a line")
    ap.add_argument("--model", default=None, help="which model of the bundle (default: the manifest's default)")
    ap.add_argument("--top-k", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="runtime threads (default: the tuned count the bundle records, else 1: decoding needs the cores)")
    ap.add_argument("-o", "--output", default=None, help="write rows to .csv, .jsonl or .parquet (needs pyarrow)")
    ap.add_argument("--resume", action="store_true", help="continue -o FILE, skipping the paths already in it")
    ap.add_argument("--force", action="store_true", help="replace an existing -o FILE")
    ap.add_argument("--fast-decode", action="store_true", help="decode JPEGs at reduced scale (faster, not bit-exact)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="decode threads (default: one per core)")
    args = ap.parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1 or (args.workers is not None and args.workers < 1) or (
            args.threads is not None and args.threads < 1):
        ap.error("--top-k, --batch-size, --workers and --threads must be >= 1")
    if args.resume and not args.output:
        ap.error("--resume needs -o FILE")
    try:
        clf = BundleModel(HERE, args.model, args.threads)
    except BundleError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return e.exit_code
    import signal

    import edgecnn_pipeline as pipe
    import edgecnn_tables as tables

    def on_term(signum, frame):  # SIGTERM ends the run like Ctrl-C: the table keeps the rows done so far
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    table = None
    failed = 0
    try:
        if args.output:
            table = tables.open_table(args.output, pipe.columns(args.top_k), resume=args.resume, force=args.force)
        done = table.done if table is not None else ()
        paths = (p for p in pipe.iter_paths(args.images) if p not in done) if len(done) else pipe.iter_paths(args.images)
        # decode workers and runtime threads: what is given (--workers, --threads, a tuned count) is kept,
        # the rest measured on the first files and chosen, as `edgecnn predict` does
        given_threads = clf.threads if (args.threads or clf.deployable.threads) else None
        split = pipe.plan_split(paths, clf, cpus=_usable_cpus(), workers=args.workers, threads=given_threads,
                                model_threads=clf.threads, fast_jpeg=args.fast_decode, batch_size=args.batch_size,
                                files_left=pipe.count_paths(args.images) - len(done))
        if split.threads != clf.threads:  # opened on 1 thread to be measured: reopen on the choice
            clf = BundleModel(HERE, args.model, split.threads,
                              spinning=False if clf.deployable.runtime == "ort-cpu" else None)
        if split.chosen and not split.reason:
            print(f"predict.py: note: {split.note()}", file=sys.stderr)
        for rows in pipe.predict_rows(paths, clf, top_k=args.top_k, batch_size=args.batch_size,
                                      workers=split.workers, fast_jpeg=args.fast_decode, first=split.head):
            if table is not None:
                table.write(rows)
            for r in rows:
                if r["error"] is not None:
                    failed += 1
                    print(f"predict.py: error: {r['path']}: {r['error']}", file=sys.stderr)
                elif table is None:
                    preds = [(r[f"label_{i}"], r[f"prob_{i}"]) for i in range(1, args.top_k + 1)
                             if r[f"label_{i}"] is not None]
                    print("\t".join([r["path"]] + [f"{label}\t{p:.6f}" for label, p in preds]))
    except BundleError as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return e.exit_code
    except (clf.pre.InvalidInputError, tables.MissingDependencyError) as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return EXIT_UNAVAILABLE if isinstance(e, tables.MissingDependencyError) else EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("predict.py: interrupted" + (f"; rows so far are in {args.output} (--resume continues)"
                                           if table is not None else ""), file=sys.stderr)
        return 130
    finally:
        if table is not None:
            table.close()
    return EXIT_BAD_INPUT if failed else 0


if __name__ == "__main__":
    sys.exit(main())
