"""The in-graph heatmap: its gradient against finite differences, CAM against NumPy, the outputs left as they were.

`python -m tests.build_engine.test_heatmap` times the default model with and without the heatmap.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.inference.heatmap_graph import EPSILON, HeatmapError, add_heatmap

from ..integration.conftest import DEFAULT_MODEL, TEST_MODEL

VGG = DEFAULT_MODEL / "model.onnx"
VGG_FEATURE = "functional_1/block5_pool_1/MaxPool2d:0"  # N x 512 x 7 x 7: tf2onnx transposes back to NHWC after it
VGG_LOGITS = "functional_1/dense_3_1/BiasAdd:0"  # the Softmax's input
PIPELINE_FEATURE = "/features/features.8/MaxPool_output_0"  # N x 32 x 8 x 8, then ReduceMean(H, W) and one Gemm

needs_vgg = pytest.mark.skipif(not VGG.is_file(), reason="run `make model` to fetch the default model")


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    """As the appliance's backend opens one: every graph optimization on, so fusions are what it serves."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def with_outputs(model: onnx.ModelProto, *names: str) -> onnx.ModelProto:
    """A copy with intermediate tensors as extra outputs, for the tests to read."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return out


def to_double(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph in float64 (it holds no Cast to float), so finite differences round at 1e-16, not 1e-7."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, init in enumerate(out.graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            out.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float64), init.name)
            )
    for v in (*out.graph.input, *out.graph.output):
        if v.type.tensor_type.elem_type == TensorProto.FLOAT:
            v.type.tensor_type.elem_type = TensorProto.DOUBLE
    del out.graph.value_info[:]
    assert not [n for n in out.graph.node if n.op_type == "Cast" and n.attribute[0].i == TensorProto.FLOAT]
    return out


def brain_slices(count: int) -> np.ndarray:
    """Real slices as the default model takes them (240 x 240 RGB in [0, 1], NHWC); noise where `make model`'s
    image sets are missing."""
    files = sorted(DEFAULT_MODEL.glob("validation-brain/**/*.png"))[::8][:count]
    if len(files) < count:
        return np.random.default_rng(1).random((count, 240, 240, 3), dtype=np.float32)
    images = []
    for f in files:
        grey = cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (240, 240), interpolation=cv2.INTER_AREA)
        images.append(np.repeat(grey[..., None], 3, axis=2).astype(np.float32) / 255)
    return np.stack(images)


def central_differences(
    head: ort.InferenceSession, features: np.ndarray, cls: int, picks: np.ndarray, eps: float
) -> np.ndarray:
    """d logit[cls] / d features[picks], one sample, by (f(x + eps) - f(x - eps)) / 2 eps, all in one batch."""
    batch = np.repeat(features[None], 2 * len(picks), axis=0)
    flat = batch.reshape(len(batch), -1)
    rows = np.arange(len(picks))
    flat[2 * rows, picks] += eps
    flat[2 * rows + 1, picks] -= eps
    logits = head.run(None, {head.get_inputs()[0].name: batch})[0][:, cls]
    return (logits[0::2] - logits[1::2]) / (2 * eps)


def normalise(cam: np.ndarray) -> np.ndarray:
    cam = np.maximum(cam, 0)
    return cam / (cam.max(axis=(-2, -1), keepdims=True) + EPSILON)


# --- the default VGG16: Grad-CAM through its flatten + dense head ---------------------------------------------


@pytest.fixture(scope="module")
def vgg() -> onnx.ModelProto:
    return onnx.load(str(VGG))


@pytest.fixture(scope="module")
def vgg_gradcam(vgg: onnx.ModelProto) -> onnx.ModelProto:
    return add_heatmap(vgg, method="gradcam", feature=VGG_FEATURE)


@pytest.mark.slow
@needs_vgg
def test_the_in_graph_gradient_matches_finite_differences_on_the_default_model(vgg: onnx.ModelProto) -> None:
    debug = with_outputs(add_heatmap(vgg, method="gradcam", feature=VGG_FEATURE, expose_gradient=True), VGG_FEATURE)
    images = brain_slices(2)
    scores, _, gradient, features = session(debug).run(None, {"input": images})
    # The head alone, feature maps in and logits out, in float64: it is piecewise linear in the feature maps, so
    # a central difference is exact but for rounding (1e-16 x logits of order 10 / 1e-5), unless a step crosses
    # a ReLU's kink. Steps of 1e-3 did here (a unit of the third dense layer sits 3e-6 from zero on the first
    # slice, and 8 of 24 picks came out 0.1% to 1% off); steps of 1e-4 down to 1e-6 all agree to 2e-8.
    cut = onnx.utils.Extractor(onnx.shape_inference.infer_shapes(vgg)).extract_model([VGG_FEATURE], [VGG_LOGITS])
    head = session(to_double(cut))
    rng = np.random.default_rng(0)
    worst, worst_relative = 0.0, 0.0
    for n in range(len(images)):
        logits = head.run(None, {VGG_FEATURE: features[n : n + 1].astype(np.float64)})[0][0]
        cls = int(np.argmax(logits))
        assert cls == int(np.argmax(scores[n]))  # the decided class is the served decision
        picks = rng.choice(features[n].size, 24, replace=False)
        analytic = gradient[n].reshape(-1)[picks].astype(np.float64)
        numeric = central_differences(head, features[n].astype(np.float64), cls, picks, eps=1e-5)
        # Tolerance: the in-graph gradient is float32, its sums up to 25088 terms long, so 1e-5 of the gradient's
        # largest element, absolute, and 1e-4 relative where the element is over 1% of the largest (measured:
        # 1e-7 and 2e-6; the same gradient without the ReLU masks is off by 20 times the largest element, and
        # another class's by about 1 time).
        scale = np.abs(gradient[n]).max()
        error = np.abs(analytic - numeric)
        assert np.all(error <= 1e-5 * scale), (analytic, numeric)
        big = np.abs(numeric) > 1e-2 * scale
        assert np.all(error[big] <= 1e-4 * np.abs(numeric[big])), (analytic, numeric)
        # No element of these feature maps has a zero gradient: each feeds all 64 units of the first dense
        # layer, some of them alive. The ReLU masks' zeros are checked on the miniature head below.
        assert np.all(gradient[n] != 0)
        worst = max(worst, float((error / scale).max()))
        worst_relative = max(worst_relative, float((error[big] / np.abs(numeric[big])).max()))
    print(
        f"finite differences on {len(images)} x 24 elements: worst |analytic - numeric| {worst:.1e} of the largest "
        f"|gradient|; worst relative error {worst_relative:.1e} where |gradient| > 1% of the largest"
    )


@pytest.mark.slow
@needs_vgg
def test_the_default_models_outputs_are_unchanged_and_each_sample_has_its_own_map(
    vgg: onnx.ModelProto, vgg_gradcam: onnx.ModelProto
) -> None:
    images = brain_slices(2)
    images[1] = np.random.default_rng(2).random((240, 240, 3), dtype=np.float32)  # a different input for sure
    (before,) = session(vgg).run(None, {"input": images})
    both = session(vgg_gradcam)
    after, maps = both.run(None, {"input": images})
    assert np.array_equal(before, after)  # bit for bit
    assert maps.shape == (2, 7, 7) and maps.dtype == np.float32
    assert maps.min() >= 0 and maps.max() <= 1 and np.allclose(maps.max(axis=(1, 2)), 1, atol=1e-6)
    assert not np.allclose(maps[0], maps[1], atol=1e-2)
    for n in range(2):  # a sample's map does not depend on its batch mate
        _, alone = both.run(None, {"input": images[n : n + 1]})
        np.testing.assert_allclose(alone[0], maps[n], atol=1e-5)


@needs_vgg
def test_cam_refuses_the_default_models_dense_head(vgg: onnx.ModelProto) -> None:
    with pytest.raises(HeatmapError, match="gradcam"):
        add_heatmap(vgg, method="cam", feature=VGG_FEATURE)


# --- tiny models built here -----------------------------------------------------------------------------------


def gap_model(head: str, classes: int = 3) -> onnx.ModelProto:
    """conv -> relu (the feature maps, 4 x 5 x 6) -> global average pooling -> a linear layer, spelt two ways."""
    rng = np.random.default_rng(3)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 2, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "conv_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["features"]),
    ]
    if head == "gap-flatten-gemm":
        inits.append(numpy_helper.from_array(rng.normal(size=(classes, 4)).astype(np.float32), "fc_w"))
        inits.append(numpy_helper.from_array(rng.normal(size=classes).astype(np.float32), "fc_b"))
        nodes += [
            helper.make_node("GlobalAveragePool", ["features"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["flat"]),
            helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], transB=1, alpha=0.5),
        ]
        output = "logits"
    else:  # "mean-matmul-add-softmax"
        inits.append(numpy_helper.from_array(rng.normal(size=(4, classes)).astype(np.float32), "fc_w"))
        inits.append(numpy_helper.from_array(rng.normal(size=classes).astype(np.float32), "fc_b"))
        nodes += [
            helper.make_node("ReduceMean", ["features"], ["pooled"], axes=[2, 3], keepdims=0),
            helper.make_node("MatMul", ["pooled", "fc_w"], ["mm"]),
            helper.make_node("Add", ["mm", "fc_b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["scores"]),
        ]
        output = "scores"
    graph = helper.make_graph(
        nodes,
        head,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 5, 6])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("head", ["gap-flatten-gemm", "mean-matmul-add-softmax"])
def test_cam_equals_numpy_and_grad_cam_on_a_pooling_head(head: str) -> None:
    model = gap_model(head)
    x = np.random.default_rng(4).normal(size=(5, 2, 5, 6)).astype(np.float32)
    (before,) = session(model).run(None, {"x": x})
    cam_model = with_outputs(add_heatmap(model, method="cam", feature="features"), "features")
    after, maps, features = session(cam_model).run(None, {"x": x})
    assert np.array_equal(before, after)

    weights = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "fc_w"))
    weights = 0.5 * weights if head == "gap-flatten-gemm" else weights.T  # classes x channels, alpha included
    bias = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "fc_b"))
    decided = np.argmax(features.mean(axis=(2, 3)) @ weights.T + bias, axis=1)
    assert len(set(decided)) > 1  # the samples decide differently: each map uses its own class
    expected = normalise(np.einsum("nk,nkhw->nhw", weights[decided], features))
    assert maps.shape == (5, 5, 6) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, expected, atol=1e-6)

    # On a pooling head Grad-CAM's weights are CAM's over H x W: after normalising, the same map but for rounding.
    (_, grad_maps) = session(add_heatmap(model, method="gradcam", feature="features")).run(None, {"x": x})
    np.testing.assert_allclose(grad_maps, maps, atol=1e-5)


def dense_model() -> onnx.ModelProto:
    """A miniature of the default model's head on 2 x 3 x 3 feature maps: NHWC flatten through tf2onnx's shape
    subgraph, dense + ReLU + folded batch norm, dense + ReLU, dense + softmax. Hidden unit 0 is dead (bias -1e3)
    and the feature elements in DEAD feed only it: their gradient is exactly zero."""
    rng = np.random.default_rng(5)
    w1 = rng.normal(size=(18, 6)).astype(np.float32)
    w1[DEAD, 1:] = 0
    b1 = rng.normal(size=6).astype(np.float32)
    b1[0] = -1e3
    inits = {
        "w1": w1,
        "b1": b1,
        "bn_scale": rng.uniform(0.5, 2, size=6).astype(np.float32),
        "bn_shift": rng.normal(size=6).astype(np.float32),
        "w2": rng.normal(size=(6, 5)).astype(np.float32),
        "b2": rng.normal(size=5).astype(np.float32),
        "w3": rng.normal(size=(5, 3)).astype(np.float32),
        "b3": rng.normal(size=3).astype(np.float32),
        "first": np.array([0], dtype=np.int64),
        "one": np.array([1], dtype=np.int64),
        "rest": np.array([-1], dtype=np.int32),
        "dims": np.array([0, 1, 2, 3], dtype=np.int64),
    }
    nodes = [
        helper.make_node("Transpose", ["x"], ["nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Gather", ["shape", "dims"], ["shape_nchw"]),
        helper.make_node("Cast", ["shape_nchw"], ["shape_i32"], to=TensorProto.INT32),
        helper.make_node("Slice", ["shape_i32", "first", "one", "first"], ["batch"]),
        helper.make_node("Concat", ["batch", "rest"], ["target_i32"], axis=0),
        helper.make_node("Cast", ["target_i32"], ["target"], to=TensorProto.INT64),
        helper.make_node("Reshape", ["nhwc", "target"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w1"], ["mm1"]),
        helper.make_node("Add", ["mm1", "b1"], ["pre1"]),
        helper.make_node("Relu", ["pre1"], ["h1"]),
        helper.make_node("Mul", ["h1", "bn_scale"], ["bn1"]),
        helper.make_node("Add", ["bn1", "bn_shift"], ["bn2"]),
        helper.make_node("MatMul", ["bn2", "w2"], ["mm2"]),
        helper.make_node("Add", ["mm2", "b2"], ["pre2"]),
        helper.make_node("Relu", ["pre2"], ["h2"]),
        helper.make_node("MatMul", ["h2", "w3"], ["mm3"]),
        helper.make_node("Add", ["mm3", "b3"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 3, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


# Flat NHWC indices 0, 7, 12: (h, w, c) = (0, 0, 0), (1, 0, 1), (2, 0, 0); as NCHW elements of x below.
DEAD = [0, 7, 12]
DEAD_NCHW = [(0, 0, 0), (1, 1, 0), (0, 2, 0)]


def test_the_gradient_through_a_dense_head_matches_finite_differences_everywhere_and_is_zero_where_masked() -> None:
    model = dense_model()
    x = np.random.default_rng(6).uniform(0, 2, size=(3, 2, 3, 3)).astype(np.float32)
    debug = add_heatmap(model, method="gradcam", feature="x", expose_gradient=True)
    (before,) = session(model).run(None, {"x": x})
    after, maps, gradient = session(debug).run(None, {"x": x})
    assert np.array_equal(before, after) and maps.shape == (3, 3, 3)

    logits_model = with_outputs(model, "logits")
    del logits_model.graph.output[0]
    head = session(to_double(logits_model))
    every = np.arange(x[0].size)
    for n in range(len(x)):
        cls = int(np.argmax(before[n]))
        numeric = central_differences(head, x[n].astype(np.float64), cls, every, eps=1e-4)
        np.testing.assert_allclose(gradient[n].reshape(-1), numeric, rtol=1e-4, atol=1e-5)
        for c, h, w in DEAD_NCHW:  # masked by the dead unit's ReLU: exactly zero, both ways
            assert gradient[n, c, h, w] == 0 and numeric[np.ravel_multi_index((c, h, w), x[n].shape)] == 0
        alpha = gradient[n].mean(axis=(1, 2))
        np.testing.assert_allclose(maps[n], normalise(np.einsum("k,khw->hw", alpha, x[n])), atol=1e-6)


def test_an_all_zero_map_stays_zero() -> None:
    model = dense_model()
    (maps,) = session(add_heatmap(model, method="gradcam", feature="x")).run(
        ["heatmap"], {"x": np.zeros((1, 2, 3, 3), np.float32)}
    )
    assert np.array_equal(maps, np.zeros((1, 3, 3), np.float32))


def test_an_unsupported_op_is_named() -> None:
    model = dense_model()
    relu = next(n for n in model.graph.node if n.output[0] == "h2")
    relu.op_type = "Tanh"
    with pytest.raises(HeatmapError, match="Tanh"):
        add_heatmap(model, method="gradcam", feature="x")


def test_a_widening_constant_or_a_branch_is_refused() -> None:
    model = dense_model()
    scale = next(i for i in model.graph.initializer if i.name == "bn_scale")
    scale.CopyFrom(numpy_helper.from_array(np.ones((3, 6), np.float32), "bn_scale"))  # N x 6 -> 3 x 6
    with pytest.raises(HeatmapError, match="broadcasts 'h1' to a larger shape"):
        add_heatmap(model, method="gradcam", feature="x")
    model = dense_model()
    model.graph.node.append(helper.make_node("Identity", ["h1"], ["hidden"]))
    model.graph.output.append(helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["N", 6]))
    with pytest.raises(HeatmapError, match=r"'h1' feeds Mul .*, Identity"):
        add_heatmap(model, method="gradcam", feature="x")


def test_a_missing_feature_tensor_or_a_taken_output_name_is_refused() -> None:
    with pytest.raises(HeatmapError, match="no tensor named 'nope'"):
        add_heatmap(dense_model(), method="gradcam", feature="nope")
    with pytest.raises(HeatmapError, match="already has a tensor named 'logits'"):
        add_heatmap(dense_model(), method="gradcam", feature="x", output_name="logits")


# --- pipeline-test: one logit, sigmoid applied by the appliance ---------------------------------------------------


def test_pipeline_test_takes_cam_with_its_single_logits_weights() -> None:
    model = onnx.load(str(TEST_MODEL / "model.onnx"))
    x = np.random.default_rng(7).normal(size=(4, 1, 64, 64)).astype(np.float32)
    (before,) = session(model).run(None, {"image": x})
    after, maps, features = session(
        with_outputs(add_heatmap(model, method="cam", feature=PIPELINE_FEATURE), PIPELINE_FEATURE)
    ).run(None, {"image": x})
    assert np.array_equal(before, after)
    assert maps.shape == (4, 8, 8)
    # One logit: the map is its own (evidence for the finding), whatever the threshold decides.
    weights = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "head.weight"))[0]
    np.testing.assert_allclose(maps, normalise(np.einsum("k,nkhw->nhw", weights, features)), atol=1e-6)
    # Grad-CAM applies too (the gradient through the mean is the weight over 8 x 8): the same map but for rounding.
    (_, grad_maps) = session(add_heatmap(model, method="gradcam", feature=PIPELINE_FEATURE)).run(None, {"image": x})
    np.testing.assert_allclose(grad_maps, maps, atol=1e-5)


# --- cost -------------------------------------------------------------------------------------------------------


def branch_share(model: onnx.ModelProto, x: np.ndarray, runs: int, folder: Path) -> float:
    """The heatmap's nodes' share of the kernel time in ONNX Runtime's profile: a figure a busy host moves less
    than wall-clock time, since both halves of it are slowed alike."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / "heatmap")
    s = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        s.run(None, {"input": x})
    events = json.loads(Path(s.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    ours = sum(e["dur"] for e in kernels if e["name"].startswith("heatmap/"))
    return ours / sum(e["dur"] for e in kernels)


def time_default_model(repeats: int = 10) -> None:
    """Median seconds per run of the default model with and without the heatmap, at batch 1 and 8 (the two
    alternate, so a busy neighbour slows both alike), and the heatmap's share of the profiled kernel time."""
    vgg = onnx.load(str(VGG))
    heat = add_heatmap(vgg, method="gradcam", feature=VGG_FEATURE)
    sessions = {"without": session(vgg), "with": session(heat)}
    for batch in (1, 8):
        x = np.random.default_rng(8).random((batch, 240, 240, 3), dtype=np.float32)
        runs: dict[str, list[float]] = {name: [] for name in sessions}
        for k in range(repeats + 1):
            for name, s in sessions.items():
                start = time.perf_counter()
                s.run(None, {"input": x})
                if k:  # the first round warms up
                    runs[name].append(time.perf_counter() - start)
        without, with_ = (float(np.median(runs[name])) for name in ("without", "with"))
        with tempfile.TemporaryDirectory() as folder:
            share = branch_share(heat, x, repeats, Path(folder))
        print(
            f"batch {batch}: {without:.3f} s without, {with_:.3f} s with the heatmap: x{with_ / without:.3f}; "
            f"its nodes take {share:.2%} of the kernel time"
        )


if __name__ == "__main__":
    time_default_model()
