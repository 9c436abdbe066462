"""The models a FramePack job runs: where FramePack's code comes from, the two variants, and loading.

This module says *what* runs (the real models as FramePack's demos load them,
or tiny random-weight ones built from the same classes for tests and CPU runs,
and diffusers' FramePack pipeline around the tiny components); :mod:`.job` says
*how a job runs* on them.

Nothing heavy happens at import time: FramePack's modules, diffusers and
transformers are imported when first needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import io
import logging
import threading
import types
from collections.abc import Iterator, Mapping
from typing import Any

import torch


logger = logging.getLogger(__name__)

#: FramePack switches to "high VRAM" mode (everything resident on the GPU) above this much free memory.
HIGH_VRAM_THRESHOLD_GB = 60.0
#: The model name tiny random-weight pipelines write into calibration profiles.
TINY_MODEL_ID = "tiny-random"
HUNYUAN_REPO = "hunyuanvideo-community/HunyuanVideo"
SIGLIP_REPO = "lllyasviel/flux_redux_bfl"


# ---------------------------------------------------------------------------
# Finding FramePack
# ---------------------------------------------------------------------------

@functools.cache
def framepack_modules() -> types.SimpleNamespace:
    """Import FramePack's helper modules once and hand them out as one namespace.

    Inside a FramePack checkout (the demo scripts are dropped into one) the code
    is the top-level package ``diffusers_helper`` and must win, so the user's own
    FramePack version is the one that runs; otherwise the ``framepack`` package
    from the index provides it as ``framepack.diffusers_helper``.  The choice is
    made on whether a top-level ``diffusers_helper`` exists at all, so a broken
    checkout raises its own ImportError instead of silently falling back.

    ``diffusers_helper.memory`` reads the current CUDA device at import, so it is
    only imported when CUDA is available (``memory`` is None otherwise).
    """
    if importlib.util.find_spec("diffusers_helper") is not None:
        prefix, source = "diffusers_helper", "checkout"
    else:
        prefix, source = "framepack.diffusers_helper", "package"

    def load(name: str) -> types.ModuleType:
        return importlib.import_module(f"{prefix}.{name}")

    # FramePack's modules print which attention backends they found ("Xformers is not
    # installed!" and three more lines) on every start: that goes to the debug log instead.
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        modules = types.SimpleNamespace(
            hunyuan=load("hunyuan"),
            utils=load("utils"),
            sampler=load("pipelines.k_diffusion_hunyuan"),
            clip_vision=load("clip_vision"),
            bucket_tools=load("bucket_tools"),
            models=load("models.hunyuan_video_packed"),
            memory=load("memory") if torch.cuda.is_available() else None,
            source=source,
        )
    for line in printed.getvalue().splitlines():
        logger.debug("FramePack: %s", line)
    logger.info("FramePack code from the %s (%s)", source, prefix)
    return modules


@contextlib.contextmanager
def cast_quietly() -> Iterator[None]:
    """Cast diffusers models with ``.to(dtype)`` without diffusers' note on every call.

    diffusers warns "There are modules in X that should be kept in float32: []"
    whenever a model is cast with ``to()``, also when that list is empty, as it is
    for FramePack's models (FramePack's own loading casts the same way).
    """
    note = logging.getLogger("diffusers.models.modeling_utils")
    level = note.level
    note.setLevel(logging.ERROR)
    try:
        yield
    finally:
        note.setLevel(level)


# ---------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
    """What distinguishes FramePack from FramePack-F1 for this pipeline.

    ``forward_sections``: F1 generates sections in playback order, each one
    conditioned on the latest history; FramePack generates the last section
    first, anchored on the input image, and walks backwards.
    """

    name: str
    title: str
    transformer_repo: str
    forward_sections: bool


VARIANTS: Mapping[str, Variant] = types.MappingProxyType({
    "framepack": Variant("framepack", "FramePack", "lllyasviel/FramePackI2V_HY", forward_sections=False),
    "f1": Variant("f1", "FramePack-F1", "lllyasviel/FramePack_F1_I2V_HY_20250503", forward_sections=True),
})


def get_variant(variant: str | Variant) -> Variant:
    """Resolve a variant name (or pass a Variant through); ValueError names the accepted ones."""
    if isinstance(variant, Variant):
        return variant
    try:
        return VARIANTS[variant]
    except (KeyError, TypeError):
        raise ValueError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANTS)}") from None


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Models:
    """Every model a job needs, plus where and how they run.

    ``device`` is where sampling and decoding happen.  ``high_vram`` False means
    FramePack's low-VRAM regime: models live on the CPU and are moved in and out
    of the GPU around each stage (the transformer streamed by DynamicSwap).
    """

    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    vae: Any
    feature_extractor: Any
    image_encoder: Any
    transformer: Any
    variant: Variant
    device: torch.device
    high_vram: bool
    tiny: bool
    # one job at a time on these models: a second concurrent run_job is refused, not interleaved
    busy: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def dtype(self) -> torch.dtype:
        """The transformer's compute dtype: bf16 as FramePack, float32 for tiny CPU models."""
        return torch.float32 if self.tiny else torch.bfloat16

    @property
    def model_id(self) -> str:
        return model_id(self.variant, self.tiny)


def model_id(variant: str | Variant, tiny: bool) -> str:
    """What calibration profiles record as the model they measured: tiny random weights measure noise."""
    return TINY_MODEL_ID if tiny else get_variant(variant).transformer_repo


def load_models(variant: str, tiny: bool = False) -> Models:
    """Load the models of ``variant`` ("framepack" or "f1").

    Real models are the ones FramePack's demos load, in the same dtypes and with
    the same VRAM handling; they need a CUDA GPU (RuntimeError otherwise).
    ``tiny=True`` builds every component from its real class with tiny random
    weights on the CPU: no download, a job takes seconds.
    """
    spec = get_variant(variant)
    if tiny:
        return build_tiny_models(spec)
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"{spec.title} needs a CUDA GPU to run the real models and none is available here. "
            "Use --tiny (load_models(..., tiny=True)) for a CPU run with tiny random-weight models.")
    return _load_real_models(spec)


def _pretrained_dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers 5 renamed ``torch_dtype`` to ``dtype``; pass whichever this version expects."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype": dtype} if major >= 5 else {"torch_dtype": dtype}


def _load_real_models(variant: Variant) -> Models:
    """FramePack's demo setup: the same repos, dtypes, VRAM mode and offloading."""
    import transformers
    from diffusers import AutoencoderKLHunyuanVideo

    fp = framepack_modules()
    memory = fp.memory
    free_gb = memory.get_cuda_free_memory_gb(memory.gpu)
    high_vram = free_gb > HIGH_VRAM_THRESHOLD_GB
    logger.info("Free VRAM %.1f GB: %s-VRAM mode", free_gb, "high" if high_vram else "low")

    half = _pretrained_dtype_kwargs(torch.float16)
    llama_tokenizer_cls = getattr(transformers, "LlamaTokenizerFast", None) or transformers.LlamaTokenizer
    text_encoder = transformers.LlamaModel.from_pretrained(HUNYUAN_REPO, subfolder="text_encoder", **half).cpu()
    text_encoder_2 = transformers.CLIPTextModel.from_pretrained(HUNYUAN_REPO, subfolder="text_encoder_2",
                                                                **half).cpu()
    tokenizer = llama_tokenizer_cls.from_pretrained(HUNYUAN_REPO, subfolder="tokenizer")
    tokenizer_2 = transformers.CLIPTokenizer.from_pretrained(HUNYUAN_REPO, subfolder="tokenizer_2")
    vae = AutoencoderKLHunyuanVideo.from_pretrained(HUNYUAN_REPO, subfolder="vae", torch_dtype=torch.float16).cpu()
    feature_extractor = transformers.SiglipImageProcessor.from_pretrained(SIGLIP_REPO, subfolder="feature_extractor")
    image_encoder = transformers.SiglipVisionModel.from_pretrained(SIGLIP_REPO, subfolder="image_encoder",
                                                                   **half).cpu()
    transformer = fp.models.HunyuanVideoTransformer3DModelPacked.from_pretrained(
        variant.transformer_repo, torch_dtype=torch.bfloat16).cpu()

    for model in (vae, text_encoder, text_encoder_2, image_encoder, transformer):
        model.eval()
        model.requires_grad_(False)
    if not high_vram:
        # decode in slices and tiles so the VAE fits next to what stays resident
        vae.enable_slicing()
        vae.enable_tiling()
    # FramePack computes the final projection in fp32 for quality
    transformer.high_quality_fp32_output_for_inference = True
    with cast_quietly():
        transformer.to(dtype=torch.bfloat16)
        for model in (vae, image_encoder, text_encoder, text_encoder_2):
            model.to(dtype=torch.float16)

    if high_vram:
        for model in (text_encoder, text_encoder_2, image_encoder, vae, transformer):
            model.to(memory.gpu)
    else:
        # stream weights to the GPU module by module instead of holding the whole model there
        memory.DynamicSwapInstaller.install_model(transformer, device=memory.gpu)
        memory.DynamicSwapInstaller.install_model(text_encoder, device=memory.gpu)

    return Models(text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
                  tokenizer_2=tokenizer_2, vae=vae, feature_extractor=feature_extractor,
                  image_encoder=image_encoder, transformer=transformer, variant=variant,
                  device=memory.gpu, high_vram=high_vram, tiny=False)


# -- tiny models ---------------------------------------------------------------

TINY_SEED = 20240417
_TINY_HIDDEN = 32            # LLaMA hidden = transformer text_embed_dim; also CLIP and SigLIP width
_TINY_SIGLIP_IMAGE = 32
# A small everyday vocabulary; the prompt template's own words are added at build time.
_TINY_WORDS = (
    "a an the and or of in on at to with by for from is are was be it its this that his her their "
    "man woman girl boy person people character cat dog bird horse car tree flower house city street "
    "sky sea water river mountain forest room table chair window light sun moon night day rain snow "
    "dances dancing walks walking runs running jumps smiles looks turns waves moves moving sits stands "
    "holds plays sings talks flies swims rides gracefully slowly quickly gently clear clearly simple "
    "body movements movement full charm camera zoom pan close up wide shot view red green blue white "
    "black yellow bright dark soft warm cold big small young old happy beautiful cinematic video scene"
).split()


def _tiny_vocab(extra_text: str) -> list[str]:
    """Words, digits and punctuation the tiny tokenizers know, in a stable order."""
    from tokenizers import pre_tokenizers

    pieces = [p for p, _ in pre_tokenizers.Whitespace().pre_tokenize_str(extra_text)]
    words = list(_TINY_WORDS) + pieces + [str(d) for d in range(10)] + list(".,:;!?'\"-()")
    return list(dict.fromkeys(words))


def _tiny_llama_tokenizer() -> Any:
    """An offline word-level stand-in for HunyuanVideo's LLaMA-3 tokenizer.

    FramePack crops the first ``crop_start`` tokens (the system prompt of
    diffusers' HunyuanVideo template) off the text embedding.  Newlines are
    tokens of their own here, as in LLaMA-3, so the template's prefix is at
    least ``crop_start`` tokens long and the crop always keeps the user's prompt
    and the closing ``<|eot_id|>``.
    """
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import Regex, Tokenizer, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
               "<|eot_id|>", "<pad>"]
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    for token in special:
        template = template.replace(token, " ")
    vocab = {token: i for i, token in enumerate(special + ["\n"] + _tiny_vocab(template))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    # keep newlines as tokens, drop other whitespace, split words from punctuation
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]+"), behavior="removed", invert=True)
    tok.add_special_tokens(special)
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", vocab["<|begin_of_text|>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", unk_token="<unk>",
        pad_token="<pad>", padding_side="right", model_max_length=4096)


def _tiny_clip_tokenizer() -> Any:
    """An offline lower-casing word-level stand-in for CLIP's tokenizer (77 tokens, BOS/EOS framed)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    # EOS must not get id 2: CLIPTextModel reads a legacy eos_token_id == 2 as "pool at the largest id"
    special = ["<|unk|>", "<|endoftext|>", "<|startoftext|>"]
    vocab = {token: i for i, token in enumerate(special + [w.lower() for w in _tiny_vocab("")])}
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab))}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(special)
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", vocab["<|startoftext|>"]), ("<|endoftext|>", vocab["<|endoftext|>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|unk|>",
        pad_token="<|endoftext|>", padding_side="right", model_max_length=77)


def build_tiny_models(variant: str | Variant) -> Models:
    """Every FramePack component from its real class, with tiny random weights, on the CPU.

    The shapes keep what FramePack's arithmetic depends on: 16 latent channels,
    the VAE's 4x temporal / 8x spatial compression, the transformer's 2x2 patch,
    clean-latent embedders (1x/2x/4x) and image projection.  Weights come from a
    fixed seed inside a forked RNG, so the models are the same every time and the
    caller's global RNG is left untouched.  Nothing is downloaded.
    """
    import transformers
    from diffusers import AutoencoderKLHunyuanVideo

    spec = get_variant(variant)
    fp = framepack_modules()
    llama_tok = _tiny_llama_tokenizer()
    clip_tok = _tiny_clip_tokenizer()
    width = _TINY_HIDDEN
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        text_encoder = transformers.LlamaModel(transformers.LlamaConfig(
            vocab_size=len(llama_tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
            pad_token_id=llama_tok.pad_token_id, bos_token_id=llama_tok.bos_token_id,
            eos_token_id=llama_tok.eos_token_id))
        text_encoder_2 = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, pad_token_id=clip_tok.pad_token_id,
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id))
        image_encoder = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
            hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1, num_attention_heads=2,
            image_size=_TINY_SIGLIP_IMAGE, patch_size=8, num_channels=3))
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(4, 4, 8, 8),
            layers_per_block=1, norm_num_groups=2, spatial_compression_ratio=8, temporal_compression_ratio=4,
            mid_block_add_attention=False)
        transformer = fp.models.HunyuanVideoTransformer3DModelPacked(
            in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2,
            num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=width,
            pooled_projection_dim=width, rope_axes_dim=(4, 6, 6), has_image_proj=True, image_proj_dim=width,
            has_clean_x_embedder=True)
        # Default init leaves the block stack's contribution tiny next to its input; spread the
        # weights so each step's residual changes visibly, as a trained model's does.
        with torch.no_grad():
            for param in transformer.parameters():
                param.normal_(0.0, 0.05)
    feature_extractor = transformers.SiglipImageProcessor.from_dict({
        "do_resize": True, "size": {"height": _TINY_SIGLIP_IMAGE, "width": _TINY_SIGLIP_IMAGE},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})

    # Tiny clips fit in memory whole; the temporal tiling meant for long real videos only recomputes overlaps.
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    transformer.high_quality_fp32_output_for_inference = True
    for model in (text_encoder, text_encoder_2, image_encoder, vae, transformer):
        with cast_quietly():
            model.to(dtype=torch.float32)
        model.eval()
        model.requires_grad_(False)
    return Models(text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=llama_tok,
                  tokenizer_2=clip_tok, vae=vae, feature_extractor=feature_extractor, image_encoder=image_encoder,
                  transformer=transformer, variant=spec, device=torch.device("cpu"), high_vram=True, tiny=True)


def diffusers_framepack_classes() -> tuple[Any, Any]:
    """diffusers' (HunyuanVideoFramepackPipeline, HunyuanVideoFramepackTransformer3DModel).

    ImportError says which diffusers is installed when it has none (they came in 0.34).
    """
    import diffusers

    pipeline = getattr(diffusers, "HunyuanVideoFramepackPipeline", None)
    model = getattr(diffusers, "HunyuanVideoFramepackTransformer3DModel", None)
    if pipeline is None or model is None:
        raise ImportError(f"diffusers {diffusers.__version__} has no HunyuanVideoFramepackPipeline "
                          "(it came in diffusers 0.34)")
    return pipeline, model


def build_tiny_diffusers_pipeline(models: Models | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """diffusers' FramePack pipeline from the tiny components, on the CPU.

    The transformer is diffusers' ``HunyuanVideoFramepackTransformer3DModel``
    with the configuration and the very weights of the tiny FramePack packed
    transformer (both classes read the same checkpoints), cast to ``dtype``; the
    text and image encoders, tokenizers and VAE are the tiny ones of
    :func:`build_tiny_models`.  The scheduler is flow-matching Euler with the
    pipeline's resolution-dependent shift, as FramePack samples.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipeline_class, model_class = diffusers_framepack_classes()
    models = models or build_tiny_models("framepack")
    packed = models.transformer
    config = {k: v for k, v in packed.config.items() if not k.startswith("_")}
    transformer = model_class(**config)
    transformer.load_state_dict(packed.state_dict())
    with cast_quietly():
        transformer.to(dtype=dtype)
    transformer.eval().requires_grad_(False)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    pipe = pipeline_class(
        text_encoder=models.text_encoder, tokenizer=models.tokenizer, transformer=transformer, vae=models.vae,
        scheduler=scheduler, text_encoder_2=models.text_encoder_2, tokenizer_2=models.tokenizer_2,
        image_encoder=models.image_encoder, feature_extractor=models.feature_extractor)
    pipe.set_progress_bar_config(disable=True)
    return pipe
