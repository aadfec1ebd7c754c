"""The SIMT emulator of the CUDA kernels: `from tools.simt_emu import build` (see build.py)."""
