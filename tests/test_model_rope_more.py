"""RoPE variants against transformers (test-only oracle) at the positions long-context checkpoints run at,
where a last-bit difference in one frequency grows into a visible difference in the angle."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from test_model_variants import SIZES, _angles  # noqa: E402


@pytest.mark.parametrize("factor, theta", [(3.0, 10000.0), (1.7, 10000.0), (2.5, 1e6)])
def test_yarn_angles_equal_transformers_up_to_131072_positions(factor, theta, tmp_path):
    """YaRN's interpolated frequencies are 1 / (factor * theta^(2i/R)), rounded as that product: dividing the
    default frequencies by a factor that is no power of two rounded differently, and cos differed from
    transformers' by 1.7e-5 at 131072 positions (factor 3, theta 1e4; 4e-6 at factor 2.5, theta 1e6)."""
    config = {
        **SIZES,
        "model_type": "qwen2",
        "rope_theta": theta,
        "max_position_embeddings": 131072,
        "rope_scaling": {"type": "yarn", "factor": factor, "original_max_position_embeddings": 32768},
    }
    for (cos, sin), (hf_cos, hf_sin) in _angles(config, tmp_path, [32768, 131072]):
        T = cos.shape[1]
        for ours, ref in ((cos, hf_cos), (sin, hf_sin)):
            err = (ours - ref).abs().max().item()
            assert err <= 1e-6, f"yarn factor {factor} theta {theta} T={T}: max |cos/sin diff| {err:.2e}"
