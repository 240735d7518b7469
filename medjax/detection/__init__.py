"""Detection for ``task='detection'`` (N-D, 2D and 3D): boxes, anchors, matching, losses,
inference, metrics, box sources and outputs (see docs/detection.md)."""
