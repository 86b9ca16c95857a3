"""Conditioning features: open_clip CLIP, Synchformer, weight resolution + cache, extraction.

Import the submodules directly (`wavflow.features.encoders.FeatureEncoders`, ...); this package
stays import-light so that `wavflow.features.weights` does not pull in open_clip.
"""
