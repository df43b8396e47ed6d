r"""Masks by token type: cross-modal attention rules as data (zoo 4.14-4.16).

Each token has a small integer type (image, prompt, response, template, search, [DET], ...);
``rules[(t_q, t_k)]`` says how queries of type ``t_q`` see keys of type ``t_k``: ``"full"``,
``"causal"``, ``"none"`` (or absent) or any :class:`attnjax.masks.Mask` (a window mask for Swin
patches, a sliding window, ...). Block maps come from per-tile type presence: a tile
is skipped when none of the (query type, key type) pairs present in it has a rule that may allow
it, and it is full when every present pair has a rule full on the tile (exact for ``"full"`` and
absent rules; a mask rule contributes its own bounds).

Covers modality-mutual attention (AKI: image queries also see the text prompt after them),
composite attention (EE-MLLM: no visual-visual attention), MixFormer's asymmetric mixed
attention, ViDT's reconfigured attention, prefix-LM, region / subject isolation (R-MSA, IR).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
from jaxtyping import Array, Int

from attnjax import _checks
from attnjax.core.pytree import pytree_dataclass
from attnjax.core.tiling import take
from attnjax.masks.base import Mask
from attnjax.masks.document import document
from attnjax.masks.positional import causal


def _presence(types, lo, hi, block, values):
    """``(any [V, B, n], covered [B, n])``: per tile, whether each type in ``values`` occurs, and
    whether every position has one of them (the clipped tail repeats the last real position)."""
    pos = jnp.minimum(lo.reshape(-1, 1) + jnp.arange(block, dtype=jnp.int32), hi.reshape(-1, 1))
    ids = types[:, pos]  # [B, n, block]
    hits = jnp.stack([ids == t for t in values])  # [V, B, n, block]
    return hits.any(-1), hits.any(0).all(-1)


@pytree_dataclass(data=("q_types", "kv_types", "rules"), meta=("pairs",))
class ByType(Mask):
    """Allowed iff some rule ``pairs[r] = (t_q, t_k)`` matches the types and ``rules[r]`` (a
    mask, or ``None`` = everything) allows the entry."""

    q_types: Array  # [B, T]
    kv_types: Array  # [B, S]
    rules: tuple
    pairs: tuple

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        qt = take(self.q_types, b, jnp.clip(q_idx, 0, q_len - 1))
        kt = take(self.kv_types, b, jnp.clip(kv_idx, 0, kv_len - 1))
        out = False
        for (tq, tk), rule in zip(self.pairs, self.rules):
            hit = (qt == tq) & (kt == tk)
            out = out | (hit if rule is None else hit & rule.predicate(q_len, kv_len, b, h, q_idx, kv_idx))
        return out

    def bounds(self, tiles, batch):
        # Exact for full / absent rules: a tile is FULL iff every (query type, key type) pair
        # present in it has a rule that is full on the tile, EMPTY iff no present pair may allow.
        tq_all = sorted({p[0] for p in self.pairs})
        tk_all = sorted({p[1] for p in self.pairs})
        q_any, q_cov = _presence(self.q_types, tiles.q_lo, tiles.q_hi, tiles.block_q, tq_all)
        k_any, k_cov = _presence(self.kv_types, tiles.kv_lo, tiles.kv_hi, tiles.block_k, tk_all)
        col, row = (lambda x: x[:, None, :, None]), (lambda x: x[:, None, None, :])
        rule_bounds = {}
        for pair, rule in zip(self.pairs, self.rules):
            rule_bounds[pair] = (True, True) if rule is None else rule.bounds(tiles, batch)
        may_any, must_all = False, col(q_cov) & row(k_cov)
        for i, tq in enumerate(tq_all):
            for j, tk in enumerate(tk_all):
                present = col(q_any[i]) & row(k_any[j])
                may, must = rule_bounds.get((tq, tk), (False, False))
                may_any = may_any | (present & may)
                must_all = must_all & (~present | must)
        return may_any, must_all

    def check(self, batch, heads, q_len, kv_len):
        for name, ids, length in (("q_types", self.q_types, q_len), ("kv_types", self.kv_types, kv_len)):
            if jnp.shape(ids) != (batch, length):
                raise ValueError(
                    f"by_type mask {name} has shape {jnp.shape(ids)}; expected [batch={batch}, {length}]"
                )
        for rule in self.rules:
            if rule is not None:
                rule.check(batch, heads, q_len, kv_len)


RULES = ("full", "causal", "none")


def by_type(
    q_types: Int[Array, "B T"],
    rules: Mapping[tuple[int, int], str | Mask],
    kv_types: Int[Array, "B S"] | None = None,
) -> Mask:
    """The union over ``rules`` of (query type, key type) pairs and their rule (module docstring).

    ``q_types [B, T]`` and ``kv_types [B, S]`` (default: ``q_types``, self-attention) are integer
    type ids (data: may be traced); rule keys are static ints. ``"causal"`` is
    :func:`attnjax.masks.causal` (bottom-right aligned, the usual causal order when ``T == S``).

    >>> import jax.numpy as jnp
    >>> from attnjax import masks
    >>> types = jnp.array([[0, 0, 1, 1]])                 # image, image, text, text
    >>> m = masks.by_type(types, {(0, 0): "full", (1, 0): "full", (1, 1): "causal"})
    >>> m.materialize(4, 4, batch=1)[0, 0].astype(int)
    Array([[1, 1, 0, 0],
           [1, 1, 0, 0],
           [1, 1, 1, 0],
           [1, 1, 1, 1]], dtype=int32)
    """
    q_types = jnp.asarray(q_types)
    kv_types = q_types if kv_types is None else jnp.asarray(kv_types)
    for name, ids in (("q_types", q_types), ("kv_types", kv_types)):
        _checks.check_rank(name, ids, ("batch", "length"))
        _checks.check_int_array(name, ids)
    pairs, masks_ = [], []
    for key, rule in rules.items():
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(t, int) for t in key)):
            raise ValueError(f"rule keys must be (query type, key type) int pairs; got {key!r}")
        if isinstance(rule, str) and rule not in RULES:
            raise ValueError(f"rule for {key} must be one of {RULES} or a Mask; got {rule!r}")
        if not isinstance(rule, (str, Mask)):
            raise TypeError(f"rule for {key} must be one of {RULES} or a Mask; got {type(rule).__name__}")
        if rule == "none":
            continue
        pairs.append(key)
        masks_.append(None if rule == "full" else causal() if rule == "causal" else rule)
    if not pairs:
        raise ValueError("by_type needs at least one rule that is not 'none'")
    return ByType(q_types, kv_types, tuple(masks_), tuple(pairs))


def modality_mutual(types: Int[Array, "B T"], image: int = 0, prompt: int = 1, response: int = 2) -> Mask:
    """AKI's modality-mutual attention on ``[image | prompt | response]``: causal everywhere, and
    image queries also see the prompt that follows them (never the response)."""
    rules = {(a, b): "causal" for a in (image, prompt, response) for b in (image, prompt, response)}
    rules[(image, prompt)] = "full"
    return by_type(types, rules)


def mixformer(types: Int[Array, "B T"], template: int = 0, search: int = 1) -> Mask:
    """MixFormer's asymmetric mixed attention: templates see templates; search tokens see all."""
    return by_type(
        types, {(template, template): "full", (search, template): "full", (search, search): "full"}
    )


def vidt(types: Int[Array, "B T"], patch_mask: Mask, patch: int = 0, det: int = 1) -> Mask:
    """ViDT's reconfigured attention: ``[PATCH]`` x ``[PATCH]`` under ``patch_mask`` (Swin
    windows on the patch positions), ``[DET]`` sees ``[DET]`` and ``[PATCH]``, patches never see
    ``[DET]``."""
    return by_type(types, {(patch, patch): patch_mask, (det, det): "full", (det, patch): "full"})


def isolation(subject_ids: Int[Array, "B T"], num_subjects: int, background: int = 0) -> Mask:
    """Isolation attention (IR-Diffusion): tokens of subject ``a`` never attend tokens of another
    subject ``b``; background tokens (id ``background``) see and are seen by everything. Subject
    ids are ``0 .. num_subjects`` with the background among them."""
    n = _checks.positive_int("num_subjects", num_subjects)
    ids = range(n + 1)
    rules = {(a, b): "full" for a in ids for b in ids if a == b or background in (a, b)}
    return by_type(subject_ids, rules)


@pytree_dataclass(data=("flags",))
class Heads(Mask):
    """Allowed in the heads whose flag is set (``flags [H]`` bool), everywhere in them."""

    flags: Array  # [H]

    def predicate(self, q_len, kv_len, b, h, q_idx, kv_idx):
        return take(self.flags, h)

    def bounds(self, tiles, batch):
        f = self.flags[None, :, None, None]
        return f, f

    def check(self, batch, heads, q_len, kv_len):
        if jnp.shape(self.flags) != (heads,):
            raise ValueError(f"head flags have shape {jnp.shape(self.flags)}; expected [heads={heads}]")


def speaker_heads(speaker_ids: Int[Array, "B T"], intra: Array, *, causal_order: bool = True) -> Mask:
    """Identity-masked multi-head attention (EmotionIC IM-MHA, a reading of the abstract): heads
    with ``intra[h]`` see only (earlier) utterances of the *same* speaker, self included; the
    other heads only (earlier) utterances of *other* speakers. ``intra`` is a bool ``[H]``;
    ``causal_order`` adds :func:`attnjax.masks.causal`. A row with no allowed key gives zeros
    (an inter-speaker head in a one-speaker dialogue sees nothing)."""
    flags = jnp.asarray(intra, bool)
    if flags.ndim != 1:
        raise ValueError(f"intra must be a bool [heads] array; got shape {flags.shape}")
    same = document(speaker_ids)
    out = (Heads(flags) & same) | (Heads(~flags) & ~same)
    return out & causal() if causal_order else out


def composite(types: Int[Array, "B T"], visual: int = 0, text: int = 1) -> Mask:
    """EE-MLLM's composite attention (a reading): no visual-visual self-attention (visual rows see
    nothing and give zeros; the visual path is the layer's MLP), text sees every visual token and
    the text causally."""
    return by_type(types, {(text, visual): "full", (text, text): "causal"})
