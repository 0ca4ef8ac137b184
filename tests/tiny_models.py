"""Tiny random-weight models built offline, so engine tests run real transformers/diffusers code fast.

Nothing here downloads: tokenizers are trained or written on the spot and models are initialised from
small configs, then saved with `save_pretrained` so they load the way a real model would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "GPUs run inference jobs for people who submit them.",
    "Workers report progress, the scheduler places jobs, and the log remembers everything.",
    "Hello world! How are you today? I am fine, thank you.",
]
EOS = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tiny_gpt2(path: Path, *, chat_template: bool = True) -> Path:
    """A 2-layer GPT-2 with a byte-level BPE vocabulary of a few hundred tokens."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # No byte alphabet beyond what the sentences use: every token decodes to readable ASCII.
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=[EOS])
    bpe.train_from_iterator(SENTENCES, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS)
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    eos_id = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2, initializer_range=0.5,
        bos_token_id=eos_id, eos_token_id=eos_id,
    )
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        # The output head is tied to the embeddings: a zero row gives EOS a logit of 0, below the
        # best of the others, so greedy output always runs to `max_new_tokens`.
        model.transformer.wte.weight[eos_id].zero_()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_encoder(path: Path) -> Path:
    """A 2-layer BERT encoder with a WordPiece vocabulary trained on `SENTENCES` (for embeddings)."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer = normalizers.BertNormalizer(lowercase=True)
    wordpiece.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wordpiece.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    wordpiece.decoder = decoders.WordPiece()
    wordpiece.train_from_iterator(SENTENCES, trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=wordpiece, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        model_max_length=64,
    )
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
    )
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_diffusion(path: Path) -> Path:
    """A Stable-Diffusion-shaped pipeline (UNet, VAE, CLIP text encoder, scheduler) at toy size."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=600, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        )
    )
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=character_clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.save_pretrained(path)
    return path


def character_clip_tokenizer() -> CLIPTokenizer:
    """CLIP's BPE with one token per byte (and per word-final byte) and no merges."""
    symbols = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, EOS: 1}
    for symbol in symbols + [f"{s}</w>" for s in symbols]:
        vocab[symbol] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def build_qwen2_shaped(path: Path, *, full: bool) -> Path:
    """A random-weight Qwen2 with a chat template: Qwen2-0.5B's shape when `full` (24 layers of 896,
    grouped-query attention with 2 KV heads, its 151,936-token vocabulary), else a toy of the same
    structure. The tokenizer is the tiny BPE one, so ids past its vocabulary decode to nothing."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    build_tiny_gpt2(path)  # the tokenizer, with its chat template
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    shape = (
        dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768)
        if full
        else dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    )
    for stale in path.glob("*.safetensors"):
        stale.unlink()
    torch.manual_seed(0)
    config = Qwen2Config(**shape, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    Qwen2ForCausalLM(config).to(torch.bfloat16 if full else torch.float32).save_pretrained(path)
    return path


def sdxl_shaped_pipeline(*, full: bool, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Any:
    """A random-weight Stable Diffusion XL pipeline with `EulerDiscreteScheduler`, built in memory:
    SDXL's shapes when `full` (2.6B-parameter UNet, both text encoders, the 1024-pixel VAE), else a toy
    of the same structure (two text encoders, `text_time` conditioning)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    with torch.device(device):
        if full:
            unet = UNet2DConditionModel(
                sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=2816,
            )
            vae = AutoencoderKL(
                block_out_channels=(128, 256, 512, 512), latent_channels=4, sample_size=1024, scaling_factor=0.13025,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, force_upcast=True,
            )
            encoders = ((768, 12, 12, 3072), (1280, 32, 20, 5120))
        else:
            unet = UNet2DConditionModel(
                sample_size=16, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                transformer_layers_per_block=(1, 1), cross_attention_dim=32, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=64,
            )
            vae = AutoencoderKL(
                block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4, sample_size=32,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            )
            encoders = ((16, 2, 2, 32), (16, 2, 2, 32))
        text_encoders = [
            cls(CLIPTextConfig(
                vocab_size=600, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=inner, projection_dim=hidden, max_position_embeddings=77,
                bos_token_id=0, eos_token_id=1, pad_token_id=1,
            ))
            for cls, (hidden, layers, heads, inner) in zip((CLIPTextModel, CLIPTextModelWithProjection), encoders)
        ]
    pipeline = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1],
        tokenizer=character_clip_tokenizer(), tokenizer_2=character_clip_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(beta_schedule="scaled_linear", steps_offset=1),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device, dtype)
