"""Training losses and regularisers as plain differentiable functions of logits, inputs and models (no Lightning):
the methods in robust_train.methods call them, and tests check them against their formulas on tiny models."""
