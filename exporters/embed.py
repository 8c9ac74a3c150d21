"""Preprocessing inside the graph: uint8 RGB HWC in -> Cast, /255, (x - mean) / std, Transpose (+ Softmax)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgecnn.errors import InvalidModelError

EMBED_INPUT = "image"  # uint8 [N, H, W, 3], RGB, as cameras and Pillow give it
PROB_OUTPUT = "probabilities"
LAYOUT = "NHWC-uint8"


def embed_preprocessing(model, mean: Sequence[float], std: Sequence[float], softmax: bool = False) -> str:
    """Rewrite ``model`` (an onnx ModelProto with one float NCHW input) in place; return a one-line note.

    The new input is uint8 [N, H, W, 3]; standard ONNX ops (Cast, Div, Sub, Div, Transpose) compute
    exactly what ``edgecnn.runtimes.preprocess.normalize`` computes in numpy, in the same order,
    so the two paths agree to the last bit or close to it. ``softmax`` appends Softmax on the logits.
    """
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    if len(g.input) != 1 or len(g.output) != 1:
        raise InvalidModelError("embedding preprocessing needs a model with one input and one output")
    old = g.input[0]
    tt = old.type.tensor_type
    if tt.elem_type != TensorProto.FLOAT or len(tt.shape.dim) != 4:
        raise InvalidModelError("embedding preprocessing needs a float32 (N,3,H,W) input")
    n, c, h, w = tt.shape.dim
    if c.dim_value != 3 or h.dim_value < 1 or w.dim_value < 1:
        raise InvalidModelError("embedding preprocessing needs a fixed (N,3,H,W) input with 3 channels")
    batch = n.dim_param if n.dim_param else n.dim_value
    inner = "normalized_nchw"
    for node in g.node:
        for i, name in enumerate(node.input):
            if name == old.name:
                node.input[i] = inner
    consts = [
        numpy_helper.from_array(np.array(255.0, np.float32), "pre_scale"),
        numpy_helper.from_array(np.asarray(mean, np.float32).reshape(3), "pre_mean"),
        numpy_helper.from_array(np.asarray(std, np.float32).reshape(3), "pre_std"),
    ]
    g.initializer.extend(consts)
    pre = [
        helper.make_node("Cast", [EMBED_INPUT], ["pre_float"], to=TensorProto.FLOAT, name="pre_cast"),
        helper.make_node("Div", ["pre_float", "pre_scale"], ["pre_unit"], name="pre_scale_1_255"),
        helper.make_node("Sub", ["pre_unit", "pre_mean"], ["pre_centered"], name="pre_sub_mean"),
        helper.make_node("Div", ["pre_centered", "pre_std"], ["pre_normed"], name="pre_div_std"),
        helper.make_node("Transpose", ["pre_normed"], [inner], perm=[0, 3, 1, 2], name="pre_hwc_to_chw"),
    ]
    for i, node in enumerate(pre):
        g.node.insert(i, node)
    new_in = helper.make_tensor_value_info(EMBED_INPUT, TensorProto.UINT8, [batch, h.dim_value, w.dim_value, 3])
    g.input.remove(old)
    g.input.append(new_in)
    note = f"input {EMBED_INPUT} uint8 [{batch},{h.dim_value},{w.dim_value},3] (Cast, /255, mean/std, Transpose)"
    if softmax:
        out = g.output[0]
        new_out = helper.make_tensor_value_info(PROB_OUTPUT, TensorProto.FLOAT,
                                                [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim])
        g.node.append(helper.make_node("Softmax", [out.name], [PROB_OUTPUT], axis=1, name="post_softmax"))
        g.output.remove(out)
        g.output.append(new_out)
        note += "; output probabilities (Softmax)"
    return note


def embedded_metadata(softmax: bool) -> dict[str, str]:
    """The metadata a runtime, the Classifier and a bundle's predict.py read to feed the model."""
    return {"input_layout": LAYOUT, "embedded_preprocessing": "1", "embedded_softmax": "1" if softmax else "0"}
