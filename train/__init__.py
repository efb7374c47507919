"""Training, evaluation and data code for DiffewS (not part of the inference pipeline)."""
