"""The transformers internals `dyrate_ext.hf` hooks into, checked at `pruning()` entry.

`_compat.check_api` must pass on every supported family with the installed transformers (so
this file fails on the next release that moves one of them), and each kind of change it
guards against must be refused with a message naming the transformers version, before
anything is installed on the model.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

import transformers
from hf_models import FAMILIES, tiny_model
from transformers.cache_utils import Cache

import dyrate_ext.hf as hf
from dyrate_ext.hf import _compat
from dyrate_ext.policies import FastV


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_every_family_passes_the_api_check(family, attn):
    model = tiny_model(family, attn)
    layers = list(_compat.decoder_layers(model))
    eager = _compat.check_api(model, layers)
    assert callable(eager) and eager.__name__ == "eager_attention_forward"
    assert eager.__module__ == type(layers[0].self_attn).__module__


def _refused(model, match: str) -> None:
    impl = model.config.get_text_config(decoder=True)._attn_implementation
    with pytest.raises(RuntimeError, match=match) as err:
        with hf.pruning(model, FastV(k=1, r=0.5)):
            pass
    assert "generate" not in vars(model) or match.startswith("Llava")
    assert model.config.get_text_config(decoder=True)._attn_implementation == impl
    if "differs" in match:
        assert transformers.__version__ in str(err.value)


def test_changed_cache_signature_is_refused(monkeypatch):
    model = tiny_model("llava")

    def get_mask_sizes(self, query_length: int, layer_index: int, extra: int = 0):
        raise AssertionError("never called")

    monkeypatch.setattr(Cache, "get_mask_sizes", get_mask_sizes)
    _refused(model, "differs.*Cache.get_mask_sizes")


def test_layer_without_position_embeddings_is_refused(monkeypatch):
    model = tiny_model("llava")
    layer_cls = type(_compat.decoder_layers(model)[0])

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        raise AssertionError("never called")

    monkeypatch.setattr(layer_cls, "forward", forward)
    _refused(model, "differs.*position_embeddings")


def test_missing_eager_attention_is_refused(monkeypatch):
    model = tiny_model("llava")
    module = __import__(type(_compat.decoder_layers(model)[0].self_attn).__module__, fromlist=["x"])
    monkeypatch.delattr(module, "eager_attention_forward")
    _refused(model, "differs.*eager_attention_forward")


def test_replaced_generate_and_nested_blocks_are_refused():
    model = tiny_model("llava")
    with hf.pruning(model, FastV(k=1, r=0.5)):
        with pytest.raises(RuntimeError, match="already inside"):
            with hf.pruning(model, FastV(k=1, r=0.5)):
                pass
        assert "generate" in vars(model)  # the outer block's wrapper survived the refusal
    assert "generate" not in vars(model)
    model.generate = lambda *a, **k: None  # someone else's wrapper
    with pytest.raises(RuntimeError, match="already replaced"):
        with hf.pruning(model, FastV(k=1, r=0.5)):
            pass
    assert vars(model)["generate"]() is None
    del model.generate
    with hf.pruning(model, FastV(k=1, r=0.5)):
        assert "generate" in vars(model)
