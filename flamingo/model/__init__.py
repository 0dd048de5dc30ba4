"""The model: Perceiver Resampler, gated cross-attention blocks, backbone loading and the Flamingo module."""
