"""Clips of a video and what is done with them: sampling, gathering, clip -> video scores, network expansion.

Pure tensor code (no file or video I/O), used by the heads of Karpathy et al., "Large-scale Video Classification
with Convolutional Neural Networks" (CVPR 2014), and Ng et al., "Beyond Short Snippets" (CVPR 2015).

- Karpathy Sec. 3: "we treat every video as a bag of short, fixed-sized clips"; training sees one random clip
  per video (``random_clip_starts``); Sec. 4.1 "Video-level predictions": 20 clips sampled at random, each
  clip's class predictions averaged over the video (``eval_clip_starts`` + ``average_clip_scores``).
- A clip is given by a start and the frame offsets the model reads (``range(10)`` for Early / Slow Fusion,
  ``(0, 15)`` for Late Fusion, ``(0,)`` for Single-Frame). A video shorter than the clip repeats its frames from
  the start (Ng Sec. 4.1: "frames are repeated from the start for videos that are shorter"), so a clip is always
  made of valid frames and padding never enters it.
- Ng Sec. 3.3 "Network Expansion": a max-pooling model trained on 1 frame initialises a 30-frame model, which
  initialises a 120-frame one (``expand_network``).

Evaluation clips are deterministic under a seed: the seed draws ``num_clips`` positions once, as fractions of the
span a clip may start in, and every video uses them scaled to its own length. A video's clips therefore depend
only on its valid length and the seed, never on its neighbours in a batch or on padding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "average_clip_scores",
    "clip_span",
    "eval_clip_starts",
    "expand_network",
    "gather_clips",
    "random_clip_starts",
]

EVAL_CLIPS = 20  # Karpathy Sec. 4.1: "we randomly sample 20 clips"


def clip_span(offsets: Sequence[int]) -> int:
    """Frames a clip covers: 10 for offsets range(10), 16 for Late Fusion's (0, 15)."""
    return int(max(offsets)) + 1


def _positions(lengths: torch.Tensor, span: int) -> torch.Tensor:
    """Start positions a clip of ``span`` frames can take in each video: max(L - span + 1, 1)."""
    return (lengths - span + 1).clamp_min(1)


def random_clip_starts(lengths: torch.Tensor, span: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """One uniformly random clip start per video (training, Karpathy Sec. 3). lengths: [B] -> starts [B,1]."""
    u = torch.rand(lengths.shape[0], 1, generator=generator, device="cpu").to(lengths.device)  # [B,1]
    return (u * _positions(lengths, span)[:, None]).long()  # [B,1]


def eval_clip_starts(lengths: torch.Tensor, span: int, num_clips: int = EVAL_CLIPS, seed: int = 0):
    """Clip starts for video-level evaluation -> (starts [B,K], clip_mask [B,K]).

    ``num_clips > 0``: K = num_clips starts drawn at random under ``seed`` (Karpathy Sec. 4.1), as fractions of
    each video's start range (see the module docstring). ``num_clips == 0``: every start position (dense,
    stride 1); K is the largest count in the batch and ``clip_mask`` marks the real clips of shorter videos.
    """
    pos = _positions(lengths, span)  # [B]
    if num_clips > 0:
        g = torch.Generator().manual_seed(int(seed))
        u = torch.rand(num_clips, generator=g).to(lengths.device)  # [K], shared by every video
        starts = (u[None, :] * pos[:, None]).long()  # [B,K]
        return starts, torch.ones_like(starts, dtype=torch.bool)
    k = torch.arange(int(pos.max()), device=lengths.device)  # [K]
    cmask = k[None, :] < pos[:, None]  # [B,K]
    return torch.where(cmask, k[None, :], torch.zeros_like(k)[None, :]), cmask


def gather_clips(x: torch.Tensor, lengths: torch.Tensor, starts: torch.Tensor, offsets: Sequence[int]) -> torch.Tensor:
    """Frames of each clip: x[b, (starts[b,k] + offset) mod L_b]. x: [B,T,D], starts: [B,K] -> [B,K,len(offsets),D]."""
    B, _, D = x.shape
    off = torch.as_tensor(list(offsets), device=x.device)  # [L]
    idx = (starts[:, :, None] + off[None, None, :]) % lengths.clamp_min(1)[:, None, None]  # [B,K,L]
    K, L = idx.shape[1:]
    return x.gather(1, idx.reshape(B, K * L, 1).expand(B, K * L, D)).view(B, K, L, D)  # [B,K,L,D]


def average_clip_scores(
    clip_logits: torch.Tensor, clip_mask: torch.Tensor | None = None, space: str = "prob"
) -> torch.Tensor:
    """Video scores from clip scores (Karpathy Sec. 4.1: clip "predictions are averaged"). [B,K,C] -> [B,C].

    ``space="prob"`` averages the clip softmax probabilities and returns their log (so ``softmax`` of the result
    is the averaged distribution); ``space="logit"`` averages the raw scores.
    """
    if clip_mask is None:
        clip_mask = torch.ones(clip_logits.shape[:2], dtype=torch.bool, device=clip_logits.device)
    w = clip_mask[:, :, None].to(clip_logits.dtype)  # [B,K,1]
    if space == "prob":
        p = (clip_logits.softmax(-1) * w).sum(1) / w.sum(1).clamp_min(1)  # [B,C]
        return p.clamp_min(1e-30).log()
    if space == "logit":
        return (clip_logits * w).sum(1) / w.sum(1).clamp_min(1)
    raise ValueError(f"space must be 'prob' or 'logit', got {space!r}")


@torch.no_grad()
def expand_network(small_state: dict[str, torch.Tensor], large: nn.Module) -> dict[str, str]:
    """Initialise a model over more frames from a trained model over fewer (Ng et al. Sec. 3.3), in place.

    "Since pooling is performed after CNN towers that share weights, the parameters for a single-frame and
    multi-frame max-pooling network are very similar": every tensor whose name and shape match is copied
    exactly. The one parameter that grows with the number of frames is Local Pooling's softmax over all towers
    (``[C, towers * H]``, tower-major; a head lists such parameters in ``tower_blocked``). Towers start every
    ``stride`` frames, so the small model's towers are the first towers of the large one and see the same
    frames: their block is copied exactly and the new towers' columns start at zero. The expanded model then
    scores a video as the small model scores its first frames, and fine-tuning teaches the new towers.
    Transfer to other classes (Karpathy et al. Sec. 4.2, "retrain a new classifier"): parameters a head lists in
    ``fresh_on_transfer`` keep their fresh initialisation when the source's differ in shape. Anything else that
    differs in shape raises.

    Returns {name: "copied" | "extended" | "fresh"} for every tensor of ``large``.
    """
    target = large.state_dict()
    missing = sorted(set(target) - set(small_state))
    unexpected = sorted(set(small_state) - set(target))
    if missing or unexpected:
        raise KeyError(f"expand_network: models differ: missing {missing}, unexpected {unexpected}")
    grows = set(getattr(large, "tower_blocked", ()))  # parameters a model declares as growing with its towers
    fresh = set(getattr(large, "fresh_on_transfer", ()))  # a new classifier for new classes
    how, new_state = {}, {}
    for name, dst in target.items():
        src = small_state[name]
        if src.shape == dst.shape:
            new_state[name], how[name] = src.clone(), "copied"
        elif name in grows and src.dim() == 2 and src.shape[0] == dst.shape[0] and dst.shape[1] > src.shape[1]:
            grown = torch.zeros_like(dst)  # [C, N*H]
            grown[:, : src.shape[1]] = src  # [C, n*H] into the first n towers
            new_state[name], how[name] = grown, "extended"
        elif name in fresh:
            new_state[name], how[name] = dst, "fresh"
        else:
            raise ValueError(f"expand_network: {name} {tuple(src.shape)} cannot grow to {tuple(dst.shape)}")
    large.load_state_dict(new_state)
    return how
