"""Spectral building blocks: SVD paths (exact, randomized, factored), polar factors, SVC.
Pure torch: no Ray, no file I/O."""
