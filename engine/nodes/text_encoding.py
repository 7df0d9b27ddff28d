"""CLIP text encoding with ComfyUI's semantics, on transformers CLIP text models.

Tokenizing (``tokenize_prompt``): the prompt is split into weighted segments
(``prompt_weights``); each segment's tokens are packed into 77-token chunks
``BOS + 75 tokens + EOS/pad``. A segment of 8 tokens or more is cut across
chunks at the 75-token boundary; a shorter one that does not fit moves whole
to the next chunk. CLIP-L pads with EOS, OpenCLIP-G pads with id 0 (``!``).

Encoding (``encode_prompt``): every chunk goes through the encoder(s) of the
family; outputs are concatenated along tokens (``77*k``). Which hidden state
is used depends on ``TextEncoders.layer_idx`` (ComfyUI's ``stop_at_clip_layer``)
and the family default:

==============  =========================  =================================
family          encoders (default layer)   final layer norm on a hidden state
==============  =========================  =================================
sd15            CLIP-L (last)              yes
sdxl            CLIP-L (-2) | CLIP-G (-2)  no  (outputs concatenated: L | G)
sdxl_refiner    CLIP-G (-2)                no
==============  =========================  =================================

``layer_idx`` beyond the encoder's depth selects the last hidden state (after
the final layer norm), as ComfyUI does. The pooled output is the final
encoder's (SD 1.x: CLIP-L, SDXL: CLIP-G) EOS token after the final layer norm,
through ``text_projection`` when the encoder has one, for the first chunk.
Weighted tokens are pushed away from the empty prompt's encoding at the same
position: ``z = (z - empty) * w + empty``.

Embeddings (``embedding:name``, see ``prompt_embeddings``): with an
``embeddings`` lookup, each vector of a named embedding takes one token slot,
packed like a segment of that many tokens (8 or more may be cut across chunks,
fewer move whole to the next chunk) and weighted like the text around it. A slot
holds a placeholder id in ``TokenChunk.ids`` and its vector in
``TokenChunk.vectors``; the encoder sees the vector in place of that token's
embedding (``embedding_injection``), position embedding added as for any token.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from diffsplit.engine.errors import WorkflowError
from diffsplit.engine.models.embedding_injection import injected_vectors
from diffsplit.engine.nodes.prompt_embeddings import (
    EMBEDDING_PREFIX,
    EmbeddingLookup,
    PromptEmbeddings,
    split_embedding_words,
)
from diffsplit.engine.nodes.prompt_weights import parse_prompt_weights
from diffsplit.engine.types import ModelFamily, TextEncoders

#: Tokens per encoder pass, BOS and EOS included.
CHUNK_LENGTH = 77
#: Segments with at least this many tokens may be cut across chunks.
LONG_SEGMENT_TOKENS = 8
#: OpenCLIP-G pads with token id 0 (``!``).
ZERO_PAD_TOKEN = 0

EncoderKey = Literal["l", "g"]
#: A token slot is a token id, or an embedding vector [width].
TokenItem = int | torch.Tensor


@dataclass(frozen=True)
class EncoderRole:
    """How one text encoder of a family is used (ComfyUI's per-encoder options)."""

    key: EncoderKey
    pad_with_end: bool
    layer_norm_hidden_state: bool
    default_layer_idx: int | None


_CLIP_L_SD1 = EncoderRole("l", pad_with_end=True, layer_norm_hidden_state=True, default_layer_idx=None)
_CLIP_L_SDXL = EncoderRole("l", pad_with_end=True, layer_norm_hidden_state=False, default_layer_idx=-2)
_CLIP_G = EncoderRole("g", pad_with_end=False, layer_norm_hidden_state=False, default_layer_idx=-2)


def encoder_roles(family: ModelFamily) -> tuple[EncoderRole, ...]:
    """The roles of ``TextEncoders.encoders`` for ``family``, in the same order."""
    if family == "sd15":
        return (_CLIP_L_SD1,)
    if family == "sdxl":
        return (_CLIP_L_SDXL, _CLIP_G)
    if family == "sdxl_refiner":
        return (_CLIP_G,)
    raise WorkflowError(f"unknown model family {family!r} for text encoding")


@dataclass(frozen=True)
class TokenChunk:
    """One encoder pass worth of tokens: ids, per-token weights, and where the first EOS is.

    ``vectors`` holds ``(position, vector)`` for the slots taken by embedding
    vectors (their ``ids`` entry is a placeholder); it is left out of equality.
    """

    ids: tuple[int, ...]
    weights: tuple[float, ...]
    end_index: int
    vectors: tuple[tuple[int, torch.Tensor], ...] = field(default=(), compare=False, repr=False)

    @property
    def is_weighted(self) -> bool:
        """Whether any token has a weight other than 1."""
        return any(weight != 1.0 for weight in self.weights)


@dataclass(frozen=True, eq=False)
class TextEncoding:
    """Encoded prompt: ``hidden`` [1, 77k, C] and ``pooled`` [1, P], float32 on the CPU."""

    hidden: torch.Tensor
    pooled: torch.Tensor


def tokenize_prompt(
    tokenizer: Any, text: str, *, pad_with_end: bool, embeddings: EmbeddingLookup | None = None
) -> tuple[TokenChunk, ...]:
    """Tokenize ``text`` (with weights) into 77-token chunks the way ComfyUI does.

    Without ``embeddings``, ``embedding:name`` is plain text (ComfyUI without an
    embeddings folder).
    """
    packer = _ChunkPacker(tokenizer.bos_token_id, tokenizer.eos_token_id, pad_with_end)
    for segment in parse_prompt_weights(text):
        for word in split_embedding_words(segment.text):
            if embeddings is not None and word.startswith(EMBEDDING_PREFIX):
                vectors, word = embeddings(word[len(EMBEDDING_PREFIX):].strip("\n"))
                if vectors is not None:
                    packer.add_segment(list(vectors), segment.weight)
                if not word:
                    continue
            ids = tokenizer(word, add_special_tokens=False, verbose=False)["input_ids"]
            packer.add_segment(ids, segment.weight)
    return packer.finish()


def empty_chunk(tokenizer: Any, *, pad_with_end: bool) -> TokenChunk:
    """The chunk of the empty prompt: BOS, EOS, then padding."""
    return _ChunkPacker(tokenizer.bos_token_id, tokenizer.eos_token_id, pad_with_end).finish()[0]


class _ChunkPacker:
    """Accumulates weighted token groups into fixed-length chunks."""

    def __init__(self, bos: int, eos: int, pad_with_end: bool) -> None:
        self._bos = bos
        self._eos = eos
        self._pad = eos if pad_with_end else ZERO_PAD_TOKEN
        self._chunks: list[TokenChunk] = []
        self._ids: list[TokenItem] = [bos]
        self._weights: list[float] = [1.0]

    def add_segment(self, ids: list[TokenItem], weight: float) -> None:
        remaining = list(ids)
        may_cut = len(remaining) >= LONG_SEGMENT_TOKENS
        while remaining:
            room = CHUNK_LENGTH - 1 - len(self._ids)
            if len(remaining) <= room:
                self._append(remaining, weight)
                return
            if may_cut:
                self._append(remaining[:room], weight)
                remaining = remaining[room:]
            self._close_chunk()

    def finish(self) -> tuple[TokenChunk, ...]:
        self._close_chunk()
        return tuple(self._chunks)

    def _append(self, ids: list[TokenItem], weight: float) -> None:
        self._ids.extend(ids)
        self._weights.extend([weight] * len(ids))

    def _close_chunk(self) -> None:
        end_index = len(self._ids)
        padding = CHUNK_LENGTH - end_index - 1
        vectors = tuple((i, item) for i, item in enumerate(self._ids) if isinstance(item, torch.Tensor))
        # a vector's slot keeps the pad id as placeholder; the encoder sees the vector instead
        tokens = [self._pad if isinstance(item, torch.Tensor) else item for item in self._ids]
        ids = [*tokens, self._eos, *([self._pad] * padding)]
        weights = [*self._weights, *([1.0] * (padding + 1))]
        self._chunks.append(TokenChunk(tuple(ids), tuple(weights), end_index, vectors))
        self._ids = [self._bos]
        self._weights = [1.0]


def encode_chunks(
    encoder: torch.nn.Module,
    chunks: tuple[TokenChunk, ...],
    empty: TokenChunk,
    role: EncoderRole,
    layer_idx: int | None,
) -> TextEncoding:
    """Run ``chunks`` through one CLIP text encoder; returns tokens concatenated and first pooled.

    ``empty`` is the empty prompt's chunk, encoded alongside when any token is weighted.
    """
    weighted = any(chunk.is_weighted for chunk in chunks)
    batch = [*chunks, empty] if weighted else list(chunks)
    device = next(encoder.parameters()).device
    input_ids = torch.tensor([chunk.ids for chunk in batch], dtype=torch.long, device=device)
    slots = [(row, position, vector) for row, chunk in enumerate(batch) for position, vector in chunk.vectors]
    with torch.no_grad(), injected_vectors(encoder, slots):
        outputs = encoder(input_ids=input_ids, output_hidden_states=True)
        hidden = _select_hidden_state(encoder, outputs, role, layer_idx).float()
        pooled = _pooled_output(encoder, outputs.last_hidden_state[:1], chunks[0].end_index).float()
    hidden = hidden.cpu()
    if weighted:
        hidden = _apply_weights(hidden[: len(chunks)], hidden[-1], chunks)
    tokens = hidden.reshape(1, len(chunks) * CHUNK_LENGTH, hidden.shape[-1])
    return TextEncoding(hidden=tokens, pooled=pooled.cpu())


def _select_hidden_state(
    encoder: torch.nn.Module, outputs: Any, role: EncoderRole, layer_idx: int | None
) -> torch.Tensor:
    chosen = role.default_layer_idx if layer_idx is None else layer_idx
    depth = int(encoder.config.num_hidden_layers)
    if chosen is None or abs(chosen) > depth:
        return outputs.last_hidden_state
    # hidden_states[0] holds the embeddings; hidden_states[i + 1] is layer i's output.
    hidden = outputs.hidden_states[chosen if chosen < 0 else chosen + 1]
    if role.layer_norm_hidden_state:
        hidden = _final_layer_norm(encoder)(hidden)
    return hidden


def _final_layer_norm(encoder: torch.nn.Module) -> torch.nn.Module:
    # CLIPTextModelWithProjection wraps the transformer in ``text_model``; CLIPTextModel
    # holds the norm itself (transformers 5) or in ``text_model`` too (transformers 4).
    transformer = getattr(encoder, "text_model", encoder)
    return transformer.final_layer_norm


def _pooled_output(encoder: torch.nn.Module, last_hidden: torch.Tensor, end_index: int) -> torch.Tensor:
    pooled = last_hidden[:, end_index]
    projection = getattr(encoder, "text_projection", None)
    return projection(pooled) if projection is not None else pooled


def _apply_weights(hidden: torch.Tensor, empty: torch.Tensor, chunks: tuple[TokenChunk, ...]) -> torch.Tensor:
    weights = torch.tensor([chunk.weights for chunk in chunks], dtype=hidden.dtype).unsqueeze(-1)
    pushed = (hidden - empty) * weights + empty
    return torch.where(weights != 1.0, pushed, hidden)


def encode_prompt(clip: TextEncoders, text: str, embeddings: PromptEmbeddings | None = None) -> TextEncoding:
    """ComfyUI ``CLIPTextEncode``: the same prompt through every encoder of ``clip``."""
    roles = encoder_roles(clip.family)
    return encode_prompts(clip, {role.key: text for role in roles}, embeddings)


def encode_prompts(
    clip: TextEncoders, texts: Mapping[str, str], embeddings: PromptEmbeddings | None = None
) -> TextEncoding:
    """Encode one prompt per encoder (``texts`` keyed ``"l"``/``"g"``), outputs joined along channels.

    Encoders whose prompts need fewer chunks are padded with empty-prompt
    chunks, so all outputs have the same token count (ComfyUI's
    CLIPTextEncodeSDXL). The pooled output is the last encoder's. With
    ``embeddings``, ``embedding:name`` takes the vectors of each encoder's key
    (``clip_l``/``clip_g``) from the named file.
    """
    roles = encoder_roles(clip.family)
    if len(roles) != len(clip.encoders) or len(roles) != len(clip.tokenizers):
        raise WorkflowError(
            f"CLIP of family {clip.family!r} has {len(clip.encoders)} encoders and "
            f"{len(clip.tokenizers)} tokenizers; expected {len(roles)}"
        )
    missing = [role.key for role in roles if role.key not in texts]
    if missing:
        raise WorkflowError(f"no prompt for text encoder(s) {missing} of family {clip.family!r}")
    chunk_lists = []
    empties = []
    for role, tokenizer, encoder in zip(roles, clip.tokenizers, clip.encoders, strict=True):
        lookup = None if embeddings is None else embeddings.lookup(f"clip_{role.key}", _width(encoder))
        chunk_lists.append(
            tokenize_prompt(tokenizer, texts[role.key], pad_with_end=role.pad_with_end, embeddings=lookup)
        )
        empties.append(empty_chunk(tokenizer, pad_with_end=role.pad_with_end))
    longest = max(len(chunks) for chunks in chunk_lists)
    encodings = [
        encode_chunks(encoder, chunks + (empty,) * (longest - len(chunks)), empty, role, clip.layer_idx)
        for encoder, chunks, empty, role in zip(clip.encoders, chunk_lists, empties, roles, strict=True)
    ]
    hidden = torch.cat([encoding.hidden for encoding in encodings], dim=-1)
    return TextEncoding(hidden=hidden, pooled=encodings[-1].pooled)


def _width(encoder: torch.nn.Module) -> int:
    """The width of ``encoder``'s token embeddings (what an embedding vector must have)."""
    return int(encoder.get_input_embeddings().weight.shape[-1])
