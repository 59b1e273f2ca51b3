"""The compression stages: model resolution, calibration data, pruning, bitmap packing, the artifact and the runner."""
