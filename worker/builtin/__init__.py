"""The built-in model: a miniature latent diffusion model of coloured shapes.

Everything needed to reproduce `models/bailan-shapes` lives here: the procedural
captioned dataset (data), the model-free attribute classifier (evaluate), the
trainer (train) and the README figures (figures).
"""
