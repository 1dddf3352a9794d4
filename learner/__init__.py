"""Continuous learner: models, objectives, prequential training, checkpoints."""
