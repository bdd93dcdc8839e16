"""What every torch head must do with lengths and masks, as checks that the head families' test files share:
any length, a padded batch equal to each video alone, and padding frames that change no output or loss."""

from __future__ import annotations

import torch


def padded_batch(lengths, T=None, dim=12, seed=1):
    """Random features ``[B, T, dim]`` and the mask of the first ``lengths[i]`` frames of each video."""
    g = torch.Generator().manual_seed(seed)
    T = T or max(lengths)
    x = torch.randn(len(lengths), T, dim, generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return x, mask


def check_any_length(model, T: int, dim: int, num_classes: int) -> None:
    """Three videos of ``T`` frames: finite ``[3, C]`` scores, the same with an all-true mask as without one."""
    x, mask = padded_batch([T] * 3, dim=dim)
    with torch.no_grad():
        out, out_masked = model(x), model(x, mask)
    assert out.shape == (3, num_classes) and torch.isfinite(out).all()
    torch.testing.assert_close(out, out_masked)


def check_mixed_lengths(model, dim: int) -> None:
    """A batch of videos of different lengths scores each video as it scores alone."""
    lengths = [9, 4, 1, 2]
    x, mask = padded_batch(lengths, dim=dim)
    with torch.no_grad():
        batched = model(x, mask)
        alone = torch.cat([model(x[i:i + 1, :n]) for i, n in enumerate(lengths)])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


def check_padding_changes_nothing(model, dim: int) -> None:
    """Padding frames of large values appended after each video change neither the scores nor the loss."""
    x, mask = padded_batch([6, 3, 5], dim=dim)
    junk = torch.randn(3, 4, dim) * 100  # any leak of the padding would show
    xp, mp = torch.cat([x, junk], 1), torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    y = torch.tensor([0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask), model(xp, mp), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.loss(x, mask, y), model.loss(xp, mp, y), atol=1e-5, rtol=1e-5)
