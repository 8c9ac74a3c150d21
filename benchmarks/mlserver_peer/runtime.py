"""MLServer peer for benchmarks/serve_load.py: the same ONNX file on onnxruntime, inside MLServer.

Runs in MLServer's own virtual environment (its dependencies conflict with edgecnn's), so it imports
nothing from edgecnn. serve_load.py copies this file into the model folder it gives `mlserver start`
and points model-settings.json at ``runtime.OnnxPeer``, with:

- ``parameters.uri``: the ONNX file (the batch-relaxed copy `edgecnn serve` runs, so a batch is one call);
- ``parameters.extra.threads`` / ``spinning``: the session options `edgecnn serve` uses on ort-cpu under load
  (intra-op threads, intra-op spinning), so both servers run the same session configuration;
- ``max_batch_size`` / ``max_batch_time``: MLServer's adaptive batching, which merges the queued
  requests into one InferenceRequest before ``predict`` sees it and splits the response afterwards.

``predict`` decodes the first input with NumpyCodec (the v2 JSON ``data`` list, reshaped to ``shape``),
runs the session on one worker thread (so the event loop keeps reading requests while a batch runs,
and batches run one at a time, like `edgecnn serve --instances 1`) and returns ``logits`` [n, classes]
encoded by NumpyCodec (flattened ``data``, which MLServer's batcher needs to split the answer).
``GET /peer-stats`` (a custom handler) gives the calls, rows and seconds spent so far, so the benchmark
can tell the mean batch MLServer formed and the model's share of each phase.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.handlers import custom_handler
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxPeer(MLModel):
    async def load(self) -> bool:
        params = self.settings.parameters
        extra = (params.extra if params is not None else None) or {}
        uri = params.uri if params is not None else None
        if not uri:
            raise ValueError("model-settings.json: parameters.uri must name the ONNX file")
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(extra.get("threads", 1))
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if extra.get("spinning") else "0")
        self._session = ort.InferenceSession(uri, sess_options=so, providers=["CPUExecutionProvider"])
        self._input = self._session.get_inputs()[0].name
        self._output = self._session.get_outputs()[0].name
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="onnx-peer")
        self._stats = {"calls": 0, "rows": 0, "run_s": 0.0, "predict_s": 0.0}
        return True

    def _run(self, x: np.ndarray) -> np.ndarray:
        t = time.perf_counter()
        out = self._session.run([self._output], {self._input: x})[0]
        self._stats["run_s"] += time.perf_counter() - t
        return out

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        t = time.perf_counter()
        x = np.ascontiguousarray(NumpyCodec.decode_input(payload.inputs[0]), dtype=np.float32)
        logits = await asyncio.get_running_loop().run_in_executor(self._pool, self._run, x)
        resp = InferenceResponse(model_name=self.name, model_version=self.version,
                                 outputs=[NumpyCodec.encode_output("logits", np.asarray(logits, np.float32))])
        st = self._stats
        st["calls"] += 1
        st["rows"] += int(x.shape[0])
        st["predict_s"] += time.perf_counter() - t
        return resp

    @custom_handler(rest_path="/peer-stats", rest_method="GET")
    async def peer_stats(self) -> dict:
        return dict(self._stats)

    async def unload(self) -> bool:
        self._pool.shutdown(wait=False)
        return True
