"""Training and fine-tuning of the renderer and the motion generator (the paper's objectives)."""
