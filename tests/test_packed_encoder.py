"""The packed multi-stream encoder and the registered ``neuroflow_varlen`` attention: several
streams in one sequence give what each stream alone gives through the unmodified model."""

import pytest
import torch

import neuroflow
import oracle
from conftest import as_double, make_model, video
from neuroflow.ops import dispatch
from neuroflow.models.encoder import Packed, run_packed
from neuroflow.models.families import VisionAdapter
from neuroflow.tooling.testing import assert_close

FAMILIES = ["siglip", "clip", "vit", "dinov2"]
LENGTHS = [5, 1, 17]  # tokens per stream, one stream of a single token


def streams_of_tokens(model, seed=0):
    """Three streams' encoder inputs ``[T_b, D]``: token subsets of different frames."""
    frames = video(3, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb = oracle.encoder_input(model, oracle.embed(model, frames))  # [3, T, D]
    return [emb[b, torch.randperm(emb.shape[1], generator=g)[:n].sort().values] for b, n in enumerate(LENGTHS)]


def alone(model, rows):
    """Each stream alone through the model's own layers (default attention)."""
    out = []
    for r in rows:
        h = r[None]
        for layer in oracle.layers_of(model):
            h = oracle.run_layer(layer, h)
        out.append(h[0])
    return torch.cat(out)


def cu_of(lengths):
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
    return cu


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", ["reference", "triton"])
def test_packed_encoder_equals_streams_alone(family, path, request):
    if path == "triton":
        request.getfixturevalue("triton_path")
    model = make_model(family)
    model64 = as_double(model)
    rows = streams_of_tokens(model)
    cu = cu_of(LENGTHS)
    packed = Packed.exact(cu, torch.zeros(sum(LENGTHS), dtype=torch.int32), LENGTHS, tokens=0)
    with torch.no_grad():
        got = run_packed(VisionAdapter(model).layers, torch.cat(rows), packed)
        ref32 = alone(model, rows)
        ref64 = alone(model64, [r.double() for r in rows])
    assert dispatch.last_path["varlen_attention"] == path
    assert_close(got, ref64, ref32, f"{family} packed encoder")


@pytest.mark.parametrize("family", FAMILIES)
def test_registered_attention_through_from_pretrained(tmp_path, family):
    """``from_pretrained(dir, attn_implementation="neuroflow_varlen")`` runs packed sequences."""
    model = make_model(family)
    model.save_pretrained(tmp_path)
    packed_model = type(model).from_pretrained(tmp_path, attn_implementation=neuroflow.ATTENTION_NAME).eval()
    assert packed_model.config._attn_implementation == neuroflow.ATTENTION_NAME
    rows = streams_of_tokens(model, seed=1)
    cu = cu_of(LENGTHS)
    x = torch.cat(rows)[None]  # [1, T, D]: three sequences packed in one row
    with torch.no_grad():
        layers = oracle.layers_of(packed_model)
        if family == "siglip" or not oracle.takes_packing_kwargs(layers[0]):
            # SigLIP's attention drops packing kwargs, and so do DINOv2's layers in transformers
            # 5.17: boundaries via the context.
            with neuroflow.packed_segments(cu, max(LENGTHS)):
                got = alone(packed_model, [x[0]])
        else:  # CLIP, ViT and (transformers 5.24) DINOv2 forward transformers' packing kwargs
            h = x
            for layer in layers:
                h = oracle.run_layer(layer, h, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(LENGTHS),
                                     max_length_k=max(LENGTHS))
            got = h[0]
        ref32 = alone(model, rows)
        ref64 = alone(as_double(model), [r.double() for r in rows])
    assert dispatch.last_path["varlen_attention"] == dispatch.REFERENCE
    assert_close(got, ref64, ref32, f"{family} neuroflow_varlen attention")


def test_registered_attention_without_boundaries_is_plain_batched_attention():
    model = make_model("vit")
    model.set_attn_implementation(neuroflow.ATTENTION_NAME)
    x = video(2)
    with torch.no_grad():
        got = model(x, interpolate_pos_encoding=True).last_hidden_state
        model.set_attn_implementation("eager")
        ref = model(x, interpolate_pos_encoding=True).last_hidden_state
        ref64 = as_double(model)(x.double(), interpolate_pos_encoding=True).last_hidden_state
    assert_close(got, ref64, ref, "batched")


def test_registered_attention_rejects_masks():
    from neuroflow.models.hf_attention import neuroflow_attention

    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="not an attention mask"):
        neuroflow_attention(torch.nn.Module(), q, q, q, torch.zeros(1, 1, 4, 4))
