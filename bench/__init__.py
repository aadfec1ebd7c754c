"""The benchmarks. Each script runs as `python bench/<name>.py` (the Makefile's bench targets,
bench/gpu_check.sh) and imports its siblings as `bench.<name>`, with the repository root on
sys.path: the scripts put it there, the tests get it from pyproject's pytest `pythonpath`."""
