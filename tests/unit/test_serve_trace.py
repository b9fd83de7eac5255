"""Routing trace file format: round trip, validation, replay helpers."""

import numpy as np
import pytest

from moe_parallel.monitor.routing_trace import FORMAT, load_trace, save_trace


def test_trace_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    layers = {1: rng.integers(0, 4, (10, 2)), 3: rng.integers(0, 4, (10, 2))}
    probs = {1: rng.random((10, 2)).astype(np.float32)}
    path = save_trace(tmp_path / "t.npz", layers, {"num_experts": 4, "forwards": [6, 4]}, probs)
    assert path == tmp_path / "t.npz" and path.exists()
    trace = load_trace(path)
    assert list(trace.layers) == [1, 3]
    for k in layers:
        assert trace.layers[k].dtype == np.int32
        np.testing.assert_array_equal(trace.layers[k], layers[k])
    np.testing.assert_array_equal(trace.probs[1], probs[1])
    assert trace.meta["format"] == FORMAT and trace.meta["top_k"] == 2
    assert trace.meta["layers"] == [1, 3]
    np.testing.assert_array_equal(
        trace.tokens_per_expert(3), np.bincount(layers[3].ravel(), minlength=4)
    )
    parts = list(trace.forwards(1))
    assert [len(p) for p in parts] == [6, 4]
    np.testing.assert_array_equal(np.concatenate(parts), layers[1])


def test_trace_refuses_bad_arrays(tmp_path):
    with pytest.raises(ValueError, match="layer 2"):
        save_trace(tmp_path / "t.npz", {2: np.zeros(5, dtype=int)}, {})
    with pytest.raises(ValueError, match="probs"):
        save_trace(tmp_path / "t.npz", {2: np.zeros((5, 2), dtype=int)}, {}, {2: np.zeros((5, 1))})
