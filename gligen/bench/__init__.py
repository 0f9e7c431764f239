"""Benchmarks: the training step against an official-style one (`train_step`), our sampler against diffusers'
(`sampler`), and the machine columns every measured row carries (`machine`)."""
