"""peftmath.layers: kinds, geometry, matrix views and the base forward against torch modules."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from tests.helpers import assert_same_namespace, to_np, to_xp
from peftmath.errors import ShapeError
from peftmath.layers import Layer, LayerKind

# (kind, stored weight shape, groups, expected (out, in), expected matrix shape)
GEOMETRY = [
    ("Linear", (5, 3), 1, (5, 3), (5, 3)),
    ("Conv1D", (3, 5), 1, (5, 3), (5, 3)),
    ("Embedding", (11, 4), 1, (4, 11), (4, 11)),
    ("Conv1d", (6, 2, 3), 1, (6, 2), (6, 6)),
    ("Conv2d", (6, 2, 3, 1), 1, (6, 2), (6, 6)),
    ("Conv2d", (6, 2, 3, 3), 3, (6, 6), (6, 18)),
    ("Conv3d", (4, 3, 1, 1, 2), 1, (4, 3), (4, 6)),
]


@pytest.mark.parametrize("kind,shape,groups,out_in,matrix", GEOMETRY)
def test_geometry(kind, shape, groups, out_in, matrix):
    layer = Layer.of(shape, kind, groups=groups)
    assert layer.kind is LayerKind.parse(kind) and layer.kind.value == kind
    assert (layer.out_features, layer.in_features) == out_in
    assert layer.matrix_shape == matrix
    assert layer.fan_in_fan_out == (kind in ("Conv1D", "Embedding"))
    assert layer.kernel_size == (shape[2:] if layer.kind.is_conv else ())
    assert layer.kind.conv_dims == (len(shape) - 2 if layer.kind.is_conv else 0)


def test_default_kind_from_ndim():
    assert [Layer.of(s).kind for s in [(2, 3), (2, 3, 4), (2, 3, 4, 4), (2, 3, 1, 1, 1)]] == [
        LayerKind.LINEAR, LayerKind.CONV1D, LayerKind.CONV2D, LayerKind.CONV3D]
    with pytest.raises(ShapeError, match=r"\(7,\)"):
        Layer.of((7,))


def test_parse_names_and_aliases():
    assert LayerKind.parse("Conv1D") is LayerKind.CONV1D_TRANSPOSED  # transformers (GPT-2)
    assert LayerKind.parse("Conv1d") is LayerKind.CONV1D  # torch
    assert LayerKind.parse("conv1d") is LayerKind.CONV1D
    assert LayerKind.parse("fan_in_fan_out") is LayerKind.CONV1D_TRANSPOSED
    assert LayerKind.parse("gpt2_conv1d") is LayerKind.CONV1D_TRANSPOSED
    assert LayerKind.parse("linear") is LayerKind.LINEAR
    assert LayerKind.parse(LayerKind.EMBEDDING) is LayerKind.EMBEDDING
    with pytest.raises(ShapeError, match="'Dense'.*'Linear'"):
        LayerKind.parse("Dense")


def test_shape_errors():
    with pytest.raises(ShapeError, match=r"Linear weight has 2 dimensions, got shape \(3, 4, 5\)"):
        Layer.of((3, 4, 5), "Linear")
    with pytest.raises(ShapeError, match=r"Conv2d weight has 4 dimensions"):
        Layer.of((3, 4, 5), "Conv2d")
    with pytest.raises(ShapeError, match="groups=4"):
        Layer.of((6, 2, 3, 3), groups=4)
    with pytest.raises(ShapeError, match="only applies to convolutions"):
        Layer.of((6, 2), "Linear", groups=2)
    layer = Layer.of((5, 3))
    with pytest.raises(ShapeError, match=r"base weight has shape \(3, 5\), expected \(5, 3\)"):
        layer.check_weight(np.zeros((3, 5)))
    with pytest.raises(ShapeError, match=r"matrix of shape \(3, 5\), expected \(5, 3\)"):
        layer.from_matrix(np.zeros((3, 5)), np)
    with pytest.raises(ShapeError, match=r"bias has shape \(3,\), expected \(5,\)"):
        layer.check_bias(np.zeros(3))
    layer.check_bias(np.zeros(5))


@pytest.mark.parametrize("kind,shape,groups,out_in,matrix", GEOMETRY)
def test_matrix_view_and_inverse(xp, kind, shape, groups, out_in, matrix):
    layer = Layer.of(shape, kind, groups=groups)
    W = np.random.default_rng(0).standard_normal(shape)
    M = layer.as_matrix(to_xp(xp, W), xp)
    assert_same_namespace(xp, M)
    want = W.T if kind in ("Conv1D", "Embedding") else W.reshape(matrix)
    np.testing.assert_array_equal(to_np(M), want)
    back = layer.from_matrix(M, xp)
    assert_same_namespace(xp, back)
    np.testing.assert_array_equal(to_np(back), W)


def test_matrix_view_is_a_view_on_numpy():
    for kind, shape, groups, *_ in GEOMETRY:
        W = np.zeros(shape)
        M = Layer.of(shape, kind, groups=groups).as_matrix(W, np)
        assert np.shares_memory(M, W), kind


# --------------------------------------------------------------------------------------------------
# base_forward against torch modules
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _p(t):
    return t.detach().numpy().copy()


def test_base_forward_linear(torch, xp):
    torch.manual_seed(0)
    lin = torch.nn.Linear(5, 3).double()
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    want = _p(lin(x))
    got = Layer.of((3, 5)).base_forward(to_xp(xp, _p(x)), to_xp(xp, _p(lin.weight)), to_xp(xp, _p(lin.bias)), xp)
    assert_same_namespace(xp, got)
    np.testing.assert_allclose(to_np(got), want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("eps,bias", [(1e-5, True), (10.0, True), (1e-6, False)])
def test_base_forward_layer_norm(torch, xp, eps, bias):
    """LayerNorm over the last axis against torch's nn.LayerNorm (biased variance, eps inside the root); its
    geometry (1-D weight, n features in and out, matrix view (n, 1))."""
    lay = Layer.of((6,), "LayerNorm")
    assert (lay.out_features, lay.in_features, lay.matrix_shape) == (6, 6, (6, 1))
    w = np.arange(6.0)
    assert lay.matrix_view(w, np).base is w and np.array_equal(lay.from_matrix(lay.as_matrix(w, np), np), w)
    with pytest.raises(ShapeError, match="1 dimensions"):
        Layer(LayerKind.LAYER_NORM, (6, 1))
    torch.manual_seed(1)
    ln = torch.nn.LayerNorm(6, eps=eps, bias=bias).double()
    with torch.no_grad():
        for p in ln.parameters():
            p.normal_()
    x = 3 * torch.randn(2, 4, 6, dtype=torch.float64) + 5
    b = to_xp(xp, _p(ln.bias)) if bias else None
    got = Layer.of((6,), "layer_norm").base_forward(to_xp(xp, _p(x)), to_xp(xp, _p(ln.weight)), b, xp, eps=eps)
    assert_same_namespace(xp, got)
    np.testing.assert_allclose(to_np(got), _p(ln(x)), rtol=1e-12, atol=1e-12)
    with pytest.raises(ShapeError, match="keyword eps"):
        Layer.of((6,), "LayerNorm").base_forward(_p(x), _p(ln.weight), None, np)
    with pytest.raises(ShapeError, match="cannot infer a layer kind"):
        Layer.of((6,))


def test_base_forward_transformers_conv1d(torch):
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(1)
    m = pytorch_utils.Conv1D(7, 4).double()  # nf=7 out, nx=4 in: weight (4, 7)
    torch.nn.init.normal_(m.bias)
    x = torch.randn(3, 4, dtype=torch.float64)
    layer = Layer.of(tuple(m.weight.shape), "Conv1D")
    assert (layer.in_features, layer.out_features) == (4, 7)
    got = layer.base_forward(_p(x), _p(m.weight), _p(m.bias), np)
    np.testing.assert_allclose(got, _p(m(x)), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(got, _p(x) @ _p(m.weight) + _p(m.bias), rtol=1e-13, atol=1e-13)


def test_base_forward_embedding(torch, xp):
    torch.manual_seed(2)
    emb = torch.nn.Embedding(10, 3).double()
    ids = torch.tensor([[0, 9, 3], [3, 3, 1]])
    got = Layer.of((10, 3), "Embedding").base_forward(to_xp(xp, ids.numpy()), to_xp(xp, _p(emb.weight)), None, xp)
    assert_same_namespace(xp, got)
    np.testing.assert_array_equal(to_np(got), _p(emb(ids)))


CONVS = [
    (1, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=1, groups=2)),
    (2, dict(in_channels=3, out_channels=4, kernel_size=(3, 2), stride=1, padding=(1, 0), dilation=(2, 1), groups=1)),
    (2, dict(in_channels=4, out_channels=4, kernel_size=3, stride=1, padding="same", dilation=1, groups=4)),
    (2, dict(in_channels=2, out_channels=3, kernel_size=1, stride=1, padding=0, dilation=1, groups=1)),
    (3, dict(in_channels=2, out_channels=4, kernel_size=(1, 1, 2), stride=(1, 2, 1), padding=1, dilation=1, groups=2)),
]


@pytest.mark.parametrize("nd,kw", CONVS)
def test_base_forward_conv(torch, nd, kw):
    torch.manual_seed(3)
    cls = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}[nd]
    mod = cls(**kw).double()
    x = torch.randn(2, kw["in_channels"], *([7] * nd), dtype=torch.float64)
    layer = Layer.of(tuple(mod.weight.shape), groups=kw["groups"])
    assert layer.in_features == kw["in_channels"] and layer.out_features == kw["out_channels"]
    got = layer.base_forward(_p(x), _p(mod.weight), _p(mod.bias), np, stride=kw["stride"], padding=kw["padding"],
                             dilation=kw["dilation"])
    want = _p(mod(x))
    k = math.prod(mod.weight.shape[1:])
    conv_fn = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}[nd]
    magnitude = _p(conv_fn(x.abs(), mod.weight.abs(), mod.bias.abs(), stride=kw["stride"], padding=kw["padding"],
                           dilation=kw["dilation"], groups=kw["groups"]))
    bound = 2 * (k + 2) * 2.0**-52 * magnitude
    assert got.shape == want.shape
    assert np.all(np.abs(got - want) <= bound)


# --------------------------------------------------------------------------------------------------
# matrix_view: the writable view the in-place kernels get (or None), on every layout
# --------------------------------------------------------------------------------------------------
def _layouts(W: np.ndarray):
    """(name, array equal to W, True when its matrix view can alias it) for a conv weight."""
    yield "C", W.copy(), True
    yield "Fortran", np.asfortranarray(W), False
    big = np.zeros((W.shape[0], 2 * W.shape[1], *W.shape[2:]))
    big[:, ::2] = W
    yield "col-slice", big[:, ::2], False
    tall = np.zeros((2 * W.shape[0], *W.shape[1:]))
    tall[::2] = W
    yield "row-slice", tall[::2], True  # rows strided, each row contiguous: still a view


@pytest.mark.parametrize("kind,shape,groups,out_in,matrix", GEOMETRY)
def test_matrix_view_aliases_or_is_none(kind, shape, groups, out_in, matrix):
    layer = Layer.of(shape, kind, groups=groups)
    W = np.random.default_rng(1).standard_normal(shape)
    for name, Wl, aliasable in _layouts(W):
        M = layer.matrix_view(Wl, np)
        if not layer.kind.is_conv or aliasable:
            assert M is not None and np.shares_memory(M, Wl), name
            np.testing.assert_array_equal(M, W.T if kind in ("Conv1D", "Embedding") else W.reshape(matrix))
            M[0, 0] = 42.0  # the write lands in the caller's array
            assert Wl[(0,) * Wl.ndim] == 42.0, name
        else:
            assert M is None, name  # only a copy has the matrix shape: the kernels never see it


def test_matrix_view_torch_channels_last_and_views(torch):
    W = torch.randn(6, 4, 3, 3)
    layer = Layer.of(tuple(W.shape))
    import array_api_compat.torch as xpt

    M = layer.matrix_view(W, xpt)
    assert M is not None and M.data_ptr() == W.data_ptr()
    assert layer.matrix_view(W.to(memory_format=torch.channels_last), xpt) is None
    assert layer.matrix_view(torch.randn(3, 3, 6, 4).permute(2, 3, 0, 1), xpt) is None
    lin = Layer.of((4, 6), "Conv1D")
    Wt = torch.randn(4, 6)
    Mt = lin.matrix_view(Wt, xpt)
    Mt[1, 2] = 7.0
    assert Wt[2, 1] == 7.0


# --------------------------------------------------------------------------------------------------
# for_input: the input check and the conv keywords of every method's forward
# --------------------------------------------------------------------------------------------------
def test_for_input_linear_and_conv1d_transposed():
    for kind, shape, inn in (("Linear", (5, 3), 3), ("Conv1D", (3, 5), 3)):
        layer = Layer.of(shape, kind)
        assert layer.for_input(np.zeros((2, 7, inn)), "m") == (layer, {})
        with pytest.raises(ShapeError, match=re.escape(f"m: input of shape (2, 4) does not fit the {kind} base "
                                                       f"weight {shape}: its last axis must be the {inn} input")):
            layer.for_input(np.zeros((2, 4)), "m")
        with pytest.raises(ShapeError, match=r"m: padding=1, dilation=2, groups=3 only apply to convolutions"):
            layer.for_input(np.zeros((2, inn)), "m", padding=1, dilation=2, groups=3)
        # the defaults, spelled out, are fine
        layer.for_input(np.zeros((2, inn)), "m", stride=(1,), padding="valid", dilation=1, groups=1)


def test_for_input_embedding_takes_ids():
    layer = Layer.of((11, 4), "Embedding")
    assert layer.for_input(np.zeros((2, 9), dtype=np.int64), "m") == (layer, {})


def test_for_input_conv_infers_groups():
    layer = Layer.of((6, 2, 3, 3))
    kw = dict(stride=2, padding=1, dilation=1)
    same, conv_kw = layer.for_input(np.zeros((1, 2, 5, 5)), "m", **kw)
    assert same is layer and conv_kw == kw
    grouped, _ = layer.for_input(np.zeros((1, 6, 5, 5)), "m")
    assert grouped.groups == 3 and grouped.weight_shape == layer.weight_shape and grouped.in_features == 6
    assert layer.for_input(np.zeros((1, 6, 5, 5)), "m", groups=3)[0] == grouped
    with pytest.raises(ShapeError, match=r"m: groups=2 contradicts the input \(1, 6, 5, 5\) and the weight "
                                         r"\(6, 2, 3, 3\), which give groups = 6 // 2 = 3"):
        layer.for_input(np.zeros((1, 6, 5, 5)), "m", groups=2)
    with pytest.raises(ShapeError, match=r"its 5 channels are not a multiple of the weight's 2"):
        layer.for_input(np.zeros((1, 5, 5, 5)), "m")
    with pytest.raises(ShapeError, match=r"groups = 8 // 2 = 4 does not divide the 6 output channels"):
        layer.for_input(np.zeros((1, 8, 5, 5)), "m")
    with pytest.raises(ShapeError, match=r"a Conv2d takes \(N, C_in, H, W\), 4 axes"):
        layer.for_input(np.zeros((2, 5, 5)), "m")
    with pytest.raises(ShapeError, match=r"the adapter's tensors take 4 input channels, the input has 6"):
        layer.for_input(np.zeros((1, 6, 5, 5)), "m", channels=4)
    with pytest.raises(ShapeError, match=r"the layer has groups=3 \(input channels 6\), the input gives groups=2"):
        grouped.for_input(np.zeros((1, 4, 5, 5)), "m")
