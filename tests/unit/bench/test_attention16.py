"""The hand-written attention of `python -m bench.experiments.attention16` against torch's SDPA, and
in OpenVINO's graph against OpenVINO's own attention (where g++ and AVX512-BF16 are)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support import ROOT

sys.path.insert(0, str(ROOT))
from bench.experiments import attention16  # noqa: E402

sys.path.pop(0)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    try:
        return attention16.build_kernel(tmp_path_factory.mktemp("kernel"))
    except attention16.KernelUnavailable as error:
        pytest.skip(str(error))


def run(kernel, q, k, v, bf16: bool) -> np.ndarray:
    """q, k, v: (T, H, 16), the layout of a packed q/k/v projection's rows."""
    tokens, heads, width = q.shape
    arrays = [np.ascontiguousarray(x.numpy()) for x in (q, k, v)]
    out = np.full_like(arrays[0], np.nan)
    pointers = (array.ctypes.data for array in (*arrays, out))
    kernel.esm_attention(*pointers, tokens, heads, heads * width, width, 0.25, bf16)
    return out


@pytest.mark.parametrize("tokens", [1, 3, 8, 17, 64, 130])
def test_the_kernel_is_scaled_dot_product_attention(kernel, tokens):
    generator = torch.Generator().manual_seed(tokens)
    q, k, v = (3 * torch.randn(tokens, 5, 16, generator=generator) for _ in range(3))
    expected = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), scale=0.25
    ).transpose(0, 1)

    # bf16 rounds q (scaled), k and v, then the probabilities: against the same attention
    # of rounded inputs, only the probabilities' rounding (2**-9 of each) is left.
    rounded = [x.transpose(0, 1).bfloat16().float() for x in (q * 0.25, k, v)]
    expected_bf16 = F.scaled_dot_product_attention(*rounded, scale=1.0).transpose(0, 1)

    fp32 = run(kernel, q, k, v, bf16=False)
    bf16 = run(kernel, q, k, v, bf16=True)

    np.testing.assert_allclose(fp32, expected.numpy(), atol=2e-6, rtol=1e-5)
    bf16_error = np.abs(bf16 - expected_bf16.numpy()).max()
    assert bf16_error < 0.02
    if tokens > 1:  # one key: its probability is 1 exactly, in any precision
        assert bf16_error > 1e-5  # the probabilities really were rounded to bf16


def test_in_openvinos_graph_it_replaces_every_attention_and_keeps_the_outputs(kernel):
    from esm2_service.worker import openvino_backend
    from esm2_service.worker.model import Esm2

    torch.manual_seed(0)
    model = Esm2(num_layers=3, embed_dim=32, attention_heads=2, token_dropout=True).eval()
    own, custom = openvino_backend.convert(model), openvino_backend.convert(model)
    op = attention16.attention_op(kernel, model.layers[0].scaling, bf16=False)

    assert attention16.with_kernel(custom, op) == 3
    ids = np.array([[0, *range(4, 24), 32, 5, 6, 2]], dtype=np.int64)
    compiled = [openvino_backend.compile_for_cpu(m, torch.float32, 1) for m in (own, custom)]
    expected, got = (c.create_infer_request().infer([ids])[0] for c in compiled)
    assert got.shape == (4, ids.shape[1], 32)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_heads_of_another_width_are_refused(kernel):
    from esm2_service.worker import openvino_backend
    from esm2_service.worker.model import Esm2

    model = Esm2(num_layers=1, embed_dim=32, attention_heads=4, token_dropout=True).eval()
    op = attention16.attention_op(kernel, model.layers[0].scaling, bf16=False)
    with pytest.raises(ValueError, match="heads 16 wide, not 8"):
        attention16.with_kernel(openvino_backend.convert(model), op)
