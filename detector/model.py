"""The LSTM encoder-decoder (EncDec-AD family): architecture only, no runtime logic."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = ["LSTMAutoencoder"]


class LSTMAutoencoder(nn.Module):
    """An LSTM encoder that advances with each reading and a decoder that rebuilds the last `window` readings.

    The encoder is stateful: its (h, c) is carried from batch to batch per stream. At any reading, the
    encoder's top-layer output summarises the stream so far; the decoder reconstructs the last `window`
    readings from that summary alone (a bottleneck), so readings the model did not learn to expect come back
    with a large error. With `forecast`, a linear head beside the decoder predicts the next reading from the
    same summary (detector.forecast): a forecast does not follow a level the stream has just jumped to, as a
    reconstruction does.

    >>> m = LSTMAutoencoder(n_features=3, hidden_size=8, window=5)
    >>> out, (h, c) = m.encode(torch.zeros(2, 7, 3), torch.tensor([7, 4]), m.zero_state(2))
    >>> tuple(out.shape), tuple(h.shape), tuple(m.decode(out[:, 3]).shape)
    ((2, 7, 8), (1, 2, 8), (2, 5, 3))
    >>> tuple(LSTMAutoencoder(3, 8, window=5, forecast=True).predict_next(out).shape)
    (2, 7, 3)
    """

    def __init__(self, n_features: int, hidden_size: int = 64, num_layers: int = 1, window: int = 64,
                 forecast: bool = False) -> None:
        super().__init__()
        self.n_features = n_features
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.window = window
        self.encoder = nn.LSTM(n_features, hidden_size, num_layers, batch_first=True)
        self.bridge = nn.Linear(hidden_size, 2 * hidden_size)
        self.position = nn.Parameter(torch.randn(window, 8) * 0.1)
        self.decoder = nn.LSTM(hidden_size + 8, hidden_size, 1, batch_first=True)
        self.head = nn.Linear(hidden_size, n_features)
        self.next_head = nn.Linear(hidden_size, n_features) if forecast else None

    @property
    def forecasts(self) -> bool:
        """Whether the model has a head that predicts the next reading."""
        return self.next_head is not None

    def zero_state(self, batch: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh (h, c) encoder state for `batch` streams."""
        shape = (self.num_layers, batch, self.hidden_size)
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def encode(
        self, x: torch.Tensor, lengths: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Advance the encoder over padded readings (B, T, F); return top outputs (B, T, H) and final (h, c)."""
        if bool((lengths == x.shape[1]).all()):
            out, (h, c) = self.encoder(x, state)
            return out, (h, c)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out_p, (h, c) = self.encoder(packed, state)
        out, _ = pad_packed_sequence(out_p, batch_first=True, total_length=x.shape[1])
        return out, (h, c)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruct the last `window` readings (K, W, F) from encoder outputs z (K, H)."""
        k = z.shape[0]
        h0, c0 = torch.tanh(self.bridge(z)).chunk(2, dim=-1)
        inp = torch.cat(
            [z.unsqueeze(1).expand(k, self.window, self.hidden_size), self.position.expand(k, -1, -1)], dim=-1
        )
        out, _ = self.decoder(inp, (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous()))
        return self.head(out)

    def predict_next(self, out: torch.Tensor) -> torch.Tensor:
        """The next reading (..., F) predicted from encoder outputs (..., H); needs a model built with forecast."""
        if self.next_head is None:
            raise ValueError("this model has no forecast head (train it with --forecast)")
        return self.next_head(out)
