"""Liveness-based peak-memory simulation of forward+backward graphs (placeholder API).

``predict_peak(fw, bw, joint)`` returns the simulated peak bytes of one training step, or
None when it cannot be computed.
"""

from __future__ import annotations


def predict_peak(fw, bw, joint=None):
    return None
