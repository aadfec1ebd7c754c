"""RatePredictor: DyRate's linear classifier from per-head type mass to a pruning rate.

At every decoding step the scoring layer's attention from the current token splits, per head,
into the mass on the four token types (system, image, instruction, response): a float32
`[B, H, 4]` tensor from `dyrate_ext.attention_stats`. The predictor flattens it to
`[B, H * 4]` and maps it linearly to `K` logits, one per discrete rate `r_k = (k - 1) / K`
(paper eq. 1; in 0-based class indices, class `j` means rate `j / K`: class 0 keeps every image
token). Inference takes the argmax. Training (straight-through Gumbel-Softmax, paper §III-C)
lives elsewhere; an untrained or hand-initialised predictor runs as is.

Beyond the paper, `features` (names from `dyrate_ext.picture_features.PICTURE_FEATURES`, none
by default) adds F picture-dependent inputs computed from the scoring layer's image-token
scores: the linear layer then takes `[B, H * T + F]`, the type mass first, and `forward` /
`predict` take them as `extra` `[B, F]` (`DyRate` computes them with
`image_score_features`). A predictor without features is the paper's and unchanged.

Weights are saved with safetensors, the shape in the file's metadata (and the features, as
the reserved key "features", comma-joined, written only when there are some: a file without
it loads with none), so `RatePredictor.load` needs nothing but the path;
`save(path, metadata=...)` adds entries such as what a trained predictor was trained for, read
back with `RatePredictor.metadata(path)`. safetensors is imported only by `save` and `load`.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from .picture_features import check_features
from .token_types import NUM_TYPES

_FORMAT = "dyrate.RatePredictor/1"
_RESERVED = ("format", "num_heads", "num_rates", "num_types", "features")


class RatePredictor(nn.Module):
    """Linear classifier `[B, H * T]` type mass (+ `[B, F]` picture features) -> `[B, K]`
    logits over the rates `j / K`.

    Args:
        num_heads: query heads H of the scoring layer (the model's `num_attention_heads`).
        num_rates: K, the number of discrete rates; class j means rate j / K.
        num_types: T, token types per head (4: system, image, instruction, response).
        features: picture features (`dyrate_ext.picture_features.PICTURE_FEATURES`) taken as
            F extra inputs after the flattened type mass; () (the paper's predictor) by default.
    """

    def __init__(
        self,
        num_heads: int,
        num_rates: int,
        num_types: int = NUM_TYPES,
        features: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if num_rates < 1:
            raise ValueError(f"num_rates must be >= 1, got {num_rates}")
        if num_types < 1:
            raise ValueError(f"num_types must be >= 1, got {num_types}")
        self.num_heads = int(num_heads)
        self.num_rates = int(num_rates)
        self.num_types = int(num_types)
        self.features = check_features(features)
        self.linear = nn.Linear(
            self.num_heads * self.num_types + len(self.features), self.num_rates
        )

    @classmethod
    def from_image_mass(
        cls, num_heads: int, num_rates: int, high: float, low: float, num_types: int = NUM_TYPES
    ) -> RatePredictor:
        """A hand-set predictor: the class nearest `(K-1) * (high - m) / (high - low)`, clipped
        to [0, K-1], where m is the image attention mass averaged over heads.

        So rate 0 when m >= high, the largest rate (K-1)/K when m <= low, linear in between:
        the less the current token looks at the image, the more image tokens go. It is exact
        as a linear classifier: logit_j = 2 j t - j^2 peaks at the integer j nearest t, and
        t is affine in the type mass.
        """
        if not high > low:
            raise ValueError(f"from_image_mass needs high > low, got high={high}, low={low}")
        model = cls(num_heads, num_rates, num_types)
        span = float(high - low)
        j = torch.arange(num_rates, dtype=torch.float64)
        a = (num_rates - 1) * float(high) / span  # t = a - b * m
        b = (num_rates - 1) / span
        weight = torch.zeros(num_rates, num_heads, num_types, dtype=torch.float64)
        weight[:, :, 1] = (-2.0 * j * b / num_heads)[:, None]
        with torch.no_grad():
            model.linear.weight.copy_(weight.reshape(num_rates, -1))
            model.linear.bias.copy_(2.0 * j * a - j * j)
        return model

    @property
    def in_features(self) -> int:
        """H * T + F: the flattened type mass and the picture features."""
        return self.linear.in_features

    def rates(self) -> Tensor:
        """float32 [K]: the rate of each class, `j / K` for j = 0 .. K-1."""
        return torch.arange(self.num_rates, dtype=torch.float32) / self.num_rates

    def forward(self, type_mass: Tensor, extra: Tensor | None = None) -> Tensor:
        """Logits float [B, K] from type mass `[B, H, T]` or already flattened `[B, H * T]`
        and, for a predictor with F features, their values `extra` float [B, F] (in the order
        of `features`; `image_score_features(token_score, token_type, features)`)."""
        x = type_mass.reshape(type_mass.shape[0], -1) if type_mass.dim() == 3 else type_mass
        mass_size = self.num_heads * self.num_types
        if x.dim() != 2 or x.shape[1] != mass_size:
            raise ValueError(
                f"RatePredictor expects type mass [B, {self.num_heads}, {self.num_types}] "
                f"(or [B, {mass_size}]), got {tuple(type_mass.shape)}"
            )
        w = self.linear.weight
        x = x.to(device=w.device, dtype=w.dtype)
        if self.features:
            x = torch.cat([x, self._check_extra(extra, x.shape[0]).to(x)], dim=1)
        elif extra is not None and extra.numel() > 0:
            raise ValueError(
                f"RatePredictor has no picture features but got extra {tuple(extra.shape)}"
            )
        return self.linear(x)

    def _check_extra(self, extra: Tensor | None, batch: int) -> Tensor:
        """`extra` if it is [batch, F], else ValueError."""
        want = (batch, len(self.features))
        if extra is None or tuple(extra.shape) != want:
            got = None if extra is None else tuple(extra.shape)
            raise ValueError(
                f"RatePredictor with features {self.features} needs extra [B, F] = {want} "
                "(dyrate_ext.picture_features.image_score_features(token_score, token_type, "
                f"features)), got {got}"
            )
        return extra

    @torch.no_grad()
    def predict(self, type_mass: Tensor, extra: Tensor | None = None) -> Tensor:
        """int64 [B]: the argmax class per sample (rate = class / K); `extra` as `forward`."""
        return self.forward(type_mass, extra).argmax(dim=-1)

    def save(self, path: str | os.PathLike[str], metadata: dict[str, str] | None = None) -> None:
        """Write the weights and the shape (as metadata) to a safetensors file.

        `metadata` adds string entries (e.g. what the predictor was trained for: k, budget,
        model); `metadata(path)` reads them back. The shape keys and "features" cannot be
        overridden; "features" is written only for a predictor with features.
        """
        from safetensors.torch import save_file

        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = {
            "format": _FORMAT,
            "num_heads": str(self.num_heads),
            "num_rates": str(self.num_rates),
            "num_types": str(self.num_types),
        }
        if self.features:
            meta["features"] = ",".join(self.features)
        extra = dict(metadata or {})
        clash = sorted(set(extra) & set(_RESERVED))
        if clash:
            raise ValueError(
                f"metadata keys {clash} are reserved for the predictor's shape and features"
            )
        bad = sorted(
            k for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)
        )
        if bad:
            raise ValueError(f"metadata keys and values must be strings; bad entries: {bad}")
        save_file(tensors, os.fspath(path), metadata={**meta, **extra})

    @staticmethod
    def metadata(path: str | os.PathLike[str]) -> dict[str, str]:
        """All metadata of a file written by `save` (the shape keys and any extra entries)."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            return dict(f.metadata() or {})

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: str | torch.device = "cpu"
    ) -> RatePredictor:
        """Read a predictor written by `save`; raises ValueError for a file of another format."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(
                    f"{os.fspath(path)} is not a RatePredictor file (metadata format "
                    f"{meta.get('format')!r}, expected {_FORMAT!r})"
                )
            state = {k: f.get_tensor(k) for k in f.keys()}
        features = tuple(meta["features"].split(",")) if meta.get("features") else ()
        model = cls(
            int(meta["num_heads"]), int(meta["num_rates"]), int(meta["num_types"]), features
        )
        model.load_state_dict(state)
        return model.to(device)

    def extra_repr(self) -> str:
        feats = f", features={self.features}" if self.features else ""
        return (
            f"num_heads={self.num_heads}, num_rates={self.num_rates}, "
            f"num_types={self.num_types}{feats}"
        )
