"""LAION-CLAP through the user's path: HTSAT-base audio branch (real), the published checkpoint
format, the Hugging Face cache it reads roberta-base from (here a small one, written locally)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from wavflow.errors import WeightsError
from wavflow.evaluate.models import ClapNet, _hub_offline

VOCAB = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "Ġdog": 5, "Ġbarks": 6, "d": 7, "o": 8, "g": 9,
         "<mask>": 10}


def write_hf_cache(home: Path) -> Path:
    """A Hugging Face cache holding a `roberta-base` repo: tokenizer files and a 1-layer RoBERTa
    of CLAP's width (768); the CLAP checkpoint overwrites the text weights anyway."""
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    repo = home / "hub" / "models--roberta-base"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    RobertaTokenizer(vocab=VOCAB, merges=[]).save_pretrained(snap)
    cfg = RobertaConfig(vocab_size=len(VOCAB), hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                        intermediate_size=64, max_position_embeddings=80, type_vocab_size=1, pad_token_id=1)
    RobertaModel(cfg).save_pretrained(snap)
    return home


@pytest.mark.slow
def test_clap_loads_published_format_from_the_hf_cache(tmp_path: Path) -> None:
    home = write_hf_cache(tmp_path / "hf")
    torch.manual_seed(0)
    with _hub_offline(str(home)):
        import laion_clap

        source = laion_clap.CLAP_Module(enable_fusion=False, amodel="HTSAT-base", device="cpu").eval()
    state = {"module." + k: v for k, v in source.model.state_dict().items()}
    state["module.text_branch.embeddings.position_ids"] = torch.arange(80)[None]  # older transformers kept it
    torch.save({"state_dict": state, "epoch": 15}, tmp_path / "clap.pt")  # the training checkpoint layout

    clap = ClapNet.from_file(tmp_path / "clap.pt", hf_home=str(home))
    wave = torch.randn(2, 48000 * 2) * 0.1
    with torch.no_grad():
        a = clap.audio(wave)
        t = clap.text(["a dog barks"])
        assert torch.allclose(a, source.get_audio_embedding_from_data(wave, use_tensor=True), atol=1e-5)
        assert torch.allclose(t, source.get_text_embedding(["a dog barks"], use_tensor=True), atol=1e-5)
    assert a.shape == (2, 512) and t.shape == (1, 512)
    with pytest.raises(WeightsError, match="do not match"):
        torch.save({"state_dict": {"x": torch.zeros(1)}}, tmp_path / "bad.pt")
        ClapNet.from_file(tmp_path / "bad.pt", hf_home=str(home))


@pytest.mark.slow
def test_clap_without_the_hf_cache_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="roberta-base.*weights.clap_hf_home"):
        ClapNet.from_file(tmp_path / "unused.pt", hf_home=str(tmp_path / "empty"))
