"""Sketch and photo encoders: preprocessing, models, training, evaluation and export (torch, numpy, PIL only)."""
