"""AXIS stage 2: tune the merged singular values σ on target data, then fold them back."""
