"""stylize: restyle a video at video rate with DreamLite-mobile, Qwen3-VL and a tiny VAE."""

__version__ = "0.1.0"
