"""Detection: boxes, anchors, matching, metrics and box sources for task='detection' (N-D, 2D and 3D)."""
