"""The built-in model's world: everything that makes `models/bailan-shapes`, and
the pipelines built in code for tests and benchmarks.

None of it runs in the serving worker, which only loads a model directory:

- data: the procedural, captioned dataset of coloured shapes;
- train: the trainer (`python -m world.train`, `make train`);
- evaluate: the model-free judge that reads an image's attributes back;
- figures: the README's pictures of the built-in model;
- sd_components, wordtok: building blocks of a Stable Diffusion pipeline
  assembled in code (noise schedule, CLIP text encoder, word-level tokenizer);
- tiny: a tiny random-weight pipeline for tests and CPU benchmarks.
"""
