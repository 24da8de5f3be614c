"""qscore: quantize, validate, score and compare LLM checkpoints."""
__version__ = "0.1.0"
