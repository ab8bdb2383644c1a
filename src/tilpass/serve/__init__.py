"""Serving many adapters on one base model: an OpenAI-compatible HTTP server (`api.py`) over
a continuous-batching engine (`engine.py`, `kv.py`, `sampling.py`) with an on-demand LRU
adapter cache (`adapters.py`) and Prometheus metrics (`metrics.py`); `tilpass serve` is
built in `cli.py`."""
