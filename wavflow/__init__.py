"""WavFlow: raw-waveform flow-matching audio generation (VT2A / T2A / V2A)."""

__version__ = "0.1.0"
