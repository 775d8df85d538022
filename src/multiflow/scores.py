"""Importance scores of one layer's weights (ALGORITHM.md Step 2-3). Pure tensor math.

`sq_mean[j]` is the mean of x_j^2 over calibration tokens (the Step 2 statistic);
`a_j = sqrt(sq_mean[j])`. All scores are float32 tensors shaped like W
(out x in), compared only inside one layer (no normalisation).
"""

from __future__ import annotations

import torch


def activation_norm(sq_mean: torch.Tensor) -> torch.Tensor:
    """a_j = sqrt(mean x_j^2)."""
    return sq_mean.float().sqrt()


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|W_ij|."""
    return weight.float().abs()


def wanda_score(weight: torch.Tensor, sq_mean: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2023): |W_ij| * a_j."""
    return weight.float().abs().mul_(activation_norm(sq_mean)[None, :])


def multiflow_score(weight: torch.Tensor, sq_mean: torch.Tensor) -> torch.Tensor:
    """MULTIFLOW information flow (paper Eq. 6): S_ij = imp_out[i] * |W_ij| * imp_in[j].

    imp_out[i] = mean_j |W_ij| a_j (how much signal output neuron i carries),
    imp_in[j]  = mean_i |W_ij| a_j (how much signal input neuron j sends).
    """
    score = weight.float().abs()  # one full-size buffer, scaled in place (7B layers are 45M weights)
    a = activation_norm(sq_mean)
    imp_out = (score @ a) / score.shape[1]
    imp_in = a * score.sum(dim=0) / score.shape[0]
    return score.mul_(imp_out[:, None]).mul_(imp_in[None, :])
