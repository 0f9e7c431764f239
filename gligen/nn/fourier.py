"""Fourier embedding of box and point coordinates (GLIGEN's position encoding, no parameters)."""

import torch


def fourier_embed(coords: torch.Tensor, num_freqs: int = 8, temperature: float = 100.0) -> torch.Tensor:
    """Embed coordinates [..., n] as [..., n * 2 * num_freqs].

    Frequencies f_k = temperature ** (k / num_freqs), k = 0..num_freqs-1. The output is laid out per frequency as
    [sin(f_k * c) for every coordinate c, cos(f_k * c) for every coordinate c], the official layout, so a box
    (x0, y0, x1, y1) gives 64 dims and a point (x, y) gives 32 dims.
    """
    freqs = temperature ** (torch.arange(num_freqs, device=coords.device, dtype=coords.dtype) / num_freqs)
    angles = freqs[:, None] * coords.unsqueeze(-2)  # [..., F, n]
    embedding = torch.stack((angles.sin(), angles.cos()), dim=-2)  # [..., F, 2, n]
    return embedding.flatten(-3)


POSITION_ENCODINGS = ("fourier", "raw")


def position_features(coords: torch.Tensor, encoding: str = "fourier", num_freqs: int = 8) -> torch.Tensor:
    """What a grounding tokenizer's MLP sees of coordinates: "fourier" (paper eq. 5, `fourier_embed`) or "raw" (the
    normalised coordinates themselves: the paper's ablation of the Fourier embedding, its Table "MLP" row)."""
    if encoding == "fourier":
        return fourier_embed(coords, num_freqs)
    if encoding == "raw":
        return coords
    raise ValueError(f"position encoding must be one of {POSITION_ENCODINGS}, got {encoding!r}")


def position_dim(num_coords: int, encoding: str = "fourier", num_freqs: int = 8) -> int:
    """Width of `position_features`."""
    if encoding not in POSITION_ENCODINGS:
        raise ValueError(f"position encoding must be one of {POSITION_ENCODINGS}, got {encoding!r}")
    return fourier_dim(num_coords, num_freqs) if encoding == "fourier" else num_coords


def fourier_dim(num_coords: int, num_freqs: int = 8) -> int:
    """Width of `fourier_embed` for `num_coords` coordinates."""
    return num_coords * 2 * num_freqs
