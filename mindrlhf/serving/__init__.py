"""Serving and sharing a trained reward model: the HTTP reward server (OpenRLHF's remote reward-model contract)
and the Hugging Face export orchestration.

The highest layer of the package: it uses evaluation (RewardScorer, the run's template, reward statistics) and
models (export); nothing below imports it. FastAPI and uvicorn are imported only by the server itself.
"""
