"""The compact vocabulary: BERT's segmentation, the ids a corpus uses renumbered 0..V-1 (others read as
[UNK]), kept in the model's config.json and read back by resume, from_pretrained, the figures and the
Hub card; official-size models unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from m3ae import M3AE, ConfigError, M3AEConfig, get_tokenizer
from m3ae.cli import main
from m3ae.data import DataConfig
from m3ae.data.loader import caption_sample
from m3ae.data.tokenizer import Tokenizer
from m3ae.model.hub import model_card
from m3ae.train.vocabulary import settle_vocabulary

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # bert-base-uncased ids 0, 100, 101, 102, 103
# bert-base-uncased ids: "." 1012, "a" 1037, "red" 2417, "##fish" 7529, "kangaroo" 21652, "zebra" 29145
CORPUS = ["A red kangaroo.", "a zebrafish"]
CORPUS_VOCABULARY = SPECIALS + [".", "a", "red", "##fish", "kangaroo", "zebra"]


def compact() -> Tokenizer:
    return Tokenizer.from_name("bert-base-uncased", 8, CORPUS_VOCABULARY)


def test_the_vocabulary_of_a_corpus_is_its_tokens_and_the_special_ones_in_bert_order():
    assert Tokenizer.from_name("bert-base-uncased").compact_vocabulary(CORPUS) == CORPUS_VOCABULARY


def test_text_to_compact_ids_to_words_round_trips_with_the_official_pieces():
    tokenizer = compact()
    ids = tokenizer.encode(["a red zebrafish."])[0]
    assert ids == [6, 7, 10, 8, 5]  # positions in CORPUS_VOCABULARY
    assert [tokenizer.id_to_token(i) for i in ids] == ["a", "red", "zebra", "##fish", "."]
    assert tokenizer.vocab_size == len(CORPUS_VOCABULARY) and tokenizer.token_to_id("kangaroo") == 9
    text, padding = tokenizer(["a red kangaroo."])
    assert text.tolist() == [[6, 7, 9, 5, 0, 0, 0, 0]]
    assert padding.tolist() == [[False] * 4 + [True] * 4]


def test_unseen_pieces_read_as_unk_in_place_keeping_the_official_token_count():
    tokenizer, full = compact(), Tokenizer.from_name("bert-base-uncased")
    text = "a blue kangaroo eats a zebrafish"  # "blue" and "eats" are not in the corpus
    ids = tokenizer.encode([text])[0]
    assert len(ids) == len(full.encode([text])[0]) == 7
    assert ids == [6, 1, 9, 1, 6, 10, 8] and tokenizer.unk_id == 1


def test_a_vocabulary_that_does_not_fit_the_tokenizer_is_refused():
    with pytest.raises(ValueError, match=r"lacks \[UNK\]"):
        Tokenizer.from_name("bert-base-uncased", vocabulary=["[PAD]", "a"])
    with pytest.raises(ValueError, match="does not have"):
        Tokenizer.from_name("bert-base-uncased", vocabulary=["[PAD]", "[UNK]", "notawordpiece"])
    with pytest.raises(ValueError, match="id 0 must be the padding token"):
        Tokenizer.from_name("bert-base-uncased", vocabulary=["[UNK]", "[PAD]"])
    with pytest.raises(ValueError, match="twice"):
        Tokenizer.from_name("bert-base-uncased", vocabulary=["[PAD]", "[UNK]", "a", "a"])
    with pytest.raises(ConfigError, match="vocab_size"):
        M3AEConfig.from_preset("tiny", vocabulary=CORPUS_VOCABULARY)  # vocab_size left at 30522


def test_save_and_from_pretrained_carry_the_vocabulary_and_the_tokenizer(tmp_path):
    config = M3AEConfig.from_preset("tiny", vocab_size=len(CORPUS_VOCABULARY), vocabulary=CORPUS_VOCABULARY,
                                    tokenizer="bert-base-uncased")
    torch.manual_seed(0)
    model = M3AE(config).eval()
    model.preprocessing = DataConfig().preprocessing()  # as pretraining records it
    model.save_pretrained(tmp_path / "model", card_info={})
    loaded = M3AE.from_pretrained(tmp_path / "model").eval()
    assert loaded.config.vocabulary == CORPUS_VOCABULARY and loaded.config.tokenizer == "bert-base-uncased"
    assert loaded.text_embedding.weight.shape == (len(CORPUS_VOCABULARY), config.emb_dim)
    text, padding = Tokenizer.for_model(loaded.config)(["a red kangaroo."])
    assert text[0, :4].tolist() == [6, 7, 9, 5]
    # the open_clip-style entry point gives the same ids
    assert get_tokenizer(tmp_path / "model")(["a red kangaroo."])[0].tolist() == text.tolist()
    image = torch.randn(1, 3, config.image_size, config.image_size)
    torch.testing.assert_close(loaded.encode(image, text, padding).cls, model.encode(image, text, padding).cls)
    card = (tmp_path / "model" / "README.md").read_text()
    assert f"a compact vocabulary of {len(CORPUS_VOCABULARY)} of its tokens" in card
    assert "zebra" not in card  # the list itself stays in config.json
    assert json.loads((tmp_path / "model" / "config.json").read_text())["vocabulary"] == CORPUS_VOCABULARY


def test_official_size_models_keep_the_full_vocabulary():
    config = M3AEConfig()
    assert config.vocabulary is None and config.vocab_size == 30522
    assert "vocabulary 30522" in model_card(config)
    # data.vocab=full: nothing is scanned, the size stays the tokenizer's
    settled = settle_vocabulary(M3AEConfig.from_preset("tiny"), DataConfig(source="/nonexistent", vocab="full"), None)
    assert settled.vocabulary is None and settled.vocab_size == 30522 and settled.tokenizer == "bert-base-uncased"


def test_the_embedded_tokenizer_compacts_to_itself():
    from m3ae.data.synth import caption_vocabulary

    words = [w for w in caption_vocabulary() if not w.startswith("[")]
    embedded = Tokenizer.from_name("m3ae-embedded")
    assert embedded.compact_vocabulary([" ".join(words)]) == caption_vocabulary()


def write_caption_folder(root, captions):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index, caption in enumerate(captions):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(root / f"{index:03d}.png")
        (root / f"{index:03d}.txt").write_text(caption)
    return root


def test_the_caption_sample_stops_at_vocab_sample_reading_whole_units(tmp_path):
    source = write_caption_folder(tmp_path / "data", [f"caption {i}" for i in range(12)])
    sample = caption_sample(DataConfig(source=str(source), index_unit_size=4, vocab_sample=5))
    numbers = [int(caption.split()[1]) for caption in sample]
    assert len(numbers) == 5 and len(set(numbers)) == 5
    first = numbers[0] // 4  # a unit of 4 read whole, then the first caption of another
    assert numbers[:4] == list(range(4 * first, 4 * first + 4)) and numbers[4] % 4 == 0 and numbers[4] // 4 != first


def test_pretraining_on_captions_trains_a_compact_model_that_resumes_and_draws_with_it(tmp_path, capsys):
    captions = ["a red kangaroo.", "a zebrafish", "a red zebrafish.", "a kangaroo"] * 2
    data = write_caption_folder(tmp_path / "data", captions)
    run = tmp_path / "run"
    common = ["pretrain", "--out-dir", str(run), "--data.source", str(data), "--data.num_workers", "0",
              "--model.image-size", "32", "--model.text-length", "8", "--train.batch_size", "4",
              "--train.total_steps", "4", "--log.every", "1", "--log.progress", "false", "--log.figures_every", "2",
              "--train.precision", "fp32"]
    assert main([*common, "--max-steps", "2"]) == 0
    step2 = json.loads((run / "checkpoints" / "step_00000002" / "config.json").read_text())
    assert step2["vocabulary"] == CORPUS_VOCABULARY and step2["vocab_size"] == len(CORPUS_VOCABULARY)
    # new words in the data do not change a resumed run's vocabulary (its weights are sized for it)
    (data / "000.txt").write_text("a purple wombat")
    assert main([*common, "--resume", "auto"]) == 0
    capsys.readouterr()
    model = M3AE.from_pretrained(run)
    assert model.config.vocabulary == CORPUS_VOCABULARY
    assert model.text_embedding.weight.shape[0] == model.decoder_text_output.out.out_features == len(CORPUS_VOCABULARY)
    # the figures decode the model's ids into its words
    guesses = (run / "figures" / "captions_00000004.txt").read_text()
    assert "kangaroo" in guesses or "zebra" in guesses
    # viz reads the tokenizer and vocabulary from the model: no --tokenizer
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    assert main(["reconstruct", "--checkpoint", str(run), "--image", str(tmp_path / "x.png"),
                 "--caption", "a red kangaroo.", "--out", str(tmp_path / "r.png"), "--text-mask-ratio", "0.5"]) == 0
    assert (tmp_path / "r.png").is_file()
    # caption features read the captions in the model's ids ("purple" and "wombat" as [UNK])
    assert main(["embed", "--checkpoint", str(run), "--data.source", str(data), "--modality", "text",
                 "--out", str(tmp_path / "text.safetensors")]) == 0
    assert "8 text features" in capsys.readouterr().out
