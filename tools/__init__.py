"""Repository tools (not installed with dyrate_ext). Each module runs as a script
(`python tools/readme_sections.py ...`); this file makes them importable as `tools.<name>` with
the repository root on sys.path, as the tests (pyproject's pytest `pythonpath`) and the bench
scripts have it."""
