"""The arithmetic around the network as two small ONNX graphs, built from the model card: the one home of
what the server (`Predictor`) and the web page's private mode (ONNX Runtime Web) both run.

- `before` (`prepare_graph`): the decoded photo, uint8 (H, W, 3) upright RGB -> `image` (1, 3, S, S) float32
  network input (shorter side resized to S, antialiased bilinear; centre square; black outside its
  inscribed circle and Shades-of-Gray colour constancy if the card asks; mean/std), `square` uint8
  (S, S, 3), and `measures` (6,): the quality gate's pixel measures in `MEASURES` order. The web page
  hands it the decoded photo, bounded by the decoder to a shorter side of at most
  `preprocess.DECODE_SIDE_FACTOR` x S (private.js `boundedSize`, after the reduction Pillow's JPEG draft
  makes on the server); the server hands it the square Pillow has already resized
  (`preprocess.resize_for_model`, which training uses too), so the graph's resize is the identity there
  and the server's predictions stay those of the NumPy code. ONNX Runtime's antialiased resize differs
  from Pillow's by rounding (at most 8 levels on under 0.5% of the pixels of phone photos;
  tests/test_graphs.py).
- `after` (`finish_graph`): the network's `logit` (N,), `embedding` (N, D), `cam` (N, h, w), the photos'
  `shorter_side` (N,) (0: unknown) and `measures` (N, 6) -> `probability` (calibrated per detected photo type),
  `threshold`, `is_phone`, `ood_score` (-1: the card has no fitted check), `problems` (N, 6) booleans in
  `quality.PROBLEM_ORDER`, and `influence` (N, h, w), what the heatmap draws (`explain.influence`).

The NumPy functions they mirror (`preprocess.normalise`, `quality.pixel_measures`, `OodDetector.scores`,
`PhotoTypes`, `QualityGate._report`, `explain.influence`) stay for training and fitting, where photos are
augmented in batches; tests/test_graphs.py checks that graph and NumPy agree. Building needs the `onnx`
package; running needs only ONNX Runtime.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .phototype import PhotoTypes
from .preprocess import PreprocessSpec, disc_mask
from .quality import BLUR_WINDOW, WORK_SIZE, QualityGate

OPSET = 18  # Resize's `antialias` (Pillow-like downscaling) needs opset 18
MEASURES = ("sharpness", "brightness", "bright_end", "dark_clipped", "bright_clipped", "colour")
PROBLEM_ORDER = ("too_small", "too_dark", "overexposed", "blurred", "no_colour", "not_a_lesion")


class _Graph:
    """A few helpers over onnx.helper: nodes with generated names, constants as initialisers."""

    def __init__(self) -> None:
        import onnx
        from onnx import helper, numpy_helper

        self.onnx, self.helper, self.numpy_helper = onnx, helper, numpy_helper
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def const(self, value: Any, dtype: Any = np.float32) -> str:
        self._n += 1
        name = f"c{self._n}"
        self.inits.append(self.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: Any) -> str:
        self._n += 1
        name = out or f"t{self._n}"
        self.nodes.append(self.helper.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def ops(self, op_type: str, inputs: list[str], n_out: int, **attrs: Any) -> list[str]:
        self._n += 1
        names = [f"t{self._n}_{i}" for i in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, inputs, names, **attrs))
        return names

    def cast(self, x: str, to: str) -> str:
        return self.op("Cast", x, to=getattr(self.onnx.TensorProto, to))

    def model(self, name: str, inputs: list, outputs: list, doc: str) -> Any:
        graph = self.helper.make_graph(self.nodes, name, inputs, outputs, self.inits, doc_string=doc)
        model = self.helper.make_model(graph, opset_imports=[self.helper.make_opsetid("", OPSET)])
        model.ir_version = 8  # what ONNX Runtime Web and older runtimes read
        model.producer_name = "skinscan.graphs"
        self.onnx.checker.check_model(model)
        return model

    def io(self, name: str, dtype: str, shape: list) -> Any:
        return self.helper.make_tensor_value_info(name, getattr(self.onnx.TensorProto, dtype), shape)

    # reductions of a whole tensor to a scalar
    def total(self, x: str, op: str = "ReduceSum") -> str:
        return self.op(op, x, keepdims=0)

    def kth_largest(self, flat: str, k: int) -> str:
        """The k-th largest value of a 1-D tensor (k >= 1): np.partition's (n - k)-th smallest."""
        values, _ = self.ops("TopK", [flat, self.const([k], np.int64)], 2, largest=1, sorted=1)
        return self.op("ReduceMin", values, keepdims=0)


def prepare_graph(spec: PreprocessSpec) -> Any:
    """The `before` graph for `spec` (see the module docstring)."""
    if spec.resize != "shorter-side-then-center-crop" or spec.interpolation != "bilinear":
        raise ValueError(
            f"the graphs implement bilinear shorter-side resizing only, not {spec.resize}/{spec.interpolation}"
        )
    if spec.size != WORK_SIZE:
        raise ValueError(f"the graphs measure quality on the model's square: size {WORK_SIZE}, not {spec.size}")
    g = _Graph()
    s = spec.size
    # sizes: shorter side -> S (Python's round: half to even, as ONNX Round), then a centre square
    hw = g.op("Slice", g.op("Shape", "pixels"), g.const([0], np.int64), g.const([2], np.int64))
    hw_d = g.cast(hw, "DOUBLE")
    scale = g.op("Div", g.const(float(s), np.float64), g.op("ReduceMin", hw_d, keepdims=1))
    new_hw = g.op("Max", g.cast(g.op("Round", g.op("Mul", hw_d, scale)), "INT64"), g.const([s, s], np.int64))
    sizes = g.op("Concat", new_hw, g.const([3], np.int64), axis=0)
    resized = g.op(
        "Resize", "pixels", "", "", sizes, mode="linear", antialias=1, coordinate_transformation_mode="half_pixel"
    )
    start = g.op("Div", g.op("Sub", new_hw, g.const([s, s], np.int64)), g.const([2, 2], np.int64))
    square = g.op(
        "Slice", resized, start, g.op("Add", start, g.const([s, s], np.int64)), g.const([0, 1], np.int64), out="square"
    )

    # network input: the mask, colour constancy, then (v - mean) / std, as preprocess.normalise's tables
    seen = square
    if spec.mask == "disc":
        seen = g.op("Mul", square, g.const(disc_mask(s)[:, :, None], np.uint8))
    elif spec.mask != "none":
        raise ValueError(f"unknown mask {spec.mask!r}")
    x = g.cast(seen, "FLOAT")
    if spec.color_constancy == "shades-of-gray":
        power = 6.0
        mean_power = g.op(
            "ReduceMean",
            g.op("Pow", g.cast(seen, "DOUBLE"), g.const(power, np.float64)),
            g.const([0, 1], np.int64),
            keepdims=0,
        )
        illuminant = g.op("Max", g.op("Pow", mean_power, g.const(1.0 / power, np.float64)), g.const(1e-3, np.float64))
        illuminant = g.cast(illuminant, "FLOAT")
        gains = g.op("Div", g.op("ReduceMean", illuminant, keepdims=1), illuminant)
        x = g.op("Clip", g.op("Mul", x, gains), g.const(0.0), g.const(255.0))
    elif spec.color_constancy != "none":
        raise ValueError(f"unknown colour constancy {spec.color_constancy!r}")
    mean = g.const(np.asarray(spec.mean, np.float32) * np.float32(255.0))
    std = g.const(np.asarray(spec.std, np.float32) * np.float32(255.0))
    chw = g.op("Transpose", g.op("Div", g.op("Sub", x, mean), std), perm=[2, 0, 1])
    g.op("Unsqueeze", chw, g.const([0], np.int64), out="image")

    # the quality gate's pixel measures on the square (quality.pixel_measures)
    f = g.cast(square, "FLOAT")
    r, gr, b = g.ops("Split", [f, g.const([1, 1, 1], np.int64)], 3, axis=2)
    luma = g.op(
        "Add",
        g.op("Add", g.op("Mul", r, g.const(0.299)), g.op("Mul", gr, g.const(0.587))),
        g.op("Mul", b, g.const(0.114)),
    )
    grey = g.op("Reshape", luma, g.const([s, s], np.int64))
    blur = g.op("Max", _blur_effect(g, grey, 0), _blur_effect(g, grey, 1))
    sharpness = g.op("Sub", g.const(1.0), blur)
    flat = g.op("Reshape", grey, g.const([-1], np.int64))
    n = s * s
    brightness = g.total(flat, "ReduceMean")
    bright_end = g.kth_largest(flat, n - int(0.95 * (n - 1)))
    dark = g.total(g.cast(g.op("LessOrEqual", flat, g.const(10.0)), "FLOAT"), "ReduceMean")
    bright = g.total(g.cast(g.op("GreaterOrEqual", flat, g.const(250.0)), "FLOAT"), "ReduceMean")
    spread = g.op("Sub", g.op("Max", r, gr, b), g.op("Min", r, gr, b))
    colour = g.kth_largest(g.op("Reshape", spread, g.const([-1], np.int64)), n - int(0.99 * (n - 1)))
    scalars = [sharpness, brightness, bright_end, dark, bright, colour]
    g.op("Concat", *[g.op("Reshape", v, g.const([1], np.int64)) for v in scalars], axis=0, out="measures")
    return g.model(
        "skinscan_before",
        [g.io("pixels", "UINT8", ["height", "width", 3])],
        [g.io("image", "FLOAT", [1, 3, s, s]), g.io("square", "UINT8", [s, s, 3]), g.io("measures", "FLOAT", [6])],
        "decoded photo -> network input, model square, quality measures (skinscan.graphs)",
    )


def _blur_effect(g: _Graph, grey: str, axis: int) -> str:
    """Crete et al.'s blur along one axis (quality._blur_effect): box re-blur with edge padding, then the
    share of neighbour-to-neighbour variation that survives it, on the inner part away from the border."""
    h = BLUR_WINDOW
    pad = h // 2
    pads = [pad, 0, h - 1 - pad, 0] if axis == 0 else [0, pad, 0, h - 1 - pad]
    padded = g.op("Pad", grey, g.const(pads, np.int64), mode="edge")
    kernel = [h, 1] if axis == 0 else [1, h]
    four = g.op("Unsqueeze", padded, g.const([0, 1], np.int64))
    box = g.op("Squeeze", g.op("AveragePool", four, kernel_shape=kernel), g.const([0, 1], np.int64))

    def absdiff(x: str) -> str:
        n = WORK_SIZE
        first = g.op("Slice", x, g.const([1], np.int64), g.const([n], np.int64), g.const([axis], np.int64))
        rest = g.op("Slice", x, g.const([0], np.int64), g.const([n - 1], np.int64), g.const([axis], np.int64))
        d = g.op("Abs", g.op("Sub", first, rest))
        # inner part: [h:-h] on both axes
        return g.op("Slice", d, g.const([h, h], np.int64), g.const([-h, -h], np.int64), g.const([0, 1], np.int64))

    d = absdiff(grey)
    total = g.total(d)
    lost = g.total(g.op("Relu", g.op("Sub", d, absdiff(box))))
    ratio = g.op("Div", g.op("Sub", total, lost), g.op("Max", total, g.const(1e-30)))
    return g.op("Where", g.op("LessOrEqual", total, g.const(1e-6)), g.const(1.0), ratio)


def finish_graph(card: Any, embedding_dim: int) -> Any:
    """The `after` graph for a model card (see the module docstring)."""
    g = _Graph()
    logit = g.cast("logit", "DOUBLE")
    types = PhotoTypes.from_card(card)
    gate = QualityGate.from_card(card)
    extra = card if isinstance(card, dict) else {**card.model_dump(), **(card.model_extra or {})}
    emb = "embedding"
    relu = g.op("Relu", emb)

    # photo type (phototype.PhotoTypes.detect, in float64 as there) and the calibration it picks
    if types is not None:
        feats = g.cast(g.op("Sqrt", relu), "DOUBLE")  # sqrt in float32, the product in float64: as PhotoTypes
        score = g.op(
            "Add",
            g.op("MatMul", feats, g.const(types.weights.astype(np.float64), np.float64)),
            g.const(types.bias, np.float64),
        )
        is_phone = g.op("Greater", score, g.const(types.boundary, np.float64))
        temperature = g.op(
            "Where",
            is_phone,
            g.const(types.temperatures["phone"], np.float64),
            g.const(types.temperatures["dermoscopic"], np.float64),
        )
        threshold = g.op(
            "Where",
            is_phone,
            g.const(types.thresholds["phone"], np.float64),
            g.const(types.thresholds["dermoscopic"], np.float64),
        )
    else:  # one temperature for every photo
        is_phone = g.op("Less", g.op("Mul", logit, g.const(0.0, np.float64)), g.const(-1.0, np.float64))  # all False
        temperature = g.const(float(extra["temperature"]), np.float64)
        threshold = g.op(
            "Add", g.op("Mul", logit, g.const(0.0, np.float64)), g.const(float(extra["threshold"]), np.float64)
        )
    g.op("Identity", is_phone, out="is_phone")
    g.op("Cast", g.op("Sigmoid", g.op("Div", logit, temperature)), out="probability", to=g.onnx.TensorProto.DOUBLE)
    g.op("Identity", threshold, out="threshold")

    # out-of-distribution score (quality.OodDetector.scores)
    ood = gate.ood
    if ood is not None:
        if ood.transform == "sqrt":
            u = g.op("Sqrt", relu)
        else:
            norm = g.op("ReduceL2", emb, g.const([1], np.int64), keepdims=1)
            u = g.op("Div", emb, g.op("Max", norm, g.const(1e-12)))
        x = g.op("Sub", u, g.const(ood.mean))
        z = g.op("MatMul", x, g.const(ood.basis.T.copy()))
        distance = g.op("ReduceL2", g.op("Div", z, g.const(ood.scales)), g.const([1], np.int64), keepdims=0)
        residual = g.op(
            "ReduceL2", g.op("Sub", x, g.op("MatMul", z, g.const(ood.basis))), g.const([1], np.int64), keepdims=0
        )
        distance, residual = g.cast(distance, "DOUBLE"), g.cast(residual, "DOUBLE")
        novelty = g.op("Div", residual, g.const(ood.residual_ref, np.float64))
        if ood.mode == "combined":
            novelty = g.op("Max", g.op("Div", distance, g.const(ood.distance_ref, np.float64)), novelty)
        score = g.op("Div", novelty, g.const(ood.threshold, np.float64))
        if ood.probe is not None:
            p = ood.probe
            pu = g.op("Sqrt", relu) if p.transform == "sqrt" else u
            if p.transform == "unit" and ood.transform != "unit":
                norm = g.op("ReduceL2", emb, g.const([1], np.int64), keepdims=1)
                pu = g.op("Div", emb, g.op("Max", norm, g.const(1e-12)))
            plogit = g.op("Add", g.cast(g.op("MatMul", pu, g.const(p.weights)), "DOUBLE"), g.const(p.bias, np.float64))
            units = g.op(
                "Add",
                g.const(1.0, np.float64),
                g.op("Div", g.op("Sub", plogit, g.const(p.threshold, np.float64)), g.const(p.scale, np.float64)),
            )
            score = g.op("Max", score, units)
    else:
        score = g.op("Add", g.op("Mul", logit, g.const(0.0, np.float64)), g.const(-1.0, np.float64))
    g.op("Identity", score, out="ood_score")

    # the gate's verdict (quality.QualityGate._report), problem by problem in PROBLEM_ORDER
    t = gate.thresholds
    m = g.ops("Split", ["measures", g.const([1] * 6, np.int64)], 6, axis=1)
    col = {name: g.op("Squeeze", v, g.const([1], np.int64)) for name, v in zip(MEASURES, m, strict=True)}
    side = "shorter_side"
    too_small = g.op("And", g.op("Greater", side, g.const(0.0)), g.op("Less", side, g.const(float(t.min_side))))
    too_dark = g.op(
        "Or",
        g.op("Less", col["bright_end"], g.const(t.min_bright_end)),
        g.op("Greater", col["dark_clipped"], g.const(t.max_dark_clipped)),
    )
    over = g.op("Greater", col["bright_clipped"], g.const(t.max_bright_clipped))
    earlier = g.op("Or", g.op("Or", too_small, too_dark), over)
    blurred = g.op("And", g.op("Not", earlier), g.op("Less", col["sharpness"], g.const(t.min_sharpness)))
    no_colour = g.op("And", g.op("Less", col["colour"], g.const(t.min_colour)), g.op("Not", g.op("Or", too_dark, over)))
    not_lesion = g.op("Greater", score, g.const(1.0, np.float64))
    flags = [too_small, too_dark, over, blurred, no_colour, not_lesion]
    g.op("Concat", *[g.op("Unsqueeze", f, g.const([1], np.int64)) for f in flags], axis=1, out="problems")

    # the heatmap's influence (explain.influence): |cam - median| min-max per photo; flat maps -> zeros
    cam = g.cast("cam", "DOUBLE")
    flat = g.op("Flatten", cam, axis=1)
    cells = g.op("Shape", flat)
    n_cells = g.op("Slice", cells, g.const([1], np.int64), g.const([2], np.int64))
    ordered, _ = g.ops("TopK", [flat, n_cells], 2, largest=0, sorted=1, axis=1)
    lo_i = g.op("Div", g.op("Sub", n_cells, g.const([1], np.int64)), g.const([2], np.int64))
    hi_i = g.op("Div", n_cells, g.const([2], np.int64))
    median = g.op(
        "Div",
        g.op("Add", g.op("Gather", ordered, lo_i, axis=1), g.op("Gather", ordered, hi_i, axis=1)),
        g.const(2.0, np.float64),
    )  # (N, 1)
    spread = g.op(
        "Sub",
        g.op("ReduceMax", flat, g.const([1], np.int64), keepdims=1),
        g.op("ReduceMin", flat, g.const([1], np.int64), keepdims=1),
    )
    away = g.op("Abs", g.op("Sub", flat, median))
    a_lo = g.op("ReduceMin", away, g.const([1], np.int64), keepdims=1)
    a_hi = g.op("ReduceMax", away, g.const([1], np.int64), keepdims=1)
    scaled = g.op("Div", g.op("Sub", away, a_lo), g.op("Max", g.op("Sub", a_hi, a_lo), g.const(1e-300, np.float64)))
    flat_map = g.op("Less", spread, g.const(1e-6, np.float64))
    influence = g.op("Where", flat_map, g.const(0.0, np.float64), scaled)
    g.op("Cast", g.op("Reshape", influence, g.op("Shape", cam)), out="influence", to=g.onnx.TensorProto.FLOAT)
    return g.model(
        "skinscan_after",
        [
            g.io("logit", "FLOAT", ["n"]),
            g.io("embedding", "FLOAT", ["n", embedding_dim]),
            g.io("cam", "FLOAT", ["n", "h", "w"]),
            g.io("shorter_side", "FLOAT", ["n"]),
            g.io("measures", "FLOAT", ["n", 6]),
        ],
        [
            g.io("probability", "DOUBLE", ["n"]),
            g.io("threshold", "DOUBLE", ["n"]),
            g.io("is_phone", "BOOL", ["n"]),
            g.io("ood_score", "DOUBLE", ["n"]),
            g.io("problems", "BOOL", ["n", 6]),
            g.io("influence", "FLOAT", ["n", "h", "w"]),
        ],
        "network outputs -> calibrated probability, photo type, quality verdict, heatmap (skinscan.graphs)",
    )
