"""Tiny random models of real transformers classes, saved as local folders, for tests of the real-weight code paths
(nothing is downloaded: configs, vocabularies and weights are made here)."""
import os

import torch


def tiny_grounding_dino(folder: str, words: tuple[str, ...] = ("dog", "cat")) -> str:
    """A GroundingDinoForObjectDetection + processor (Swin backbone, BERT text encoder) knowing `words`."""
    from transformers import (BertConfig, BertTokenizer, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoProcessor, SwinConfig)
    from transformers.models.grounding_dino.image_processing_pil_grounding_dino import GroundingDinoImageProcessorPil

    os.makedirs(folder, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", *words]
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab))
    torch.manual_seed(0)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=4,
                                   image_size=64, out_indices=[2, 3, 4]),
        text_config=BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=37, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, num_queries=9, num_feature_levels=4, encoder_n_points=2,
        decoder_n_points=2, max_text_len=32)
    GroundingDinoForObjectDetection(config).save_pretrained(folder)
    processor = GroundingDinoProcessor(image_processor=GroundingDinoImageProcessorPil(
        size={"shortest_edge": 64, "longest_edge": 100}), tokenizer=BertTokenizer(os.path.join(folder, "vocab.txt")))
    processor.save_pretrained(folder)
    return folder
