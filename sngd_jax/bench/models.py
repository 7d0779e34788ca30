"""Flax linen models used by the benchmark and the notebooks."""

from __future__ import annotations

from collections.abc import Sequence

import jax.numpy as jnp
from flax import linen as nn


class MLP(nn.Module):
  """ReLU MLP on flattened inputs (the SNGD paper's shapes: (80, 80, 80))."""

  hidden: Sequence[int]
  outputs: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for width in self.hidden:
      x = nn.relu(nn.Dense(width)(x))
    return nn.Dense(self.outputs)(x)


class Autoencoder(nn.Module):
  """The classic deep autoencoder 784-1000-500-250-30-250-500-1000-784.

  Sigmoid units, a linear 30-unit code; returns the reconstruction's logits.
  """

  encoder: Sequence[int] = (1000, 500, 250, 30)

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    widths = (*self.encoder, *reversed(self.encoder[:-1]), x.shape[-1])
    linear = (len(self.encoder) - 1, len(widths) - 1)  # the code and the output
    for i, width in enumerate(widths):
      x = nn.Dense(width)(x)
      if i not in linear:
        x = nn.sigmoid(x)
    return x


class CNN(nn.Module):
  """Strided 1D/2D convolutions then a dense head (MNIST-1D: 3 x Conv(25, 5, stride 2))."""

  channels: Sequence[int] = (25, 25, 25)
  kernel: int = 5
  outputs: int = 10
  spatial: int = 1

  @nn.compact
  def __call__(self, x):
    if x.ndim == self.spatial + 1:  # add the channel axis
      x = x[..., None]
    for channels in self.channels:
      x = nn.relu(nn.Conv(channels, (self.kernel,) * self.spatial,
                          strides=2)(x))
    return nn.Dense(self.outputs)(x.reshape(x.shape[0], -1))


class GRU(nn.Module):
  """A GRU over the sequence (``nn.RNN``: a scan, captured at every step)."""

  hidden: int = 32
  outputs: int = 10

  @nn.compact
  def __call__(self, x):
    if x.ndim == 2:  # (batch, time) -> one feature per step
      x = x[..., None]
    h = nn.RNN(nn.GRUCell(self.hidden))(x)
    return nn.Dense(self.outputs)(h[:, -1])


class Transformer(nn.Module):
  """Decoder-only character LM: pre-LayerNorm blocks, tied embeddings.

  Learned positions, causal ``MultiHeadDotProductAttention`` and a GELU MLP
  (4x) per block; the logits are ``Embed.attend`` of the final norm's output
  (the input embedding is the output layer).
  """

  vocab: int = 96
  dim: int = 128
  heads: int = 4
  layers: int = 2
  context: int = 64

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, self.dim)
    positions = nn.Embed(self.context, self.dim)(jnp.arange(tokens.shape[1]))
    x = embed(tokens) + positions
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.layers):
      h = nn.LayerNorm()(x)
      x = x + nn.MultiHeadDotProductAttention(self.heads)(h, mask=mask)
      h = nn.Dense(4 * self.dim)(nn.LayerNorm()(x))
      x = x + nn.Dense(self.dim)(nn.gelu(h))
    return embed.attend(nn.LayerNorm()(x))


def _batch_norm(train: bool) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9)


class ResidualBlock(nn.Module):
  """Two 3x3 convolutions with BatchNorm; a strided 1x1 projection on a change of shape."""

  channels: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Conv(self.channels, (3, 3), self.stride, use_bias=False)(x)
    h = nn.relu(_batch_norm(train)(h))
    h = _batch_norm(train)(nn.Conv(self.channels, (3, 3), use_bias=False)(h))
    if x.shape != h.shape:
      x = _batch_norm(train)(
          nn.Conv(self.channels, (1, 1), self.stride, use_bias=False)(x))
    return nn.relu(x + h)


class ResNet(nn.Module):
  """ResNet-20 style (He et al. 2016, CIFAR): three stages of widths 16-32-64.

  ``blocks`` basic residual blocks per stage (3: ResNet-20), global average
  pooling and a dense head. ``train``: BatchNorm uses the batch's statistics
  (and updates ``batch_stats``) instead of the running averages.
  """

  blocks: int = 3
  widths: Sequence[int] = (16, 32, 64)
  outputs: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim == 3:  # add the channel axis
      x = x[..., None]
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False)(x)
    x = nn.relu(_batch_norm(train)(x))
    for stage, width in enumerate(self.widths):
      for block in range(self.blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = ResidualBlock(width, stride)(x, train)
    return nn.Dense(self.outputs)(jnp.mean(x, axis=(1, 2)))
