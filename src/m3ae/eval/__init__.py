"""Evaluation of learned representations: k-NN, out-of-distribution detection, feature extraction."""
