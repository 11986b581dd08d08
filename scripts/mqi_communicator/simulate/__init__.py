"""The engine step: runs MOQUI's tps_env (or the built-in engine) on one beam and judges the run."""
