"""SDXL prompt encoding with AUTOMATIC1111's prompt language, clip skip and textual-inversion embeddings.

What A1111 does (modules/sd_hijack_clip.py, sd_models_xl.py), on both of SDXL's text encoders:

- The prompt is parsed into weighted fragments (forge.prompt_syntax) and each fragment tokenized on its own.
- Tokens fill chunks of 75; each chunk is wrapped in start and end of text and padded to 77 (with the
  tokenizer's own padding token, as diffusers pads), and the chunks' hidden states are concatenated along the
  sequence. `BREAK` starts a new chunk; when a chunk fills up, the words after its last comma within the last
  20 tokens move to the next chunk. The pooled embedding is the first chunk's.
- "Original" emphasis: each token's hidden state is multiplied by its weight, then the chunk is rescaled so
  its mean is the mean it had before. All weights 1 leave it untouched.
- The positive and negative prompts are padded to the same number of chunks with empty chunks (an empty
  negative prompt is all zeros, as SDXL's pipeline and A1111 make it).

A plain prompt of at most 75 tokens gives exactly what `StableDiffusionXLPipeline.encode_prompt` gives.

Clip skip k takes the hidden states of the k-th layer from the end of both encoders (1: the last layer, 2: the
penultimate, SDXL's own conditioning); a k past an encoder's depth takes its first layer's.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from forge.embeddings import EmbeddingCatalog
from forge.engine import Job
from forge.prompt_syntax import Fragment, has_syntax, parse_prompt_attention

log = logging.getLogger(__name__)

CHUNK_TOKENS = 75  # tokens of prompt text in one chunk; with start and end of text, CLIP's 77
COMMA_BACKTRACK = 20  # A1111's comma_padding_backtrack default
CACHE_SIZE = 32  # encoded prompt pairs kept per engine
SDXL_CLIP_SKIP = 2  # SDXL is conditioned on the penultimate layer of both encoders

Chunk = tuple[list[int], list[float]]  # 77 token ids and their weights


@dataclass(frozen=True)
class Encoded:
    """One job's conditioning for one image: hidden states (1, chunks * 77, channels) and pooled (1, width);
    the negative ones are None without classifier-free guidance."""

    positive: torch.Tensor
    pooled: torch.Tensor
    negative: torch.Tensor | None
    negative_pooled: torch.Tensor | None

    @property
    def tokens(self) -> int:
        return int(self.positive.shape[1])

    def for_images(self, count: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(positive, negative, pooled, negative pooled) for `count` images, as encode_prompt returns them."""

        def rows(tensor: torch.Tensor | None) -> torch.Tensor | None:
            if tensor is None:
                return None
            return tensor.repeat(count, *([1] * (tensor.dim() - 1)))  # a copy: the cached tensors stay as they are

        positive, pooled = rows(self.positive), rows(self.pooled)
        assert positive is not None and pooled is not None
        return positive, rows(self.negative), pooled, rows(self.negative_pooled)


@dataclass
class _Side:
    """One tokenizer and its text encoder."""

    tokenizer: Any
    encoder: Any
    bos: int
    eos: int
    pad: int
    comma: int | None
    base_vocab: int  # ids from here on are added tokens (embeddings)
    # First id of each multi-vector embedding -> all its ids, so it is never split across two chunks.
    groups: dict[int, list[int]] = field(default_factory=dict)


def _side(tokenizer: Any, encoder: Any) -> _Side:
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    return _Side(
        tokenizer=tokenizer,
        encoder=encoder,
        bos=tokenizer.bos_token_id,
        eos=eos,
        pad=eos if pad is None else pad,
        comma=tokenizer.get_vocab().get(",</w>"),
        base_vocab=int(tokenizer.vocab_size),
    )


class TextualInversions:
    """The embeddings folder's files, loaded into both tokenizers and text encoders with diffusers'
    load_textual_inversion; files that appear later are loaded when the folder changes."""

    def __init__(self, pipe: Any, folder: Path | None) -> None:
        self._pipe = pipe
        self._catalog = EmbeddingCatalog(folder)
        self._folder = folder
        self._stamp: float | None = None
        self.loaded: dict[str, int] = {}  # name -> vectors
        self.skipped: dict[str, str] = {}  # name -> why
        self.version = 0  # changes whenever a tokenizer gains tokens (cached encodings are then stale)

    def refresh(self) -> None:
        if self._folder is None:
            return
        try:
            stamp = self._folder.stat().st_mtime
        except OSError:
            return
        if stamp == self._stamp:
            return
        self._stamp = stamp
        for info in self._catalog.installed():
            if info.name in self.loaded or info.name in self.skipped:
                continue
            if info.problem is not None:
                self._skip(info.name, info.problem)
                continue
            try:
                self._load(info.name, Path(info.path))
            except Exception as exc:  # a broken file is skipped, the engine goes on
                self._skip(info.name, f"{type(exc).__name__}: {exc}")
            else:
                self.loaded[info.name] = info.vectors
                self.version += 1
                log.info("textual-inversion embedding %r loaded (%d vectors)", info.name, info.vectors)

    def _skip(self, name: str, why: str) -> None:
        self.skipped[name] = why
        log.warning("textual-inversion embedding %r skipped: %s", name, why)

    def _load(self, name: str, path: Path) -> None:
        from safetensors.torch import load_file

        pipe = self._pipe
        tensors = load_file(str(path))
        pairs = [(tensors["clip_l"], pipe.text_encoder, pipe.tokenizer),
                 (tensors["clip_g"], pipe.text_encoder_2, pipe.tokenizer_2)]  # fmt: skip
        if pipe.tokenizer is pipe.tokenizer_2:
            raise ValueError("the pipeline's two text encoders share one tokenizer")
        for vectors, encoder, tokenizer in pairs:  # check both before changing either
            width = encoder.get_input_embeddings().weight.shape[-1]
            if vectors.shape[-1] != width:
                raise ValueError(f"vectors of width {vectors.shape[-1]} for a text encoder of width {width}")
            vocab = tokenizer.get_vocab()
            if name in vocab or f"{name}_1" in vocab:
                raise ValueError(f"{name!r} is a token already")
        for vectors, encoder, tokenizer in pairs:
            pipe.load_textual_inversion(vectors, token=name, text_encoder=encoder, tokenizer=tokenizer)


class PromptEncoder:
    """Encodes jobs' prompts on one pipeline's text encoders, keeping the last CACHE_SIZE results."""

    def __init__(self, pipe: Any, embeddings: Path | None = None, cache_size: int = CACHE_SIZE) -> None:
        self.pipe = pipe
        self.embeddings = TextualInversions(pipe, embeddings)
        self.cache_size = cache_size
        # At most this many chunks (TensorRT engines are built for 77 tokens: 1); None: as many as needed.
        self.max_chunks: int | None = None
        self._cache: OrderedDict[tuple[object, ...], Encoded] = OrderedDict()
        self.encodes = 0  # prompt pairs actually run through the text encoders (cache misses)

    def encode(self, job: Job, guided: bool) -> Encoded:
        """The job's conditioning; `guided`: with the negative prompt's (classifier-free guidance)."""
        self.embeddings.refresh()
        clip_skip = job.clip_skip or job.model.clip_skip
        key = self._key(job, clip_skip, guided)
        if key is not None and key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        encoded = self._encode(job.prompt, job.negative_prompt, clip_skip, guided)
        self.encodes += 1
        if key is not None:
            self._cache[key] = encoded
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return encoded

    def chunk_count(self, job: Job, guided: bool) -> int:
        """How many 77-token chunks the job's conditioning has (tokenizing only): rows of one UNet call must
        agree on it."""
        self.embeddings.refresh()
        sides = self._sides()
        texts = [job.prompt]
        if guided and (job.negative_prompt or not self._zeros_for_empty()):
            texts.append(job.negative_prompt)
        count = max(len(self._chunks(text, side)) for text in texts for side in sides)
        return count if self.max_chunks is None else min(count, self.max_chunks)

    def _zeros_for_empty(self) -> bool:
        """SDXL's pipelines guide an empty negative prompt with zeros, not with the encoding of ''."""
        return bool(getattr(self.pipe.config, "force_zeros_for_empty_prompt", True))

    def _key(self, job: Job, clip_skip: int, guided: bool) -> tuple[object, ...] | None:
        """What the encoding depends on besides the weights: the LoRA set too, since a LoRA may adapt the
        text encoders (and a LoRA file changed on disk is reloaded). None: not cacheable."""
        try:
            loras = tuple((lora.path, os.stat(lora.path).st_mtime, lora.weight) for lora in job.loras)
        except OSError:
            return None
        return (job.prompt, job.negative_prompt, clip_skip, guided, self.max_chunks, loras, self.embeddings.version)

    # -- encoding --

    def _sides(self) -> list[_Side]:
        pipe = self.pipe
        pairs = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
        sides = [_side(tokenizer, encoder) for tokenizer, encoder in pairs if tokenizer is not None and encoder]
        for side in sides:
            side.groups = self._groups(side.tokenizer)
        return sides

    def _groups(self, tokenizer: Any) -> dict[int, list[int]]:
        groups = {}
        for name, vectors in self.embeddings.loaded.items():
            if vectors > 1:
                names = [name] + [f"{name}_{index}" for index in range(1, vectors)]
                ids = tokenizer.convert_tokens_to_ids(names)
                groups[ids[0]] = ids
        return groups

    def _encode(self, prompt: str, negative: str, clip_skip: int, guided: bool) -> Encoded:
        sides = self._sides()
        zero_negative = guided and not negative and self._zeros_for_empty()
        encode_negative = guided and not zero_negative
        positive_chunks = [self._chunks(prompt, side) for side in sides]
        negative_chunks = [self._chunks(negative, side) for side in sides] if encode_negative else []
        count = max(len(chunks) for chunks in positive_chunks + negative_chunks)
        if self.max_chunks is not None:
            count = min(count, self.max_chunks)
        positive, pooled = self._run(sides, positive_chunks, count, clip_skip)
        negative_embeds = negative_pooled = None
        if zero_negative:
            negative_embeds, negative_pooled = torch.zeros_like(positive), torch.zeros_like(pooled)
        elif encode_negative:
            negative_embeds, negative_pooled = self._run(sides, negative_chunks, count, clip_skip)
        return Encoded(positive, pooled, negative_embeds, negative_pooled)

    def _run(
        self, sides: Sequence[_Side], chunks_by_side: Sequence[list[Chunk]], count: int, clip_skip: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both encoders' hidden states, concatenated along channels as SDXL takes them, and the pooled."""
        hidden, pooled = [], None
        for side, chunks in zip(sides, chunks_by_side, strict=True):
            chunks = chunks[:count] + [self._empty(side)] * (count - len(chunks))
            states, side_pooled = self._encode_chunks(side, chunks, clip_skip)
            hidden.append(states)
            if pooled is None:
                pooled = side_pooled
        assert pooled is not None, "SDXL's second text encoder gives the pooled embedding"
        pipe = self.pipe
        dtype = pipe.text_encoder_2.dtype if pipe.text_encoder_2 is not None else pipe.unet.dtype
        device = pipe._execution_device
        return torch.concat(hidden, dim=-1).to(dtype=dtype, device=device), pooled

    def _encode_chunks(self, side: _Side, chunks: list[Chunk], clip_skip: int) -> tuple[torch.Tensor, Any]:
        encoder = side.encoder
        ids = torch.tensor([tokens for tokens, _ in chunks], device=encoder.device)
        with torch.no_grad():
            output = encoder(ids, output_hidden_states=True)
            layers = int(encoder.config.num_hidden_layers)
            states = output.hidden_states[-min(max(clip_skip, 1), layers)]
            states = _emphasis(states, [weights for _, weights in chunks])
            pooled = None
            if output[0].ndim == 2:  # the encoder with a projection: SDXL's pooled text embedding
                pooled = output[0][:1]
                if bool((ids[0] >= side.base_vocab).any()) and hasattr(encoder, "text_projection"):
                    # Checkpoints whose config says eos_token_id 2 (SDXL's) pool at the highest id, which an
                    # embedding's added tokens outrank: pool at the end of text, as the model was trained.
                    end = int((ids[0] == side.eos).nonzero()[0])
                    pooled = encoder.text_projection(output.last_hidden_state[:1, end])
        return states.reshape(1, -1, states.shape[-1]), pooled

    @staticmethod
    def _empty(side: _Side) -> Chunk:
        return [side.bos, side.eos] + [side.pad] * CHUNK_TOKENS, [1.0] * (CHUNK_TOKENS + 2)

    def _chunks(self, text: str, side: _Side) -> list[Chunk]:
        """The prompt in chunks of 77 tokens with their weights (A1111's tokenize_line)."""
        fragments = parse_prompt_attention(text) if has_syntax(text) else [Fragment(text, 1.0)]
        words = [fragment for fragment in fragments if not fragment.is_break]
        texts = [self._with_embeddings(fragment.text, side.tokenizer) for fragment in words]
        ids_of = side.tokenizer(texts, truncation=False, add_special_tokens=False, verbose=False) if texts else None
        tokenized = iter(ids_of["input_ids"] if ids_of is not None else [])
        chunks: list[Chunk] = []
        tokens: list[int] = []
        weights: list[float] = []
        last_comma = -1

        def next_chunk() -> None:
            nonlocal tokens, weights, last_comma
            padding = CHUNK_TOKENS - len(tokens)
            chunks.append(
                ([side.bos, *tokens, side.eos] + [side.pad] * padding, [1.0, *weights, 1.0] + [1.0] * padding)
            )
            tokens, weights, last_comma = [], [], -1

        for fragment in fragments:
            if fragment.weight is None:  # BREAK
                next_chunk()
                continue
            weight, ids = fragment.weight, next(tokenized)
            position = 0
            while position < len(ids):
                token = ids[position]
                if token == side.comma:
                    last_comma = len(tokens)
                elif len(tokens) == CHUNK_TOKENS and last_comma != -1 and len(tokens) - last_comma <= COMMA_BACKTRACK:
                    cut = last_comma + 1  # the words after the comma move to the next chunk
                    moved, moved_weights = tokens[cut:], weights[cut:]
                    tokens, weights = tokens[:cut], weights[:cut]
                    next_chunk()
                    tokens, weights = moved, moved_weights
                if len(tokens) == CHUNK_TOKENS:
                    next_chunk()
                group = side.groups.get(token)
                if group is not None and ids[position : position + len(group)] == group:
                    if len(tokens) + len(group) > CHUNK_TOKENS:  # an embedding's vectors stay in one chunk
                        next_chunk()
                    tokens += group
                    weights += [weight] * len(group)
                    position += len(group)
                    continue
                tokens.append(token)
                weights.append(weight)
                position += 1
        if tokens or not chunks:
            next_chunk()
        return chunks

    def _with_embeddings(self, text: str, tokenizer: Any) -> str:
        """A multi-vector embedding's name as its tokens (`name name_1 name_2`), as diffusers' pipelines do."""
        if not self.embeddings.loaded or not text:
            return text
        converted: str = self.pipe.maybe_convert_prompt(text, tokenizer)
        return converted


def _emphasis(states: torch.Tensor, weights: list[list[float]]) -> torch.Tensor:
    """A1111's "Original" emphasis, chunk by chunk: each token's hidden state times its weight, then the chunk
    rescaled to the mean it had before. A chunk whose weights are all 1 is left exactly as it was."""
    if all(weight == 1.0 for chunk in weights for weight in chunk):
        return states
    rows = []
    for index, chunk in enumerate(weights):
        row = states[index : index + 1]
        if all(weight == 1.0 for weight in chunk):
            rows.append(row)
            continue
        values = row.float()
        multipliers = torch.tensor(chunk, dtype=torch.float32, device=row.device).reshape(1, -1, 1)
        original = values.mean()
        weighted = values * multipliers
        rows.append((weighted * (original / weighted.mean())).to(row.dtype))
    return torch.cat(rows)
